"""benchmarks/pallas_model.py: the analytic roofline model of the flash kernels (no hardware needed)."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import pallas_model as pm  # noqa: E402


def test_flops_small_case_by_hand():
    # B=2, H=3, T=S=4, D=8: QK^T is 2*3 * (4*4*8) MACs, PV the same; 2 FLOPs per MAC.
    macs_per_matmul = 2 * 3 * 4 * 4 * 8  # 768
    assert pm.attention_flops(2, 3, 4, 8, causal=False) == 2 * 2 * macs_per_matmul == 3072
    assert pm.attention_flops(2, 3, 4, 8, causal=False, pass_="fwd_bwd") == 3.5 * 3072
    assert pm.attention_flops(2, 3, 4, 8, causal=False, pass_="bwd") == 2.5 * 3072


@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
def test_causal_halves_flops(pass_):
    for B, H, T, D in [(2, 3, 4, 8), (1, 16, 2048, 128)]:
        assert pm.attention_flops(B, H, T, D, causal=True, pass_=pass_) == \
            pm.attention_flops(B, H, T, D, causal=False, pass_=pass_) / 2


def test_visible_tiles_by_hand():
    assert pm.visible_tiles(8, 8, 2, 2, causal=False) == 16
    assert pm.visible_tiles(8, 8, 2, 2, causal=True) == 1 + 2 + 3 + 4  # lower triangle incl. diagonal
    assert pm.visible_tiles(8, 8, 4, 2, causal=True) == 2 + 4          # bq=4 spans two key blocks
    assert pm.visible_tiles(8, 8, 2, 4, causal=True) == 1 + 1 + 2 + 2
    assert pm.visible_tiles(512, 512, 512, 512, causal=True) == 1       # one tile covers everything


def test_forward_bytes_match_brief_formula():
    # Non-causal forward: e*(|Q| + |O|) + 4*R (lse) + (T/bq) * e*(|K| + |V|).
    B, H, T, D, bq, bk, e = 2, 4, 1024, 64, 128, 64, 2
    n = B * H * T * D
    got = pm.attention_bytes(B, H, T, D, bq, bk, causal=False, itemsize=e)["total"]
    assert got == e * 2 * n + 4 * B * H * T + (T // bq) * e * 2 * n
    causal = pm.attention_bytes(B, H, T, D, bq, bk, causal=True, itemsize=e)["total"]
    kv_nc, kv_c = got - e * 2 * n - 4 * B * H * T, causal - e * 2 * n - 4 * B * H * T
    assert 0.5 < kv_c / kv_nc < 0.6  # roughly half of the K/V tiles, plus the diagonal


@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("causal", [False, True])
def test_intensity_grows_with_head_dim_at_fixed_blocks(pass_, causal):
    # Fixed hidden size (H*D) and tokens: the FLOPs are independent of D, the D-proportional bytes
    # too; only the per-row lse/delta bytes amortise over more columns, so intensity grows with D.
    vals = []
    for D in (64, 128, 256):
        B, H, T = 4, 2048 // D, 4096
        f = pm.attention_flops(B, H, T, D, causal=causal, pass_=pass_)
        by = pm.attention_bytes(B, H, T, D, 128, 64, causal=causal, pass_=pass_)["total"]
        vals.append(f / by)
    assert vals[0] < vals[1] < vals[2]


def test_predicted_time_is_max_of_bounds():
    hw = {"peak_flops": 100e12, "hbm_bw": 1e12}
    r = pm.roofline(1e12, 1e9, hw)          # 10 ms compute, 1 ms memory
    assert r["time_s"] == max(r["t_compute_s"], r["t_memory_s"]) == pytest.approx(1e-2)
    assert r["bound"] == "compute" and r["tflops"] == pytest.approx(100)
    r = pm.roofline(1e12, 1e11, hw)         # 10 ms compute, 100 ms memory
    assert r["time_s"] == pytest.approx(0.1) and r["bound"] == "memory"
    assert r["intensity"] == pytest.approx(10)
    for p in pm.grid(["h100"])[:8]:
        assert p["time_s"] == max(p["t_compute_s"], p["t_memory_s"])
        assert p["tflops"] <= pm.HARDWARE["h100"]["peak_flops"] / 1e12 + 1e-9


def test_main_json_only(tmp_path, capsys):
    pm.main(["--json-only", "--out-dir", str(tmp_path)])
    assert not (tmp_path / "pallas_model.png").exists()
    data = json.loads((tmp_path / "pallas_model.json").read_text())
    assert "not a measurement" in data["label"] and data["kind"] == "model"
    rows = data["rows"]
    n = len(pm.HARDWARE) * len(pm.SEQLENS) * len(pm.HEAD_DIMS) * 2 * len(pm.PASSES)
    assert len(rows) == n == 144
    keys = {(r["platform"], r["pass"], r["seqlen"], r["head_dim"], r["causal"]) for r in rows}
    assert len(keys) == n
    for r in rows:
        assert r["batch"] * r["seqlen"] == 16384 and r["heads"] * r["head_dim"] == 2048
        assert r["bound"] in ("compute", "memory")
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("flops", "bytes", "intensity", "time_s", "tflops"))
    assert "not a measurement" in capsys.readouterr().out


def test_main_rejects_unknown_platform(tmp_path):
    with pytest.raises(SystemExit):
        pm.main(["--json-only", "--out-dir", str(tmp_path), "--platforms", "a100"])
