"""Analytic roofline MODEL of the Pallas flash-attention kernels -- not a measurement.

    python -m benchmarks.pallas_model [--platforms=h100,v5e] [--json-only] [--out-dir=results/bench]

No GPU or TPU is available to this project (BUILD.md, "Kernels"), so kernel speed is never
measured here.  This script prints what a roofline model predicts for our kernels
(``pallas_kernels.flash_attention``) on an H100 SXM (Triton/``gpu`` block sizes) and a TPU v5e
(Mosaic/``tpu`` block sizes).  Every output is labelled "model, not a measurement".

Shape grid (FlashAttention-3, Shah et al. 2024, arXiv:2407.08608, section 4.1, following the
FlashAttention-1/2 benchmark setup): 16k total tokens, ``batch = 16384 // seqlen``, seqlen in
{512, 1k, 2k, 4k, 8k, 16k}, head_dim ``D`` in {64, 128, 256}, ``H = 2048 // D`` heads (hidden
size 2048), self-attention (``S = T``), causal and non-causal, bf16; forward and forward+backward.

FLOP convention (the one FlashAttention-2/3 use to report TFLOP/s)
------------------------------------------------------------------
* forward ``F_fwd = 4 * B * H * T**2 * D`` (two matmuls, ``QK^T`` and ``PV``, 2 FLOPs per MAC),
  halved for causal masking (``F_fwd = 2 * B * H * T**2 * D``).  Softmax/exp work is not counted.
* backward ``F_bwd = 2.5 * F_fwd`` (five matmuls: recompute ``QK^T``, then ``dV``, ``dP``,
  ``dQ``, ``dK``), so forward+backward ``F = 3.5 * F_fwd``.
* The causal FLOPs are exactly half even though the kernel computes whole diagonal tiles; the
  reported TFLOP/s are therefore "useful" TFLOP/s, as in the papers.

HBM byte model (per call; ``e`` = bytes per element = 2 for bf16, ``|X|`` = element count,
row statistics ``lse`` and ``delta`` are float32, 4 bytes per row, ``R = B*H*T`` rows)
------------------------------------------------------------------------------------------
Block sizes ``bq, bk`` are the defaults of ``pallas_kernels.flash_attention.block_sizes``
(``get_block_sizes(platform, D, bfloat16, T, T)``).  ``n_tiles`` is the number of ``[bq, bk]``
logit tiles a kernel visits per (batch, head): ``nq * nk`` non-causal (``nq = T/bq``,
``nk = T/bk``); causal counts exactly the tiles that intersect the lower triangle,
``sum_i min(nk, floor(((i+1)*bq - 1)/bk) + 1)`` -- roughly half, plus the diagonal.  ``n_tiles``
is also what the kernels' block lists skip to, so this is the tile traffic they issue.

* forward (one kernel, grid over query blocks; Q read once, K/V re-read per query block)::

      bytes_fwd = e*(|Q| + |O|) + 4*R + B*H * n_tiles * bk * 2*D*e
                = e*(|Q| + |O|) + 4*R + (T/bq) * e*(|K| + |V|)        (non-causal)

  (the ``4*R`` term is the lse written for the backward pass; for bf16 this is the
  ``2*(|Q| + |O|) + (T/bq)*(|K| + |V|)`` of the design brief, with the K/V term in elements * e).
* backward = three launches, as in ``pallas_kernels/flash_attention/__init__.py``::

      delta   = rowsum(dO * O)          : e*(|O| + |dO|) + 4*R
      dq      kernel (grid over q blocks): e*(|Q| + |dO| + |dQ|) + 8*R
                                           + B*H * n_tiles * bk * 2*D*e        (K/V re-reads)
      dk/dv   kernel (grid over k blocks): e*(|K| + |V| + |dK| + |dV|)
                                           + B*H * n_tiles * bq * (2*D*e + 8)   (Q, dO, lse, delta re-reads)

  ``bytes_fwd_bwd = bytes_fwd + bytes_delta + bytes_dq + bytes_dkdv``.

Roofline: ``t = max(F / peak_flops, bytes / hbm_bw)``; the bound is "compute" when the first
term is larger, else "memory"; predicted TFLOP/s = ``F / t``; arithmetic intensity = ``F / bytes``.

Limitations (read before quoting a number): the byte model assumes *no* cache reuse of the
re-read tiles (H100 has a 50 MB L2 shared by the concurrent programs of one head, so real HBM
traffic is lower); the column ``TF/s cached`` repeats the prediction with compulsory traffic
only (every tensor touched once per launch), which bounds the model from the other side.  Peak
FLOP/s assume dense tensor-core math at the spec-sheet clock with perfect overlap of softmax,
exp and data movement; no launch, pipeline-fill or occupancy effects are modelled.  On TPU the
``[.., T, 1]`` float32 row statistics may be lane-padded in HBM, which is not modelled.  Note
also that with a fixed hidden size and token count (``B*T`` and ``H*D`` constant) the FLOPs do
not depend on ``D`` and the intensity is about ``bq`` FLOP/byte: it grows with ``D`` only
through the per-row lse/delta terms, and falls where the default table shrinks ``bq`` for large
heads (GPU ``D = 256``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform as _platform

import jax
import jax.numpy as jnp

from benchmarks.common import format_table, write_json
from pallas_kernels.flash_attention.block_sizes import get_block_sizes

LABEL = "MODEL (analytic roofline), not a measurement"

# Hardware constants, from the vendors' spec sheets:
# * NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: BF16 Tensor Core 1,979 TFLOPS *with
#   sparsity* -> 989 TFLOPS dense; GPU memory bandwidth 3.35 TB/s (80 GB HBM3).
# * Google Cloud TPU documentation, "TPU v5e": 197 TFLOPs peak bf16 compute per chip; 819 GBps
#   HBM2 bandwidth per chip (16 GiB).
HARDWARE: dict[str, dict] = {
    "h100": {"name": "NVIDIA H100 SXM5 (80 GB HBM3)", "kernel_platform": "gpu",
             "peak_flops": 989e12, "hbm_bw": 3.35e12,
             "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16 1979 TFLOPS sparse / 989 dense, 3.35 TB/s"},
    "v5e": {"name": "Google Cloud TPU v5e (per chip)", "kernel_platform": "tpu",
            "peak_flops": 197e12, "hbm_bw": 819e9,
            "source": "Google Cloud TPU v5e documentation: 197 TFLOPs bf16, 819 GBps HBM2 per chip"},
}

# Published FlashAttention-3 figures we could verify (the paper's abstract, arXiv:2407.08608):
# only the headline number; per-shape figures are read off plots we could not check, so omitted.
REFERENCE = {
    "h100": [{"what": "FlashAttention-3 headline (paper abstract): FP16 'up to 740 TFLOPs/s (75% utilization)' "
                      "on H100; the abstract does not state the shape",
              "tflops": 740.0, "source": "Shah et al. 2024, arXiv:2407.08608, abstract"}],
}

SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128, 256)
TOTAL_TOKENS = 16384
HIDDEN = 2048
PASSES = ("fwd", "fwd_bwd")
BWD_OVER_FWD = 2.5  # FLOP ratio backward / forward (FlashAttention-2/3 convention)
STAT_BYTES = 4      # float32 lse / delta per row


# ----------------------------------------------------------------------------- formulas

def attention_flops(B: int, H: int, T: int, D: int, *, causal: bool, pass_: str = "fwd", S: int | None = None) -> float:
    """FLOPs by the FA-2/3 convention: fwd ``4*B*H*T*S*D`` (halved causal); fwd+bwd = 3.5x fwd."""
    S = T if S is None else S
    f = 4.0 * B * H * T * S * D
    if causal:
        f /= 2
    if pass_ == "fwd":
        return f
    if pass_ == "fwd_bwd":
        return f * (1.0 + BWD_OVER_FWD)
    if pass_ == "bwd":
        return f * BWD_OVER_FWD
    raise ValueError(f"pass_: expected 'fwd', 'bwd' or 'fwd_bwd', got {pass_!r}")


def visible_tiles(T: int, S: int, bq: int, bk: int, *, causal: bool) -> int:
    """``[bq, bk]`` logit tiles a kernel visits per (batch, head); causal aligned at the end (S-T offset)."""
    nq, nk = math.ceil(T / bq), math.ceil(S / bk)
    if not causal:
        return nq * nk
    off = S - T  # query row r sees keys <= r + off
    total = 0
    for i in range(nq):
        last_key = min(S, (i + 1) * bq) - 1 + off  # largest key index any row of block i can see
        total += max(0, min(nk, last_key // bk + 1)) if last_key >= 0 else 0
    return total


def attention_bytes(B: int, H: int, T: int, D: int, bq: int, bk: int, *, causal: bool, pass_: str = "fwd",
                    itemsize: int = 2, cached: bool = False) -> dict:
    """HBM bytes of our kernels (module docstring); ``cached=True``: compulsory traffic only.

    Returns ``{"fwd", "delta", "dq", "dkdv", "total"}`` (backward entries 0 for ``pass_="fwd"``).
    """
    e, BH, R = itemsize, B * H, B * H * T
    X = BH * T * D * e  # bytes of one [B, H, T, D] tensor (Q, K, V, O, dO, dQ, dK, dV)
    n = visible_tiles(T, T, bq, bk, causal=causal)
    kv_reads = 2 * X if cached else BH * n * bk * 2 * D * e
    q_reads = 2 * X + 2 * STAT_BYTES * R if cached else BH * n * bq * (2 * D * e + 2 * STAT_BYTES)
    out = {"fwd": 2 * X + STAT_BYTES * R + kv_reads, "delta": 0, "dq": 0, "dkdv": 0}
    if pass_ == "fwd_bwd":
        out["delta"] = 2 * X + STAT_BYTES * R
        out["dq"] = 3 * X + 2 * STAT_BYTES * R + kv_reads
        out["dkdv"] = 4 * X + q_reads
    elif pass_ != "fwd":
        raise ValueError(f"pass_: expected 'fwd' or 'fwd_bwd', got {pass_!r}")
    out["total"] = out["fwd"] + out["delta"] + out["dq"] + out["dkdv"]
    return out


def roofline(flops: float, nbytes: float, hw: dict) -> dict:
    """``t = max(flops/peak, bytes/bw)``, the bound that applies, and the predicted TFLOP/s."""
    t_c, t_m = flops / hw["peak_flops"], nbytes / hw["hbm_bw"]
    t = max(t_c, t_m)
    return {"t_compute_s": t_c, "t_memory_s": t_m, "time_s": t, "bound": "compute" if t_c >= t_m else "memory",
            "tflops": flops / t / 1e12, "intensity": flops / nbytes,
            "ridge_intensity": hw["peak_flops"] / hw["hbm_bw"]}


def model_point(hw_key: str, T: int, D: int, *, causal: bool, pass_: str, dtype=jnp.bfloat16) -> dict:
    hw = HARDWARE[hw_key]
    B, H = TOTAL_TOKENS // T, HIDDEN // D
    bs = get_block_sizes(hw["kernel_platform"], D, dtype, T, T)
    e = jnp.dtype(dtype).itemsize
    f = attention_flops(B, H, T, D, causal=causal, pass_=pass_)
    by = attention_bytes(B, H, T, D, bs.block_q, bs.block_k, causal=causal, pass_=pass_, itemsize=e)
    by_min = attention_bytes(B, H, T, D, bs.block_q, bs.block_k, causal=causal, pass_=pass_, itemsize=e,
                             cached=True)
    r = roofline(f, by["total"], hw)
    rc = roofline(f, by_min["total"], hw)
    return {"platform": hw_key, "kernel_platform": hw["kernel_platform"], "pass": pass_, "seqlen": T, "batch": B,
            "heads": H, "head_dim": D, "causal": causal, "dtype": jnp.dtype(dtype).name,
            "block_q": bs.block_q, "block_k": bs.block_k,
            "tiles_per_head": visible_tiles(T, T, bs.block_q, bs.block_k, causal=causal),
            "flops": f, "bytes": by["total"], "bytes_breakdown": by, **r,
            "bytes_cached": by_min["total"], "time_cached_s": rc["time_s"], "tflops_cached": rc["tflops"],
            "bound_cached": rc["bound"]}


def grid(platforms) -> list[dict]:
    return [model_point(p, T, D, causal=c, pass_=ps)
            for p in platforms for ps in PASSES for D in HEAD_DIMS for T in SEQLENS for c in (False, True)]


# ----------------------------------------------------------------------------- output

def _table(rows, hw_key, pass_) -> str:
    sel = [r for r in rows if r["platform"] == hw_key and r["pass"] == pass_]
    body = [[r["seqlen"], r["batch"], r["heads"], r["head_dim"], "y" if r["causal"] else "n",
             f"{r['block_q']}x{r['block_k']}", f"{r['flops'] / 1e9:.0f}", f"{r['bytes'] / 2**20:.0f}",
             f"{r['intensity']:.0f}", f"{r['time_s'] * 1e3:.3f}", f"{r['tflops']:.0f}", r["bound"],
             f"{r['tflops_cached']:.0f}"] for r in sel]
    return format_table(["seqlen", "B", "H", "D", "causal", "bq x bk", "GFLOP", "MiB", "FLOP/B", "model ms",
                         "model TF/s", "bound", "TF/s cached"], body)


def _plot(rows, platforms, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PASSES), len(platforms), figsize=(5.5 * len(platforms), 4.2 * len(PASSES)),
                             squeeze=False)
    colors = {64: "tab:blue", 128: "tab:orange", 256: "tab:green"}
    for ci, p in enumerate(platforms):
        hw = HARDWARE[p]
        for ri, ps in enumerate(PASSES):
            ax = axes[ri][ci]
            for D in HEAD_DIMS:
                for causal, ls in ((True, "-"), (False, "--")):
                    sel = [r for r in rows if r["platform"] == p and r["pass"] == ps and r["head_dim"] == D
                           and r["causal"] == causal]
                    ax.plot([r["seqlen"] for r in sel], [r["tflops"] for r in sel], ls, marker="o", ms=3,
                            color=colors[D], label=f"D={D} {'causal' if causal else 'non-causal'}")
            ax.axhline(hw["peak_flops"] / 1e12, color="gray", lw=0.8, ls=":", label="peak bf16")
            for ref in REFERENCE.get(p, []) if ps == "fwd" else []:
                ax.axhline(ref["tflops"], color="black", lw=0.8, ls="-.", label="FA-3 headline (paper)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(SEQLENS), [f"{t // 1024}k" if t >= 1024 else str(t) for t in SEQLENS])
            ax.set_ylim(0, hw["peak_flops"] / 1e12 * 1.08)
            ax.set_xlabel("seqlen (batch = 16k / seqlen, hidden 2048)")
            ax.set_ylabel("predicted TFLOP/s (model)")
            ax.set_title(f"{hw['name']}\n{'forward' if ps == 'fwd' else 'forward + backward'}, bf16", fontsize=9)
            ax.grid(alpha=0.3)
            if ri == 0 and ci == 0:
                ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"Flash attention, predicted TFLOP/s -- {LABEL}; solid causal, dashed non-causal", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platforms", default=",".join(HARDWARE), help=f"comma list of {sorted(HARDWARE)}")
    ap.add_argument("--json-only", action="store_true", help="write the JSON only (no table, no PNG)")
    ap.add_argument("--out-dir", default=os.path.join("results", "bench"))
    args = ap.parse_args(argv)
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    bad = [p for p in platforms if p not in HARDWARE]
    if bad or not platforms:
        ap.error(f"--platforms: unknown {bad}; choose from {sorted(HARDWARE)}")
    rows = grid(platforms)
    payload = {
        "label": LABEL,
        "kind": "model",
        "conventions": {
            "flops_fwd": "4*B*H*T^2*D, halved for causal (softmax not counted)",
            "flops_fwd_bwd": "3.5 * flops_fwd (backward = 2.5x forward, FlashAttention-2/3 convention)",
            "bytes": "see benchmarks/pallas_model.py docstring: Q/O once, K/V re-read per visited [bq,bk] tile "
                     "(fwd, dq); Q/dO/lse/delta re-read per visited tile (dkdv); no cache reuse",
            "bytes_cached": "compulsory traffic only: every tensor read/written once per launch",
            "time": "max(flops / peak_flops, bytes / hbm_bw)",
            "block_sizes": "pallas_kernels.flash_attention.block_sizes.get_block_sizes defaults",
        },
        "grid": {"total_tokens": TOTAL_TOKENS, "hidden": HIDDEN, "seqlens": list(SEQLENS),
                 "head_dims": list(HEAD_DIMS), "causal": [False, True], "passes": list(PASSES), "dtype": "bfloat16"},
        "hardware": {p: HARDWARE[p] for p in platforms},
        "reference": {p: REFERENCE[p] for p in platforms if p in REFERENCE},
        "environment": {"jax": jax.__version__, "python": _platform.python_version()},
        "rows": rows,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, "pallas_model.json")
    write_json(json_path, payload)
    if args.json_only:
        print(f"[{LABEL}] wrote {json_path} ({len(rows)} grid points)")
        return payload
    for p in platforms:
        hw = HARDWARE[p]
        for ps in PASSES:
            print(f"\n=== {LABEL} === {hw['name']} ({hw['kernel_platform']} block sizes), "
                  f"{'forward' if ps == 'fwd' else 'forward+backward'}, bf16; peak {hw['peak_flops'] / 1e12:.0f} "
                  f"TFLOP/s, {hw['hbm_bw'] / 1e12:.3g} TB/s, ridge {hw['peak_flops'] / hw['hbm_bw']:.0f} FLOP/B")
            print(_table(rows, p, ps))
        for ref in REFERENCE.get(p, []):
            print(f"reference (published, not ours): {ref['what']} -- {ref['tflops']:.0f} TFLOP/s [{ref['source']}]")
    png_path = os.path.join(args.out_dir, "pallas_model.png")
    _plot(rows, platforms, png_path)
    print(f"\n[{LABEL}] wrote {json_path} and {png_path}")
    return payload


if __name__ == "__main__":
    main()
