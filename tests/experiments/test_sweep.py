"""experiments.sweep on a 2 mixers x 1 width x 2 LRs x 1 seed grid of a tiny MQAR (the demo's
smoke test is tests/experiments/test_demo.py)."""

from __future__ import annotations

import csv
import math
import os

import pytest

from experiments import sweep

MIXERS = ["softmax", "sliding_window"]
LRS = [3e-3, 1e-2]


def tiny_mqar_config(steps: int = 20):
    from experiments.configs.base import with_task
    c = with_task("mqar", vocab_size=32, seq_len=16, num_kv_pairs=2, power_a=0.5)
    c.model.update(d_model=16, num_layers=1, num_heads=2)
    c.model.mixer_kwargs = {"softmax": {"impl": "reference"}, "sliding_window": {"impl": "reference"}}
    c.optim.update(warmup_steps=2)
    c.train.update(steps=steps, batch_size=8, eval_every=10, eval_batches=1, log_every=5, checkpoint_every=steps,
                   keep_checkpoints=1, progress=False)
    return c


CONFIG_FILE = '''
import importlib.util
_spec = importlib.util.spec_from_file_location("_test_sweep", {path!r})
_m = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(_m)

def get_config(arg="20"):
    return _m.tiny_mqar_config(int(arg))
'''


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sweep"))
    lines = []
    result = sweep.run_sweep(tiny_mqar_config(), MIXERS, [16], LRS, [0], workdir, log=lines.append)
    return workdir, result, lines


