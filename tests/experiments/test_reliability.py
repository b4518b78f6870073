"""Reliability of experiments.train: SIGKILL + resume, corrupt / unfinalised checkpoints,
config typos, NaN losses.  Tiny models on the tiny tasks of test_train.py."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from test_train import REPO, register_tiny_tasks, subprocess_env, tiny_config, write_config_file

from experiments.common.config import ConfigError, check_cli_overrides
from experiments.common.metrics import deterministic, read_metrics
from experiments.train import Trainer, config_from_argv, run_cli, train_and_evaluate

register_tiny_tasks()


def _same_run(work_a: str, work_b: str) -> None:
    """Identical deterministic metrics lines and final summary metrics."""
    a, b = read_metrics(work_a), read_metrics(work_b)
    assert a and [deterministic(m) for m in a] == [deterministic(m) for m in b]
    sa, sb = (json.load(open(os.path.join(w, "summary.json"))) for w in (work_a, work_b))
    for key in ("final_train", "final_valid"):
        assert deterministic(sa[key]) == deterministic(sb[key])
    assert sa["best_valid_accuracy"] == sb["best_valid_accuracy"] and sa["steps"] == sb["steps"]


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    steps, every = 40, 4
    cfg_file = write_config_file(tmp_path)
    work = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "experiments.train", f"--config={cfg_file}", f"--workdir={work}",
           f"--config.train.steps={steps}", f"--config.train.checkpoint_every={every}",
           "--config.train.eval_every=4"]
    env = {**subprocess_env(), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}     # the rerun skips compilation
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_at = []

    def kill_after_second_checkpoint():
        while proc.poll() is None:
            if os.path.isdir(os.path.join(work, "checkpoints", str(2 * every))):
                proc.send_signal(signal.SIGKILL)
                killed_at.append(sorted(os.listdir(os.path.join(work, "checkpoints"))))
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_after_second_checkpoint)
    killer.start()
    ref = tiny_config("tiny_copy")            # the uninterrupted reference, in-process meanwhile
    ref.train.update(steps=steps, checkpoint_every=every, eval_every=4)
    train_and_evaluate(ref, str(tmp_path / "reference"))
    killer.join(timeout=120)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert killed_at and not os.path.exists(os.path.join(work, "summary.json"))   # killed mid-run

    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.load(open(os.path.join(work, "summary.json")))
    assert summary["resumed_from_step"] >= 2 * every and summary["steps"] == steps
    _same_run(str(tmp_path / "reference"), work)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 3 and 6."""
    work = str(tmp_path_factory.mktemp("trained") / "run")
    train_and_evaluate(tiny_config("tiny_copy"), work)
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["3", "6"]
    return work


