"""Exact causal attention on CPU: attn_jax "xla" vs reference vs jax.nn vs torch SDPA.

    python -m benchmarks.exact_attention [--seq-lens 1024,2048,...] [--repeats 5] [--quick]

B=1, H=8, D=64, float32, causal.  For each sequence length T: forward, and forward+backward
(gradient of ``sum(o * c)`` for a fixed random cotangent ``c`` w.r.t. q, k, v).  Time is the
median of ``--repeats`` runs after one warm-up (``block_until_ready``); memory is XLA's compiled
``temp_size_in_bytes`` (compiling allocates nothing, so it is reported even where running is
skipped).  A run is skipped -- and marked so -- when its compiled footprint would not fit in
RAM or the previous length's time extrapolated by 4.5x exceeds ``--max-seconds``.  torch is
timed only if importable (``torch.set_num_threads(2)``; memory not measured).  Also records
``xla_fwd_1x16k``: one query over 16384 keys with the xla path (the decode benchmark compares
against it).  Writes ``results/bench/exact_attention.{json,png}``.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import attn_jax as aj
from attn_jax import masks
from attn_jax.softmax import xla as aj_xla
from benchmarks import common

B, H, D = 1, 8, 64


def _inputs(T: int):
    q, k, v, c = (jax.random.normal(jax.random.key(i), (B, T, H, D), jnp.float32) for i in range(4))
    return q, k, v, c


def jax_impls():
    def xla_fwd(q, k, v):
        return aj.attention(q, k, v, mask=masks.causal(), impl="xla")

    def ref_fwd(q, k, v):
        return aj.attention(q, k, v, mask=masks.causal(), impl="reference")

    def jaxnn_fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    return {"xla": xla_fwd, "reference": ref_fwd, "jax.nn": jaxnn_fwd}


def fwd_bwd(fwd):
    def f(q, k, v, c):
        return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v) * c), argnums=(0, 1, 2))(q, k, v)

    return f


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def bench_torch(torch, T: int, repeats: int, mode: str):
    g = torch.Generator().manual_seed(0)
    q, k, v, c = (torch.randn(B, H, T, D, generator=g) for _ in range(4))
    F = torch.nn.functional

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)

        def run():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return torch.autograd.grad((o * c).sum(), (q, k, v))

    return common.time_call(run, repeats=repeats, sync=lambda x: x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="T in {1024, 2048}, 3 repeats, no plot")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="skip runs predicted to take longer")
    ap.add_argument("--impls", default="xla,reference,jax.nn,torch")
    ap.add_argument("--out", default=os.path.join("results", "bench", "exact_attention"))
    args = ap.parse_args(argv)
    seq_lens = [1024, 2048] if args.quick else [int(s) for s in args.seq_lens.split(",")]
    repeats = 3 if args.quick else args.repeats
    wanted = args.impls.split(",")

    torch = common.torch_or_none() if "torch" in wanted else None
    if "torch" in wanted and torch is None:
        print("note: torch is not importable; torch SDPA is skipped (pip install torch==2.13.0)")
    if torch is not None:
        torch.set_num_threads(2)

    impls = {n: f for n, f in jax_impls().items() if n in wanted}
    ram = _ram_bytes()
    rows = []       # one per (impl, T, mode)
    last_time = {}  # (impl, mode) -> seconds at the previous T
    for T in seq_lens:
        q, k, v, c = _inputs(T)
        abstract = common.abstract(q, k, v, c)
        for name, fwd in impls.items():
            for mode in ("fwd", "fwd+bwd"):
                fn = fwd if mode == "fwd" else fwd_bwd(fwd)
                fargs = (q, k, v) if mode == "fwd" else (q, k, v, c)
                mem = common.compiled_memory(fn, *abstract[:len(fargs)])
                need = mem["temp_bytes"] + mem["argument_bytes"] + mem["output_bytes"]
                prev = last_time.get((name, mode))
                row = {"impl": name, "T": T, "mode": mode, **mem, "median_s": None, "times_s": None,
                       "skipped": None}
                if need > 0.7 * ram:
                    row["skipped"] = f"needs {common.fmt_bytes(need)} > 70% of free RAM {common.fmt_bytes(ram)}"
                elif prev is not None and prev * 4.5 > args.max_seconds:
                    row["skipped"] = f"predicted {prev * 4.5:.0f} s per run > {args.max_seconds:.0f} s"
                else:
                    r = common.time_call(jax.jit(fn), *fargs, repeats=repeats)
                    row.update(median_s=r["median_s"], times_s=r["times_s"])
                    last_time[(name, mode)] = r["median_s"]
                if row["skipped"]:
                    last_time[(name, mode)] = float("inf")
                rows.append(row)
                print(f"T={T:6d} {name:10s} {mode:8s} time {common.fmt_time(row['median_s']):>12s}  "
                      f"temp {common.fmt_bytes(row['temp_bytes']):>10s}" + (
                          f"  [skipped: {row['skipped']}]" if row["skipped"] else ""), flush=True)
        if torch is not None:
            for mode in ("fwd", "fwd+bwd"):
                prev = last_time.get(("torch", mode))
                row = {"impl": "torch", "T": T, "mode": mode, "temp_bytes": None, "median_s": None,
                       "times_s": None, "skipped": None}
                if prev is not None and prev * 4.5 > args.max_seconds:
                    row["skipped"] = f"predicted {prev * 4.5:.0f} s per run > {args.max_seconds:.0f} s"
                else:
                    r = bench_torch(torch, T, repeats, "fwd" if mode == "fwd" else "bwd")
                    row.update(median_s=r["median_s"], times_s=r["times_s"])
                    last_time[("torch", mode)] = r["median_s"]
                rows.append(row)
                print(f"T={T:6d} {'torch':10s} {mode:8s} time {common.fmt_time(row['median_s']):>12s}", flush=True)
        del q, k, v, c

    # Decode-relevant point: one query over 16k keys.
    S = 16384
    q1 = jax.random.normal(jax.random.key(0), (B, 1, H, D))
    kk = jax.random.normal(jax.random.key(1), (B, S, H, D))
    vv = jax.random.normal(jax.random.key(2), (B, S, H, D))
    dec = jax.jit(lambda q, k, v: aj.attention(q, k, v, mask=masks.causal(), impl="xla"))
    dec_t = common.time_call(dec, q1, kk, vv, repeats=max(repeats, 5))
    dec_mem = common.compiled_memory(lambda q, k, v: aj.attention(q, k, v, mask=masks.causal(), impl="xla"),
                                     *common.abstract(q1, kk, vv))
    print(f"xla_fwd_1x16k: {common.fmt_time(dec_t['median_s'])}, temp {common.fmt_bytes(dec_mem['temp_bytes'])}")

    table, summary = _summarise(rows, seq_lens)
    print()
    print(table)
    payload = {
        "benchmark": "exact_attention", "config": {"B": B, "H": H, "D": D, "dtype": "float32", "mask": "causal",
                                                   "repeats": repeats, "seq_lens": seq_lens,
                                                   "xla_default_blocks": dict(aj_xla.DEFAULT_BLOCK_SIZES)},
        "environment": common.environment(), "rows": rows, "summary": summary,
        "xla_fwd_1x16k": {"median_s": dec_t["median_s"], "times_s": dec_t["times_s"], **dec_mem,
                          "shape": {"B": B, "T": 1, "S": S, "H": H, "D": D}},
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    common.write_json(args.out + ".json", payload)
    print(f"\nwrote {args.out}.json")
    if not args.quick:
        _plot(rows, seq_lens, args.out + ".png")
        print(f"wrote {args.out}.png")
    return payload


def _get(rows, impl, T, mode, key):
    for r in rows:
        if r["impl"] == impl and r["T"] == T and r["mode"] == mode:
            return r.get(key)
    return None


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _summarise(rows, seq_lens):
    header = ["T", "mode", "xla", "reference", "jax.nn", "torch", "jax.nn/xla", "torch/xla",
              "xla temp", "ref temp", "jax.nn temp", "ref/xla temp", "jax.nn/xla temp"]
    out, summary = [], []
    for T in seq_lens:
        for mode in ("fwd", "fwd+bwd"):
            t = {i: _get(rows, i, T, mode, "median_s") for i in ("xla", "reference", "jax.nn", "torch")}
            m = {i: _get(rows, i, T, mode, "temp_bytes") for i in ("xla", "reference", "jax.nn")}
            s = {"T": T, "mode": mode, "time_s": t, "temp_bytes": m,
                 "speedup_vs_jax_nn": _ratio(t["jax.nn"], t["xla"]),
                 "time_ratio_vs_torch": _ratio(t["xla"], t["torch"]),
                 "temp_ratio_reference_over_xla": _ratio(m["reference"], m["xla"]),
                 "temp_ratio_jax_nn_over_xla": _ratio(m["jax.nn"], m["xla"])}
            summary.append(s)
            f = lambda x: "-" if x is None else f"{x:.2f}x"
            out.append([T, mode, *(common.fmt_time(t[i]) for i in ("xla", "reference", "jax.nn", "torch")),
                        f(s["speedup_vs_jax_nn"]), f(_ratio(t["torch"], t["xla"])),
                        *(common.fmt_bytes(m[i]) for i in ("xla", "reference", "jax.nn")),
                        f(s["temp_ratio_reference_over_xla"]), f(s["temp_ratio_jax_nn_over_xla"])])
    return common.format_table(header, out), summary


def _plot(rows, seq_lens, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, mode in zip(axes[:2], ("fwd", "fwd+bwd")):
        for impl in ("xla", "reference", "jax.nn", "torch"):
            pts = [(T, _get(rows, impl, T, mode, "median_s")) for T in seq_lens]
            pts = [(T, t) for T, t in pts if t is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="median time (s)", title=f"causal {mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax = axes[2]
    for impl in ("xla", "reference", "jax.nn"):
        for mode, ls in (("fwd", "--"), ("fwd+bwd", "-")):
            pts = [(T, _get(rows, impl, T, mode, "temp_bytes")) for T in seq_lens]
            pts = [(T, m) for T, m in pts if m]
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker="o", label=f"{impl} {mode}")
    ax.set(xscale="log", yscale="log", xlabel="T", ylabel="compiled temp bytes", title="XLA temp memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"Exact causal attention, CPU, B={B} H={H} D={D} fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