def _read_csv(workdir):
    with open(os.path.join(workdir, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_writes_csv_md_and_plots(swept):
    workdir, result, lines = swept
    rows = _read_csv(workdir)
    assert len(rows) == 4 and len(lines) == 4
    assert list(rows[0]) == list(sweep.CSV_FIELDS)
    assert sorted((r["mixer"], float(r["lr"])) for r in rows) == sorted((m, lr) for m in MIXERS for lr in LRS)
    for r in rows:
        assert r["status"] == "ok" and int(r["steps"]) == 20 and int(r["d_model"]) == 16
        assert 0.0 <= float(r["final_valid_accuracy"]) <= float(r["best_valid_accuracy"]) <= 1.0
        assert math.isfinite(float(r["final_valid_loss"])) and int(r["params"]) > 0
        assert float(r["wall_time_sec"]) > 0
        assert os.path.exists(os.path.join(r["workdir"], "summary.json"))
    for name in ("results.md", "accuracy_vs_dmodel.png", "loss_curves.png"):
        path = os.path.join(workdir, name)
        assert os.path.getsize(path) > 0, name
    with open(os.path.join(workdir, "accuracy_vs_dmodel.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_best_over_lr_matches_csv(swept):
    """results.md's cells equal an independent recomputation from results.csv."""
    workdir, _, _ = swept
    runs: dict = {}
    for r in _read_csv(workdir):
        runs.setdefault((r["mixer"], int(r["d_model"])), {}).setdefault(float(r["lr"]), []).append(
            float(r["final_valid_accuracy"]))
    expected = {}
    for key, by_lr in runs.items():
        means = {lr: sum(v) / len(v) for lr, v in by_lr.items()}
        best_lr = min(lr for lr in means if means[lr] == max(means.values()))   # ties -> smaller LR
        expected[key] = (means[best_lr], best_lr)
    with open(os.path.join(workdir, "results.md")) as f:
        md = f.read()
    for (mixer, d), (mean, lr) in expected.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {mixer} |"))
        assert f"{mean:.3f} ± 0.000 (lr {lr:g})" in row, (row, mean, lr)


def test_aggregate_seed_mean_std_divergence_and_ties():
    def row(m, lr, seed, acc, status="ok"):
        return {"mixer": m, "d_model": 32, "lr": lr, "seed": seed, "status": status, "params": 10,
                "final_valid_accuracy": acc if status == "ok" else float("nan")}
    rows = [row("a", 1e-3, 0, 0.5), row("a", 1e-3, 1, 0.7),          # mean 0.6
            row("a", 1e-2, 0, 0.9), row("a", 1e-2, 1, 0.0, "diverged"),   # not eligible
            row("b", 1e-3, 0, 0.4), row("b", 1e-3, 1, 0.4),          # tie with 1e-2: smaller LR wins
            row("b", 1e-2, 0, 0.3), row("b", 1e-2, 1, 0.5),
            row("c", 1e-3, 0, 0.0, "diverged")]
    t = {x["mixer"]: x for x in sweep.aggregate(rows)}
    assert t["a"]["lr"] == 1e-3 and t["a"]["mean"] == pytest.approx(0.6)
    assert t["a"]["std"] == pytest.approx(math.sqrt(0.02))            # sample std of (0.5, 0.7)
    assert t["a"]["per_lr"][1e-2] is None and t["a"]["n"] == 2
    assert t["b"]["lr"] == 1e-3 and t["b"]["mean"] == pytest.approx(0.4)
    assert t["c"]["lr"] is None and t["c"]["mean"] is None


def test_rerun_skips_finished_cells(swept):
    workdir, _, _ = swept
    summaries = [os.path.join(r["workdir"], "summary.json") for r in _read_csv(workdir)]
    mtimes = [os.stat(p).st_mtime_ns for p in summaries]
    again = sweep.run_sweep(tiny_mqar_config(), MIXERS, [16], LRS, [0], workdir, log=lambda s: None, plots=False)
    assert again["trained"] == [] and len(again["skipped"]) == 4
    assert [os.stat(p).st_mtime_ns for p in summaries] == mtimes
    # An interrupted cell (no summary.json yet) is the only one that runs again.
    os.remove(summaries[1])
    third = sweep.run_sweep(tiny_mqar_config(), MIXERS, [16], LRS, [0], workdir, log=lambda s: None, plots=False)
    assert len(third["trained"]) == 1 and len(third["skipped"]) == 3
    assert third["trained"][0] == os.path.basename(os.path.dirname(summaries[1]))


def test_changed_config_in_same_workdir_is_an_error(swept):
    workdir, _, _ = swept
    with pytest.raises(sweep.SweepError, match="train.steps"):
        sweep.run_sweep(tiny_mqar_config(steps=21), MIXERS, [16], LRS, [0], workdir, log=lambda s: None)


def test_unknown_mixer_fails_before_training(tmp_path):
    workdir = str(tmp_path / "w")
    with pytest.raises(sweep.SweepError, match="did you mean 'softmax'") as e:
        sweep.run_sweep(tiny_mqar_config(), ["softmax", "sofmax"], [16], LRS, [0], workdir)
    assert "--mixers" in str(e.value) and "registered mixers" in str(e.value)
    assert not os.path.exists(workdir)                                  # nothing trained, nothing written


def test_command_line_parsing(tmp_path):
    cfg = tmp_path / "tiny_mqar_cfg.py"
    cfg.write_text(CONFIG_FILE.format(path=os.path.abspath(__file__)))
    config, spec, workdir = sweep.parse_argv(
        ["sweep", f"--config={cfg}:12", "--mixers=softmax,gla", "--d_models=16,32", "--lrs=1e-3,3e-3",
         "--seeds=0,1", f"--workdir={tmp_path / 'w'}", "--config.train.batch_size=4"])
    assert config.train.steps == 12 and config.train.batch_size == 4
    assert spec == {"mixers": ["softmax", "gla"], "d_models": [16, 32], "lrs": [1e-3, 3e-3], "seeds": [0, 1]}
    assert len(sweep.grid(**spec)) == 16
    with pytest.raises(sweep.SweepError, match="--d_models"):
        sweep.parse_argv(["sweep", f"--config={cfg}", "--mixers=softmax", "--d_models=16,x",
                          f"--workdir={tmp_path}"])
    _, spec, _ = sweep.parse_argv(["sweep", f"--config={cfg}", "--mixers=softmax", f"--workdir={tmp_path}"])
    assert spec["d_models"] == [16] and spec["lrs"] == [config.optim.lr] and spec["seeds"] == [0]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config, spec, _ = sweep.parse_argv(["sweep", f"--config={repo}/experiments/configs/mqar.py:64x4",
                                        "--mixers=softmax", f"--workdir={tmp_path}", "--config.train.steps=7"])
    assert config.task.name == "mqar" and config.task.num_kv_pairs == 4 and config.train.steps == 7
    from experiments.common.config import ConfigError
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        sweep.parse_argv(["sweep", f"--config={cfg}", "--mixers=softmax", f"--workdir={tmp_path}",
                          "--config.train.step=3"])