def _damage(step_dir: str, how: str) -> None:
    if how == "truncated":      # every array data file loses its second half (the OCDBT store may hold
        #                         unreferenced data files, so damaging only one of them can go unnoticed)
        files = [f for f in glob.glob(os.path.join(step_dir, "**", "d", "*"), recursive=True) if os.path.isfile(f)]
        assert files, f"no array data files under {step_dir}"
        for f in files:
            data = open(f, "rb").read()
            open(f, "wb").write(data[: len(data) // 2])
    elif how == "garbled":      # the tree metadata is not JSON any more
        open(os.path.join(step_dir, "default", "_METADATA"), "w").write("\x00garbage{")
    elif how == "no_commit_marker":
        os.remove(os.path.join(step_dir, "commit_success.txt"))
    elif how == "tmp_dir":      # killed before orbax's rename
        os.rename(step_dir, step_dir + ".orbax-checkpoint-tmp-1234567")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")   # orbax/tensorstore cleanup
@pytest.mark.parametrize("how", ["truncated", "garbled", "no_commit_marker", "tmp_dir"])
def test_bad_latest_checkpoint_falls_back_to_the_previous_one(trained, how, tmp_path):
    work = str(tmp_path / "run")
    shutil.copytree(trained, work)
    _damage(os.path.join(work, "checkpoints", "6"), how)
    with pytest.warns(RuntimeWarning, match=r"checkpoint step 6 .*(could not be restored|never finalised)"):
        summary = train_and_evaluate(tiny_config("tiny_copy"), work)
    assert summary["resumed_from_step"] == 3
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["3", "6"]
    assert len(os.listdir(os.path.join(work, "bad_checkpoints"))) == 1
    _same_run(trained, work)       # steps 4..6 redone, identical to the original run


def test_unknown_config_keys_list_valid_keys_and_closest_match(tmp_path):
    cfg_file = write_config_file(tmp_path)
    argv = ["train", f"--config={cfg_file}", f"--workdir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"config\.train\.stpes: unknown key .*valid choices: .*steps.*"
                                          r"did you mean 'steps'\?"):
        config_from_argv(argv + ["--config.train.stpes=5"])
    with pytest.raises(ConfigError, match=r"config\.trian: .*valid choices: model, optim, task, train; "
                                          r"did you mean 'train'\?"):
        check_cli_overrides(argv + ["--config.trian.steps=5"])
    with pytest.raises(ConfigError, match=r"config\.task\.vocab: .*did you mean 'vocab_size'\?"):
        check_cli_overrides(argv + ["--config.task.vocab=5"])
    cfg = tiny_config()
    cfg.trainer = {"steps": 3}     # unknown top-level key, e.g. from a sweep script
    with pytest.raises(ConfigError, match=r"config\.trainer: .*did you mean 'train'\?"):
        train_and_evaluate(cfg, str(tmp_path / "w"))
    # The CLI prints the message and exits non-zero (absl's flags-parsing error path).
    from experiments.train import _flags_parser
    with pytest.raises(SystemExit) as e:
        _flags_parser(argv + ["--config.model.d_modle=8"])
    assert e.value.code == 1


@pytest.mark.parametrize("field,value,pattern", [
    ("model.mixer", "softmx", r"config\.model\.mixer: unknown mixer 'softmx'; registered mixers: .*softmax.*"
                              r"did you mean 'softmax'\?"),
    ("model.mixer_pattern", "softmax,slidng_window", r"config\.model\.mixer_pattern: .*did you mean 'sliding_window'"),
    ("task.name", "tiny_cpy", r"config\.task\.name: unknown task 'tiny_cpy'; valid choices: .*tiny_copy.*"
                              r"did you mean 'tiny_copy'\?"),
    ("task.vocab", 5, r"config\.task\.vocab: task 'tiny_copy' has no field 'vocab'; valid choices: .*"
                      r"did you mean 'vocab_size'\?"),
])
def test_unknown_mixer_or_task_lists_choices(field, value, pattern):
    cfg = tiny_config()
    section, key = field.split(".")
    cfg[section][key] = value
    with pytest.raises(ConfigError, match=pattern):
        Trainer(cfg)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    cfg_file = write_config_file(tmp_path)
    work = str(tmp_path / "nan")
    config, _ = config_from_argv(["train", f"--config={cfg_file}", f"--workdir={work}", "--config.train.steps=8",
                                  "--config.train.checkpoint_every=2", "--config.train.log_every=3",
                                  "--config.train.debug_nan_at_step=5"])
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step 5.*last good checkpoint: "
                                                 r"step 4"):
        train_and_evaluate(config, work)
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2", "4"]   # nothing after the bad step
    assert all(m["step"] <= 4 and np.isfinite(m["loss"]) for m in read_metrics(work))   # no NaN logged
    trainer = Trainer(config)
    from experiments.common.checkpoint import Checkpointer
    ckpt = Checkpointer(os.path.join(work, "checkpoints"), 3)
    step, state = ckpt.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainer.state))
    ckpt.close()
    assert step == 4 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    # The CLI entry point (main = sys.exit(run_cli(...))) reports it and exits non-zero; the good
    # checkpoints stay.
    assert run_cli(config, work) == 1
    assert "non-finite loss or gradient at step 5" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2", "4"]


def _tree(root: str) -> dict:
    """Every file and directory under ``root``: relative path -> (mtime_ns, size)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.stat(os.path.join(d, name))
            out[os.path.relpath(os.path.join(d, name), root)] = (st.st_mtime_ns, st.st_size if name in files else 0)
    return out


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")   # orbax/tensorstore cleanup
def test_readers_never_change_the_workdir(trained, tmp_path):
    from experiments import evaluate, generate
    work = str(tmp_path / "run")
    shutil.copytree(trained, work)
    ckpts = os.path.join(work, "checkpoints")
    _damage(os.path.join(ckpts, "6"), "truncated")                                    # a bad checkpoint
    shutil.copytree(os.path.join(ckpts, "3"), os.path.join(ckpts, "9.orbax-checkpoint-tmp-42"))  # an in-flight save
    shutil.copytree(os.path.join(ckpts, "3"), os.path.join(ckpts, "8"))
    os.remove(os.path.join(ckpts, "8", "commit_success.txt"))                        # never finalised
    before = _tree(work)
    with pytest.warns(RuntimeWarning) as evaluate_warnings:
        ev = evaluate.run(work, batches=1)
    with pytest.warns(RuntimeWarning) as generate_warnings:
        text = generate.run(work, max_new_tokens=2, rows=1)
    for record in (evaluate_warnings, generate_warnings):
        said = " ".join(str(w.message) for w in record)
        assert re.search(r"checkpoint step 6 .*could not be restored.*skipped \(read-only: left in place\)", said)
        assert re.search(r"checkpoint step 8 .*never finalised.*skipped \(read-only: left in place\)", said)
    assert ev["step"] == 3 and "[step 3]" in text            # fell back past the bad and unfinalised steps
    assert _tree(work) == before                             # nothing created, moved, deleted or touched
    assert not os.path.exists(os.path.join(work, "bad_checkpoints"))
