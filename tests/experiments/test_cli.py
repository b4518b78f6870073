"""Command-line errors name the flag and list the valid choices: malformed ``:arg`` config specs,
unknown mixer keyword arguments, mixer names in the wrong case; ``--help`` shows every flag of the
script and the config fields.  No training here (config parsing only, plus ``--help``
subprocesses)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from test_train import REPO, subprocess_env, write_config_file

from attn_jax import mixers
from experiments.common.config import ConfigError, load_config_file, validate
from experiments.train import _flags_parser, config_from_argv

MQAR = "experiments/configs/mqar.py"


@pytest.mark.parametrize("spec,pattern", [
    (f"{MQAR}:64", r"config: '.*mqar\.py:64' is not a valid config \(mqar\.py takes <seq_len>x<num_kv_pairs> "
                   r"\(two positive ints\), got '64'\); expected --config=.*mqar\.py:<seq_len>x<num_kv_pairs>"),
    (f"{MQAR}:64x", r"got '64x'\); expected --config=.*mqar\.py:<seq_len>x<num_kv_pairs>, e\.g\. :64x4"),
    ("experiments/configs/counting.py:64", r"counting\.py takes no argument, got '64'\); expected "
                                           r"--config=experiments/configs/counting\.py$"),
])
def test_malformed_config_arg_names_the_expected_format(spec, pattern, capsys):
    with pytest.raises(ConfigError, match=pattern):
        config_from_argv(["train", f"--config={spec}", "--workdir=/nonexistent"])
    with pytest.raises(SystemExit) as e:                 # the CLI: one line on stderr, exit code 1, no traceback
        _flags_parser(["train", f"--config={spec}", "--workdir=/nonexistent"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "is not a valid config" in err and "Traceback" not in err
    assert load_config_file(f"{MQAR}:128x8").task.seq_len == 128      # well-formed args still work


def test_unknown_mixer_keyword_lists_the_valid_keywords(tmp_path):
    cfg_file = write_config_file(tmp_path)
    with pytest.raises(ConfigError, match=r"config\.model\.mixer_kwargs\.gla\.windw: mixer 'gla' has no keyword "
                                          r"argument 'windw'; valid choices: .*chunk_size.*short_conv"):
        config_from_argv(["train", f"--config={cfg_file}", "--config.model.mixer_kwargs.gla.windw=3"])
    with pytest.raises(ConfigError, match=r"sliding_window\.windw: .*valid choices: .*; did you mean 'window'\?"):
        config_from_argv(["train", f"--config={cfg_file}", "--config.model.mixer_kwargs.sliding_window.windw=3"])
    config, _ = config_from_argv(["train", f"--config={cfg_file}", "--config.model.mixer_kwargs.gla.chunk_size=32"])
    assert config.model.mixer_kwargs.gla.chunk_size == 32
    config.model.mixer_kwargs = {"softmax": {"positionl": "alibi"}}        # from a config file or a sweep
    with pytest.raises(ConfigError, match=r"config\.model\.mixer_kwargs\.softmax\.positionl: .*did you mean "
                                          r"'positional'\?"):
        validate(config)


def test_mixer_names_match_case_insensitively_first():
    for name, expected in (("GLA", "gla"), ("Softmax", "softmax"), ("SLIDING_WINDOW", "sliding_window"),
                           ("DeltaNet", "deltanet"), ("slidng_window", "sliding_window")):
        with pytest.raises(ValueError, match=rf"mixer: unknown mixer '{name}'; registered mixers: .*"
                                             rf"did you mean '{expected}'\?$"):
            mixers.get(name)


def test_help_shows_every_flag_and_the_config_fields():
    procs = {m: subprocess.Popen([sys.executable, "-m", f"experiments.{m}", "--help"], cwd=REPO, env=subprocess_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for m in ("train", "evaluate", "generate")}
    out = {m: p.communicate(timeout=120)[0] for m, p in procs.items()}
    for m, flags_ in (("train", ("--config", "--workdir", "--[no]print_config")),
                      ("evaluate", ("--workdir", "--batches", "--output")),
                      ("generate", ("--workdir", "--max_new_tokens", "--temperature"))):
        for flag in flags_:
            assert f"  {flag}:" in out[m], (m, flag, out[m][-2000:])
    assert "--config.<section>.<field>=value" in out["train"] and "train: batch_size" in out["train"]
