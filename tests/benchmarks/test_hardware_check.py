"""CPU dry run of benchmarks/hardware_check.py (the prepared GPU run of every Pallas kernel).

The dry run is the script's own code path on this CPU: kernels with ``interpret=True``, tiny
sizes, parity against the XLA paths, timing, cuDNN reported as refused.  Interpret-mode
compilation costs seconds per configuration, so the default run covers one configuration of
each kernel (flash, contiguous and paged decode, chunked GLA) and checks that the report lists
every configuration of the lowering tests; the run over all of them is ``slow``.
"""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import hardware_check as hc
from tests.pallas.test_decode_kernels import LOWERING
from tests.pallas.test_flash_lowering import CONFIGS as FLASH
from tests.pallas.test_gla_lowering import CONFIGS as GLA

ALL_KEYS = ({f"flash/{n}" for n in FLASH} | {f"decode/{n}" for n in LOWERING} | {f"gla/{n}" for n in GLA})
#: one configuration per kernel, each with extras (sinks + softcap, paged fp32, scalar gates)
REPRESENTATIVE = ["flash/softcap_sinks", "decode/contiguous_bf16_hd64", "decode/paged_fp32_hd64",
                  "gla/scalar_float32_d64"]
FAST = ["--dry-run", "--repeats", "2", "--warmup", "1", "--config-budget-s", "600", "--deadline-s", "3600"]


def _run(tmp_path, *args):
    report = hc.main([*FAST, "--out", str(tmp_path), *args])
    [json_file] = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    with open(tmp_path / json_file) as f:
        on_disk = json.load(f)
    md = (tmp_path / json_file.replace(".json", ".md")).read_text()
    assert on_disk["finished"] and on_disk["configs"] == json.loads(json.dumps(report["configs"], default=str))
    return on_disk, md


def _assert_ran(rec, md):
    key = rec["key"]
    assert rec["status"] == "ok", (key, rec.get("reason"), rec.get("parity"))
    p, t = rec["parity"], rec["timing"]
    assert p["ok"] and set(p["compile_s"]) == {"kernel", "xla"}
    leaves = p["leaves"]
    if rec["family"] == "decode":
        assert set(leaves) == {"o", "lse"}
    else:  # forward outputs and a gradient for every differentiable input
        assert "o" in leaves and {"dq", "dk", "dv"} <= set(leaves), (key, leaves)
        assert "fwd_bwd_s" in t["kernel"] and "fwd_bwd_s" in t["xla"]
    for leaf in leaves.values():
        assert leaf["ok"] and leaf["nan"] == 0 and leaf["rel_rmse"] <= leaf["rel_tol"] and leaf["worst_over_tol"] <= 1
    assert t["kernel"]["fwd_s"] > 0 and t["xla"]["fwd_s"] > 0 and t["agreement"]["ok"]
    assert t["kernel"]["fwd_tflops"] > 0
    assert "refused" in t["cudnn"]   # no cuDNN on a CPU (GLA: no counterpart at all)
    assert f"| {key} |" in md


def test_dry_run_lists_every_config_and_runs_one_per_kernel(tmp_path):
    report, md = _run(tmp_path, "--only", ",".join(REPRESENTATIVE))
    by_key = {r["key"]: r for r in report["configs"]}
    assert set(by_key) == ALL_KEYS and len(report["configs"]) == len(ALL_KEYS)
    families = [r["family"] for r in report["configs"][:3]]
    assert families == ["flash", "decode", "gla"]   # interleaved: a cut-short run covers every kernel
    for key in REPRESENTATIVE:
        _assert_ran(by_key[key], md)
    others = [r for k, r in by_key.items() if k not in REPRESENTATIVE]
    assert all(r["status"] == "not-selected" for r in others)
    assert report["meta"]["dry_run"] and report["meta"]["backend"] == "cpu"
    assert report["status_counts"] == {"ok": len(REPRESENTATIVE), "not-selected": len(others)}
    assert f"{len(others)} configurations not selected" in md


def test_deadline_skips_and_says_so(tmp_path):
    report, md = _run(tmp_path, "--deadline-s", "0", "--families", "decode")
    recs = [r for r in report["configs"] if r["family"] == "decode"]
    assert len(recs) == len(LOWERING)
    assert all(r["status"] == "skipped" and "global deadline" in r["reason"] for r in recs)
    assert all(r["status"] == "not-selected" for r in report["configs"] if r["family"] != "decode")
    assert "global deadline" in md


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="--only: unknown"):
        hc.main(["--dry-run", "--only", "flash/no_such_config"])
    with pytest.raises(SystemExit):
        hc.parse_args(["--repeats", "3"])          # hardware timing needs a median of >= 5
    with pytest.raises(SystemExit):
        hc.parse_args(["--families", "flash,sparse"])


@pytest.mark.slow
def test_dry_run_every_config(tmp_path):
    report, md = _run(tmp_path)
    assert {r["key"] for r in report["configs"]} == ALL_KEYS
    for rec in report["configs"]:
        _assert_ran(rec, md)
