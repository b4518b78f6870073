"""Exact causal attention on CPU: attn_jax "auto" and "xla" vs jax.nn vs torch SDPA (and reference).

    python -m benchmarks.exact_attention [--seq-lens 128,...,8192] [--bf16-seq-lens 128,...,2048]
                                         [--repeats 5] [--impls auto,xla,jax.nn,torch] [--quick]

B=1, H=8, D=64, causal; float32 at every ``--seq-lens`` T and bfloat16 at every
``--bf16-seq-lens`` T.  For each T: forward, and forward+backward (gradient of ``sum(o * c)``
for a fixed random cotangent ``c`` w.r.t. q, k, v).  The peers of one (dtype, T, mode) are timed
in this process in ``--rounds`` alternating rounds of ``--repeats`` runs each after a warm-up
(``common.time_peers``; median and min of the pooled runs, ``block_until_ready``), so their
ratios share the machine's load.  The
headline is ``auto / min(jax.nn, torch)`` per T (target <= 1.1).  ``auto`` is what
``aj.attention`` picks on CPU (``aj.explain`` is recorded per row: ``dense`` below the dense
budget, the tiled ``xla`` path above).  Memory is XLA's compiled ``temp_size_in_bytes``
(compiling allocates nothing, so it is reported even where running is skipped).  A run is
skipped -- and marked so -- when its compiled footprint would not fit in RAM or the previous
length's time extrapolated by 4.5x exceeds ``--max-seconds``.  torch is timed only if importable
(``torch.set_num_threads(2)``; memory not measured).  Also records ``xla_fwd_1x16k``: one query
over 16384 keys with the xla path (the decode benchmark compares against it).  Writes
``results/bench/exact_attention.{json,png}``.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import attn_jax as aj
from attn_jax import masks
from attn_jax.core.bias import LowRankBias
from attn_jax.softmax import dense as aj_dense
from attn_jax.softmax import xla as aj_xla
from benchmarks import common

B, H, D = 1, 8, 64
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
JAX_IMPLS = ("auto", "xla", "reference", "jax.nn")


def _inputs(T: int, dtype):
    return tuple(jax.random.normal(jax.random.key(i), (B, T, H, D), jnp.float32).astype(dtype) for i in range(4))


def jax_impls():
    def auto_fwd(q, k, v):
        return aj.attention(q, k, v, mask=masks.causal())

    def xla_fwd(q, k, v):
        return aj.attention(q, k, v, mask=masks.causal(), impl="xla")

    def ref_fwd(q, k, v):
        return aj.attention(q, k, v, mask=masks.causal(), impl="reference")

    def jaxnn_fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    return {"auto": auto_fwd, "xla": xla_fwd, "reference": ref_fwd, "jax.nn": jaxnn_fwd}


def low_rank_bias_row(T: int = 8192, repeats: int = 3, out=os.path.join("results", "bench", "low_rank_bias")):
    """Causal ALiBi at ``T`` (B=1, H=8, D=64, float32) given two ways to ``aj.attention`` (auto):
    as its exact rank-2 factors folded into q/k (:func:`attn_jax.positional.alibi_factors`) and as
    the dense ``[1, H, T, T]`` bias array (with its gradient).  Records time (fwd, fwd+bwd) and
    compiled memory (temp and argument bytes) of each; writes ``out.json``."""
    from attn_jax.positional import alibi_factors, alibi_slopes

    q, k, v, c = _inputs(T, jnp.float32)
    slopes = alibi_slopes(H)
    fac = alibi_factors(slopes, T)
    pos = jnp.arange(T, dtype=jnp.float32)
    dense = (-slopes[:, None, None] * jnp.abs(pos[:, None] - pos[None, :]))[None]      # [1, H, T, T]
    variants = {
        "factors": (lambda q, k, v, u, w: aj.attention(q, k, v, bias=LowRankBias(u, w), mask=masks.causal()),
                    (fac.u, fac.v)),
        "dense_bias": (lambda q, k, v, b: aj.attention(q, k, v, bias=b, mask=masks.causal()), (dense,)),
    }
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        peers = {}
        for name, (fwd, extra) in variants.items():
            if mode == "fwd":
                fn, fargs = fwd, (q, k, v, *extra)
            else:
                n = 3 + len(extra)
                fn = (lambda fwd, n: lambda *a: jax.grad(
                    lambda *x: jnp.sum(fwd(*x) * a[-1]), argnums=tuple(range(n)))(*a[:-1]))(fwd, n)
                fargs = (q, k, v, *extra, c)
            mem = common.compiled_memory(fn, *common.abstract(*fargs))
            peers[name] = (jax.jit(fn), fargs, None)
            rows.append({"variant": name, "mode": mode, "T": T, **mem})
        timed = common.time_peers(peers, repeats=repeats, rounds=1)
        for row in rows[-2:]:
            row.update(timed[row["variant"]])
            print(f"low-rank bias T={T} {row['variant']:10s} {mode:7s} median {common.fmt_time(row['median_s']):>10s}"
                  f"  temp {common.fmt_bytes(row['temp_bytes']):>10s}  args {common.fmt_bytes(row['argument_bytes'])}",
                  flush=True)
    payload = {"benchmark": "low_rank_bias", "config": {"B": B, "H": H, "D": D, "T": T, "bias": "causal ALiBi",
                                                        "rank": 2, "repeats": repeats},
               "environment": common.environment(), "rows": rows}
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    common.write_json(out + ".json", payload)
    print(f"wrote {out}.json")
    return payload


def fwd_bwd(fwd):
    def f(q, k, v, c):
        return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32) * c.astype(jnp.float32)),
                        argnums=(0, 1, 2))(q, k, v)

    return f


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def torch_run(torch, T: int, dtype_name: str, mode: str):
    """A zero-argument callable running torch SDPA for one configuration."""
    g = torch.Generator().manual_seed(0)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    q, k, v, c = (torch.randn(B, H, T, D, generator=g).to(tdt) for _ in range(4))
    F = torch.nn.functional
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return run
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)

    def run():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad((o.float() * c.float()).sum(), (q, k, v))
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="128,256,512,1024,2048,4096,8192")
    ap.add_argument("--bf16-seq-lens", default="128,256,512,1024,2048")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per peer per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over the peers (times pooled)")
    ap.add_argument("--quick", action="store_true", help="T in {256, 1024} float32 only, 3 repeats, no plot")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="skip runs predicted to take longer")
    ap.add_argument("--impls", default="auto,xla,jax.nn,torch", help="subset of auto,xla,reference,jax.nn,torch")
    ap.add_argument("--out", default=os.path.join("results", "bench", "exact_attention"))
    ap.add_argument("--low-rank-only", action="store_true",
                    help="only the low-rank-bias row (FlashBias factors vs the dense bias, T=8192)")
    args = ap.parse_args(argv)
    if args.low_rank_only:
        return low_rank_bias_row(repeats=args.repeats)
    parse = lambda s: [int(x) for x in s.split(",") if x]
    plan = {"float32": [256, 1024], "bfloat16": []} if args.quick else {
        "float32": parse(args.seq_lens), "bfloat16": parse(args.bf16_seq_lens)}
    repeats = 3 if args.quick else args.repeats
    wanted = args.impls.split(",")
    env = common.environment()  # load average at the start

    torch = common.torch_or_none() if "torch" in wanted else None
    if "torch" in wanted and torch is None:
        print("note: torch is not importable; torch SDPA is skipped (pip install torch==2.13.0)")
    if torch is not None:
        torch.set_num_threads(2)

    impls = {n: f for n, f in jax_impls().items() if n in wanted}
    ram = _ram_bytes()
    rows = []       # one per (dtype, impl, T, mode)
    last_time = {}  # (dtype, impl, mode) -> seconds at the previous T
    for dname, seq_lens in plan.items():
        for T in seq_lens:
            q, k, v, c = _inputs(T, DTYPES[dname])
            abstract = common.abstract(q, k, v, c)
            chosen = aj.explain(*abstract[:3], mask=masks.causal(), platform="cpu").chosen["cpu"]
            for mode in ("fwd", "fwd+bwd"):
                peers, mode_rows = {}, {}
                for name, fwd in impls.items():
                    fn = fwd if mode == "fwd" else fwd_bwd(fwd)
                    fargs = (q, k, v) if mode == "fwd" else (q, k, v, c)
                    mem = common.compiled_memory(fn, *abstract[:len(fargs)])
                    need = mem["temp_bytes"] + mem["argument_bytes"] + mem["output_bytes"]
                    prev = last_time.get((dname, name, mode))
                    row = {"impl": name, "dtype": dname, "T": T, "mode": mode, **mem, "median_s": None,
                           "min_s": None, "times_s": None, "skipped": None,
                           "auto_chose": chosen if name == "auto" else None}
                    if need > 0.7 * ram:
                        row["skipped"] = f"needs {common.fmt_bytes(need)} > 70% of free RAM {common.fmt_bytes(ram)}"
                    elif prev is not None and prev * 4.5 > args.max_seconds:
                        row["skipped"] = f"predicted {prev * 4.5:.0f} s per run > {args.max_seconds:.0f} s"
                    else:
                        peers[name] = (jax.jit(fn), fargs, None)
                    mode_rows[name] = row
                if torch is not None:
                    prev = last_time.get((dname, "torch", mode))
                    row = {"impl": "torch", "dtype": dname, "T": T, "mode": mode, "temp_bytes": None,
                           "median_s": None, "min_s": None, "times_s": None, "skipped": None}
                    if prev is not None and prev * 4.5 > args.max_seconds:
                        row["skipped"] = f"predicted {prev * 4.5:.0f} s per run > {args.max_seconds:.0f} s"
                    else:
                        peers["torch"] = (torch_run(torch, T, dname, "fwd" if mode == "fwd" else "bwd"), (),
                                          lambda x: x)
                    mode_rows["torch"] = row
                timed = common.time_peers(peers, repeats=repeats, rounds=args.rounds)
                for name, row in mode_rows.items():
                    if name in timed:
                        row.update(timed[name])
                        last_time[(dname, name, mode)] = row["median_s"]
                    else:
                        last_time[(dname, name, mode)] = float("inf")
                    rows.append(row)
                    extra = f"  temp {common.fmt_bytes(row['temp_bytes']):>10s}" if row["temp_bytes"] else ""
                    print(f"{dname:8s} T={T:5d} {name:9s} {mode:7s} median {common.fmt_time(row['median_s']):>10s}"
                          f"  min {common.fmt_time(row['min_s']):>10s}{extra}"
                          + (f"  [-> {row['auto_chose']}]" if row.get("auto_chose") else "")
                          + (f"  [skipped: {row['skipped']}]" if row["skipped"] else ""), flush=True)
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

    table, summary = _summarise(rows, plan)
    print()
    print(table)
    payload = {
        "benchmark": "exact_attention", "config": {"B": B, "H": H, "D": D, "mask": "causal", "repeats": repeats,
                                                   "rounds": args.rounds,
                                                   "seq_lens": plan, "impls": wanted,
                                                   "xla_default_block_table": aj_xla.DEFAULT_BLOCK_TABLE,
                                                   "dense_budget": aj_dense.DENSE_BUDGET},
        "environment": {**env, "load_average_at_end": os.getloadavg()},
        "rows": rows, "summary": summary,
        "xla_fwd_1x16k": {"median_s": dec_t["median_s"], "times_s": dec_t["times_s"], **dec_mem,
                          "shape": {"B": B, "T": 1, "S": S, "H": H, "D": D}},
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    common.write_json(args.out + ".json", payload)
    print(f"\nwrote {args.out}.json")
    if not args.quick:
        _plot(rows, plan, args.out + ".png")
        print(f"wrote {args.out}.png")
    return payload


def _get(rows, impl, dtype, T, mode, key):
    for r in rows:
        if r["impl"] == impl and r["dtype"] == dtype and r["T"] == T and r["mode"] == mode:
            return r.get(key)
    return None


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _best_peer(t):
    peers = [t[i] for i in ("jax.nn", "torch") if t.get(i) is not None]
    return min(peers) if peers else None


def _summarise(rows, plan):
    impls = ("auto", "xla", "reference", "jax.nn", "torch")
    header = ["dtype", "T", "mode", "auto", "xla", "reference", "jax.nn", "torch", "auto/best (median)",
              "auto/best (min)", "xla/best", "auto temp", "jax.nn temp"]
    out, summary = [], []
    f = lambda x: "-" if x is None else f"{x:.2f}x"
    for dname, seq_lens in plan.items():
        for T in seq_lens:
            for mode in ("fwd", "fwd+bwd"):
                t = {i: _get(rows, i, dname, T, mode, "median_s") for i in impls}
                tmin = {i: _get(rows, i, dname, T, mode, "min_s") for i in impls}
                m = {i: _get(rows, i, dname, T, mode, "temp_bytes") for i in impls[:4]}
                s = {"dtype": dname, "T": T, "mode": mode, "time_s": t, "min_time_s": tmin, "temp_bytes": m,
                     "auto_chose": _get(rows, "auto", dname, T, mode, "auto_chose"),
                     "auto_over_best_peer": _ratio(t["auto"], _best_peer(t)),
                     "auto_over_best_peer_min": _ratio(tmin["auto"], _best_peer(tmin)),
                     "xla_over_best_peer": _ratio(t["xla"], _best_peer(t))}
                summary.append(s)
                out.append([dname, T, mode, *(common.fmt_time(t[i]) if t[i] is not None else "-" for i in impls),
                            f(s["auto_over_best_peer"]), f(s["auto_over_best_peer_min"]), f(s["xla_over_best_peer"]),
                            common.fmt_bytes(m["auto"]), common.fmt_bytes(m["jax.nn"])])
    return common.format_table(header, out), summary


def _plot(rows, plan, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    seq = plan["float32"]
    for ax, mode in zip(axes[:2], ("fwd", "fwd+bwd")):
        for impl in ("auto", "xla", "reference", "jax.nn", "torch"):
            pts = [(T, _get(rows, impl, "float32", T, mode, "median_s")) for T in seq]
            pts = [(T, t) for T, t in pts if t is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="median time (s)", title=f"causal fp32 {mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax = axes[2]
    for dname, ts in plan.items():
        for mode, ls in (("fwd", "--"), ("fwd+bwd", "-")):
            pts = []
            for T in ts:
                t = {i: _get(rows, i, dname, T, mode, "median_s") for i in ("auto", "jax.nn", "torch")}
                r = _ratio(t["auto"], _best_peer(t))
                if r is not None:
                    pts.append((T, r))
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker="o", label=f"{dname} {mode}")
    ax.axhline(1.1, color="k", lw=0.8, ls=":", label="target 1.1")
    ax.set(xscale="log", xlabel="T", ylabel="auto / min(jax.nn, torch)", title="auto vs best peer (median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[3]
    for impl in ("auto", "xla", "reference", "jax.nn"):
        for mode, ls in (("fwd", "--"), ("fwd+bwd", "-")):
            pts = [(T, _get(rows, impl, "float32", T, mode, "temp_bytes")) for T in seq]
            pts = [(T, m) for T, m in pts if m]
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker="o", label=f"{impl} {mode}")
    ax.set(xscale="log", yscale="log", xlabel="T", ylabel="compiled temp bytes", title="XLA temp memory (fp32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"Exact causal attention, CPU, B={B} H={H} D={D}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
