"""Smoke test of experiments.demo (`make demo`): 2 mixers x 2 seeds x a few steps in process, the
outputs, the seed summary, and that the tracked results/ copy is written only on request."""

from __future__ import annotations

import json
import math
import os

import pytest

from experiments import demo, sweep


def test_reference_levels_match_the_task():
    ref = demo.reference_levels()
    k = demo.TASK["vocab_size"] - demo.TASK["vocab_size"] // 2
    assert ref["num_values"] == k and math.isclose(ref["chance_loss"], math.log(k))
    assert math.isclose(ref["plateau_accuracy"], 1 / demo.TASK["num_kv_pairs"])


def test_split_jobs_keeps_a_mixer_on_one_worker():
    jobs = [(m, s) for m in ("softmax", "linear") for s in (0, 1, 2)]
    assert demo._split_jobs(jobs, 2) == [jobs[:3], jobs[3:]]
    assert demo._split_jobs(jobs[:1], 4) == [jobs[:1]]
    assert sum(demo._split_jobs(jobs, 4), []) == jobs


def test_demo_smoke(tmp_path):
    lines = []
    work, res = tmp_path / "runs", tmp_path / "results"
    payload = demo.run_demo(mixers=["softmax", "linear"], seeds=[0, 1], steps=4, workdir=str(work), log=lines.append,
                            isolate=False, results_dir=str(res))
    assert [(r["mixer"], r["seed"]) for r in payload["results"]] == [("softmax", 0), ("softmax", 1),
                                                                     ("linear", 0), ("linear", 1)]
    assert all(r["status"] == "ok" and 0 <= r["valid_accuracy"] <= 1 for r in payload["results"])
    s = payload["summary"]["softmax"]
    assert len(s["accuracies"]) == 2 and s["min"] <= s["mean"] <= s["max"]
    for name in demo.OUTPUTS:
        assert os.path.getsize(work / name) > 0
    assert not res.exists()                            # the tracked copy only with write_results
    with open(work / "results.json") as f:
        assert json.load(f)["train"]["steps"] == 4
    assert "| softmax |" in "\n".join(lines)
    demo.run_demo(mixers=["softmax"], seeds=[0], steps=2, workdir=str(work), log=lines.append, isolate=False,
                  results_dir=str(res), write_results=True)
    assert sorted(os.listdir(res)) == sorted(demo.OUTPUTS)
    with pytest.raises(sweep.SweepError, match="did you mean"):
        demo.run_demo(mixers=["softmaxx"], steps=2, workdir=str(tmp_path / "r2"))
    with pytest.raises(ValueError, match="seeds"):
        demo.run_demo(mixers=["softmax"], seeds=[], steps=2, workdir=str(tmp_path / "r3"))
