"""Smoke test of experiments.demo (`make demo`): 2 mixers x 2 seeds x a few steps in process, the
outputs, the seed summary, and that the tracked results/ copy is written only on request."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

from experiments import demo, sweep


def test_reference_levels_match_the_task():
    ref = demo.reference_levels()
    k = demo.TASK["vocab_size"] - demo.TASK["vocab_size"] // 2
    assert ref["num_values"] == k and math.isclose(ref["chance_loss"], math.log(k))
    assert math.isclose(ref["plateau_accuracy"], 1 / demo.TASK["num_kv_pairs"])


def test_split_jobs_balances_cost_and_keeps_order():
    jobs = [("linear", d, s) for d in (16, 32, 64) for s in (0, 1, 2)]
    chunks = demo._split_jobs(jobs, 2)
    assert sum(chunks, []) == jobs and len(chunks) == 2
    assert chunks[1] == jobs[6:]                       # 3 x d64 (cost 192) vs 3 x d16 + 3 x d32 (144)
    assert demo._split_jobs(jobs[:1], 4) == [jobs[:1]]
    assert all(chunks) and len(demo._split_jobs(jobs, 9)) == 9


def test_demo_smoke(tmp_path):
    lines = []
    work, res = tmp_path / "runs", tmp_path / "results"
    payload = demo.run_demo(mixers=["linear"], d_models=[16], seeds=[0, 1], steps=3, workdir=str(work),
                            log=lines.append, isolate=False, results_dir=str(res))
    assert [(r["arm"], r["seed"]) for r in payload["results"]] == [("linear d16", 0), ("linear d16", 1)]
    assert all(r["status"] == "ok" and 0 <= r["valid_accuracy"] <= 1 for r in payload["results"])
    s = payload["summary"]["linear d16"]
    assert len(s["accuracies"]) == 2 and s["min"] <= s["mean"] <= s["max"] and s["runs"] == 2
    for name in demo.OUTPUTS:
        assert os.path.getsize(work / name) > 0
    assert not res.exists()                            # the tracked copy only on request
    with open(work / "results.json") as f:
        assert json.load(f)["train"]["steps"] == 3
    assert "| linear d16 |" in "\n".join(lines)
    assert sorted(os.path.basename(p) for p in demo.copy_results(str(work), str(res))) == sorted(demo.OUTPUTS)
    with pytest.raises(ValueError, match="missing"):
        demo.copy_results(str(tmp_path / "empty"), str(res))
    with pytest.raises(sweep.SweepError, match="did you mean"):
        demo.run_demo(mixers=["softmaxx"], steps=2, workdir=str(tmp_path / "r2"))
    with pytest.raises(ValueError, match="seeds"):
        demo.run_demo(mixers=["linear"], seeds=[], steps=2, workdir=str(tmp_path / "r3"))
    with pytest.raises(ValueError, match="d_models"):
        demo.run_demo(mixers=["linear"], d_models=[15], steps=2, workdir=str(tmp_path / "r4"))


# A stand-in worker (no JAX): writes each job's row, sleeps without using CPU on mixer "hang"
# (a deadlock), exits with code 3 on mixer "crash".
_FAKE_WORKER = """
import json, os, sys, time
workdir = sys.argv[1]
for job in sys.argv[2:]:
    m, d, s = job.split(":")
    if m == "hang":
        time.sleep(60)
    if m == "crash":
        sys.exit(3)
    os.makedirs(os.path.join(workdir, f"{m}-d{d}-s{s}"), exist_ok=True)
    with open(os.path.join(workdir, f"{m}-d{d}-s{s}", "demo_row.json"), "w") as f:
        json.dump({"mixer": m, "d_model": int(d), "seed": int(s), "status": "ok"}, f)
"""


def test_watchdog_kills_a_deadlocked_worker_and_continues(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "STALL_SEC", 1.5)
    monkeypatch.setattr(demo, "_worker_command", lambda chunk, steps, workdir: [
        sys.executable, "-c", _FAKE_WORKER, workdir, *[f"{m}:{d}:{s}" for m, d, s in chunk]])
    jobs = [("a", 16, 0), ("hang", 16, 1), ("a", 16, 2), ("crash", 64, 0), ("b", 64, 1)]
    lines = []
    rows = demo._run_isolated(jobs, 5, str(tmp_path), lines.append, workers=2)
    assert [(r["mixer"], r["seed"], r["status"]) for r in rows] == [
        ("a", 0, "ok"), ("hang", 1, "hung"), ("a", 2, "ok"), ("crash", 0, "error"), ("b", 1, "ok")]
    assert "deadlock" in rows[1]["error"] and "code 3" in rows[3]["error"]
    assert len(lines) == 2


def test_demo_config_uses_a_constant_lr_after_warmup():
    from experiments.common.optim import make_schedule
    c = demo.demo_config("linear", seed=1, steps=200, d_model=16)
    assert c.model.d_model == 16 and c.task.seed == 1 and c.model.mixer_kwargs.linear.short_conv
    sched = make_schedule(c.optim, 200)
    w = c.optim.warmup_steps
    assert float(sched(0)) == 0.0 and 0 < float(sched(w // 2)) < demo.LR
    assert math.isclose(float(sched(w)), demo.LR, rel_tol=1e-6) and math.isclose(float(sched(199)), demo.LR,
                                                                               rel_tol=1e-6)
    c.optim.schedule = "linear"
    with pytest.raises(ValueError, match="'cosine' or 'constant'"):
        make_schedule(c.optim, 200)
