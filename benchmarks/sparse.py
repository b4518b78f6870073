"""Block-sparse attention on CPU: time against density, speedup and overhead, MoBA against exact attention.

    python -m benchmarks.sparse [--seq=16384] [--moba-seqs=4096] [--heads=4] [--head-dim=64] [--block=256]
                                [--repeats=5]

1. **Engine vs density** (``T = --seq``, forward): :func:`attn_jax.sparse.block_sparse_attention` with
   random block lists of ``n_sel`` distinct key blocks per query block (shared by the heads, the
   diagonal block included, causal), for several densities ``n_sel / nk``; a least-squares line
   ``time = a + b * density`` is fitted (``b``: the slope; ``a / time(10%)``: the fixed cost).  The
   static path (``aj.attention(mask=aj.sparse.block_mask(layout), impl="xla")``, tile engine of
   :mod:`attn_jax.softmax.xla`, same layouts, ``block_q = block_k = --block``) is timed beside it.
2. **Speedup at 10% density** against the dense chunked exact path at the same ``T``:
   ``aj.attention(q, k, v, mask=causal(), impl="xla")`` (its default tiles).  Target (issue 15): >= 5x.
3. **Overhead**: the engine at 10% density against dense attention restricted to the same FLOPs --
   ``impl="xla"`` without a mask over the first ``n_sel * block`` keys (every query block does
   ``n_sel`` full tiles, contiguous).  Target: <= 1.5x.
4. **MoBA and NSA vs exact** (``T in --moba-seqs``, forward + backward of ``sum(o * w)``):
   ``aj.sparse.moba(block_size=512, top_k=3)`` and ``aj.sparse.nsa`` (the paper's sizes: l=32, d=16,
   l'=64, n=16, w=512; gates 1/3) against causal ``impl="xla"``.  MoBA routes per token and the
   engine visits the union of a query block's token choices, so two inputs are timed: ``random``
   (i.i.d. normal q: diverse routing, the union covers almost every causal block) and ``coherent``
   (q = 0.3 x noise + a direction shared by each run of 64 tokens: neighbouring tokens agree, as
   they tend to in trained models); the fraction of tiles visited is reported beside the time.

Median of ``--repeats`` runs after one warm-up (the peers of each comparison in alternating rounds,
:func:`benchmarks.common.time_peers`); the process CPU time of every timed call is recorded too,
since the development machine is shared (a high CPU/wall ratio means the cores were ours).
Writes ``results/bench/sparse.json`` (``--out`` to name another file).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import attn_jax as aj
from attn_jax import masks
from attn_jax.sparse import block_sparse_attention, block_sparse_tile_count, moba, nsa
from attn_jax.sparse.moba import moba_gate, moba_lists
from benchmarks.common import environment, format_table, results_dir, time_call, time_peers, write_json


def _cpu_time(fn, *args, repeats: int) -> float:
    """Median process CPU seconds of ``fn(*args)`` (after the timing runs have warmed it up)."""
    return time_call(fn, *args, repeats=repeats, warmup=0)["cpu_median_s"]


def _lists(rng, nq: int, nk: int, n_sel: int, heads: int) -> np.ndarray:
    """Causal random lists: the diagonal block plus ``n_sel - 1`` distinct earlier blocks (fewer when
    the row has fewer), ``-1`` padded; one list per query block, shared by the heads."""
    idx = np.full((1, heads, nq, n_sel), -1, np.int32)
    for a in range(nq):
        earlier = rng.permutation(a)[:n_sel - 1]
        row = np.concatenate([[a], earlier]).astype(np.int32)
        idx[0, :, a, :len(row)] = row
    return idx


def _layout(idx: np.ndarray, nk: int) -> np.ndarray:
    lay = np.zeros(idx.shape[2:3] + (nk,), bool)
    for a, row in enumerate(idx[0, 0]):
        lay[a, row[row >= 0]] = True
    return lay


def bench_density(args, q, k, v, peers_log):
    T, bs = args.seq, args.block
    nq = nk = T // bs
    rng = np.random.default_rng(0)
    rows = []
    engine = jax.jit(lambda q, k, v, idx: block_sparse_attention(q, k, v, idx, block_size=bs, causal=True))
    for frac in args.densities:
        n_sel = max(1, int(round(frac * nk)))
        idx = jnp.asarray(_lists(rng, nq, nk, n_sel, args.heads))
        mask = aj.sparse.block_mask(_layout(np.asarray(idx), nk), bs) & masks.causal()
        static = jax.jit(lambda q, k, v, mask=mask: aj.attention(q, k, v, mask=mask, impl="xla"))
        # aj.attention picks its own tiles (256 at this T); the layout's block is --block, so the tile
        # engine visits exactly the layout's tiles when they agree
        t = time_peers({"engine": (engine, (q, k, v, idx), None), "static": (static, (q, k, v), None)},
                       repeats=args.repeats, rounds=1)
        tiles = int(jax.jit(lambda q, k, v, idx: block_sparse_tile_count(q, k, v, idx, block_size=bs,
                                                                          causal=True))(q, k, v, idx))
        density = float(np.asarray(_layout(np.asarray(idx), nk)).sum() / (nq * nk))
        rows.append({"n_sel": n_sel, "density": density, "tiles_visited": tiles,
                     "engine_s": t["engine"]["median_s"], "static_s": t["static"]["median_s"],
                     "engine_cpu_s": _cpu_time(engine, q, k, v, idx, repeats=2),
                     "static_cpu_s": _cpu_time(static, q, k, v, repeats=2)})
        print(f"density {density:.3f} (n_sel={n_sel}): engine {rows[-1]['engine_s'] * 1e3:.0f} ms, "
              f"static {rows[-1]['static_s'] * 1e3:.0f} ms", flush=True)
    fits = {}
    for name in ("engine", "static"):
        x = np.array([r["density"] for r in rows])
        y = np.array([r[f"{name}_s"] for r in rows])
        b, a = np.polyfit(x, y, 1)
        pred = a + b * x
        r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30)
        fits[name] = {"slope_s_per_density": float(b), "intercept_s": float(a), "r2": float(r2),
                      "intercept_over_time_at_10pct": float(a / (a + 0.1 * b))}
    return rows, fits


def bench_speedup(args, q, k, v):
    T, bs = args.seq, args.block
    nq = nk = T // bs
    n_sel = max(1, int(round(0.1 * nk)))
    idx = jnp.asarray(_lists(np.random.default_rng(1), nq, nk, n_sel, args.heads))
    engine = jax.jit(lambda q, k, v, idx: block_sparse_attention(q, k, v, idx, block_size=bs, causal=True))
    dense = jax.jit(lambda q, k, v: aj.attention(q, k, v, mask=masks.causal(), impl="xla"))
    width = n_sel * bs
    same_flops = jax.jit(lambda q, k, v: aj.attention(q, k[:, :width], v[:, :width], impl="xla"))
    t = time_peers({"engine_10pct": (engine, (q, k, v, idx), None), "dense_causal_xla": (dense, (q, k, v), None),
                    "dense_same_flops": (same_flops, (q, k, v), None)}, repeats=args.repeats, rounds=2)
    out = {n: {"median_s": r["median_s"], "min_s": r["min_s"]} for n, r in t.items()}
    out["engine_10pct"]["cpu_s"] = _cpu_time(engine, q, k, v, idx, repeats=2)
    out["dense_causal_xla"]["cpu_s"] = _cpu_time(dense, q, k, v, repeats=2)
    out["dense_same_flops"]["cpu_s"] = _cpu_time(same_flops, q, k, v, repeats=2)
    out["n_sel"] = n_sel
    out["density"] = float(_layout(np.asarray(idx), nk).sum() / (nq * nk))
    out["speedup_vs_dense_causal"] = t["dense_causal_xla"]["median_s"] / t["engine_10pct"]["median_s"]
    out["overhead_vs_same_flops"] = t["engine_10pct"]["median_s"] / t["dense_same_flops"]["median_s"]
    print(f"10%: engine {out['engine_10pct']['median_s'] * 1e3:.0f} ms, dense causal "
          f"{out['dense_causal_xla']['median_s'] * 1e3:.0f} ms (x{out['speedup_vs_dense_causal']:.2f}), same-FLOPs "
          f"dense {out['dense_same_flops']['median_s'] * 1e3:.0f} ms (overhead x{out['overhead_vs_same_flops']:.2f})",
          flush=True)
    return out


def bench_moba(args):
    rows = []
    for T, routing in ((T, r) for T in args.moba_seqs for r in ("random", "coherent")):
        key = jax.random.key(T)
        kq, kk, kv, kw, kr = jax.random.split(key, 5)
        shape = (1, T, args.heads, args.head_dim)
        q, k, v, w = (jax.random.normal(x, shape, jnp.float32) for x in (kq, kk, kv, kw))
        if routing == "coherent":
            shared = jax.random.normal(kr, (1, -(-T // 64), args.heads, args.head_dim))
            q = 0.3 * q + jnp.repeat(shared, 64, axis=1)[:, :T]

        def fwd_bwd(fn):
            return jax.jit(jax.value_and_grad(lambda q, k, v: (fn(q, k, v) * w).sum(), argnums=(0, 1, 2)))

        peers = {"exact_causal_xla": (fwd_bwd(lambda q, k, v: aj.attention(q, k, v, mask=masks.causal(),
                                                                          impl="xla")), (q, k, v), None)}
        for bq in args.moba_block_q:
            peers[f"moba_block_q{bq}"] = (fwd_bwd(lambda q, k, v, bq=bq: moba(q, k, v, block_size=args.moba_block,
                                                                              top_k=args.moba_top_k, block_q=bq)),
                                          (q, k, v), None)
        gates = jnp.full(shape[:3] + (3,), 1 / 3, jnp.float32)
        if routing == "random":
            peers["nsa"] = (fwd_bwd(lambda q, k, v: nsa(q, k, v, gates)), (q, k, v), None)
        t = time_peers(peers, repeats=args.repeats, rounds=1)
        row = {"T": T, "routing": routing, "block_size": args.moba_block, "top_k": args.moba_top_k,
               "exact_s": t["exact_causal_xla"]["median_s"],
               "exact_cpu_s": _cpu_time(peers["exact_causal_xla"][0], q, k, v, repeats=1)}
        if "nsa" in t:
            row["nsa_s"] = t["nsa"]["median_s"]
            row["nsa_speedup"] = row["exact_s"] / row["nsa_s"]
            row["nsa_cpu_s"] = _cpu_time(peers["nsa"][0], q, k, v, repeats=1)
        nb = -(-T // args.moba_block)
        for bq in args.moba_block_q:
            idx, slot = moba_lists(moba_gate(q, k, block_size=args.moba_block, top_k=args.moba_top_k), bq)
            tiles = int(block_sparse_tile_count(q, k, v, idx, block_size=args.moba_block, block_q=bq, slot_mask=slot,
                                                causal=True))
            row[f"moba_block_q{bq}_s"] = t[f"moba_block_q{bq}"]["median_s"]
            row[f"moba_block_q{bq}_speedup"] = row["exact_s"] / row[f"moba_block_q{bq}_s"]
            row[f"moba_block_q{bq}_cpu_s"] = _cpu_time(peers[f"moba_block_q{bq}"][0], q, k, v, repeats=1)
            # fraction of the (query block x key block) tiles visited, against the causal half
            row[f"moba_block_q{bq}_tile_fraction"] = tiles / ((-(-T // bq)) * nb)
        row["token_density"] = float(np.asarray(moba_gate(q, k, block_size=args.moba_block,
                                                          top_k=args.moba_top_k)).mean())
        rows.append(row)
        print("moba", row, flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--densities", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.1, 0.2, 0.4])
    p.add_argument("--moba-seqs", type=lambda s: [int(x) for x in s.split(",")], default=[4096])
    p.add_argument("--moba-block", type=int, default=512)
    p.add_argument("--moba-top-k", type=int, default=3)
    p.add_argument("--moba-block-q", type=lambda s: [int(x) for x in s.split(",")], default=[64, 512])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip", type=lambda s: s.split(","), default=[])
    p.add_argument("--out", default="sparse.json", help="file name under results/bench/")
    args = p.parse_args(argv)

    env = environment()
    shape = (1, args.seq, args.heads, args.head_dim)
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, shape, jnp.float32) for x in (kq, kk, kv))
    out = {"environment": env, "config": vars(args), "model": "CPU measurements (XLA:CPU), not a roofline"}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if "density" not in args.skip:
        out["density_sweep"], out["fits"] = bench_density(args, q, k, v, None)
    if "speedup" not in args.skip:
        out["ten_percent"] = bench_speedup(args, q, k, v)
    if "moba" not in args.skip:
        out["moba"] = bench_moba(args)
    out["total_wall_s"] = time.perf_counter() - wall0
    out["total_cpu_s"] = time.process_time() - cpu0
    out["load_average_at_end"] = list(__import__("os").getloadavg())

    if "density_sweep" in out:
        print(format_table(("density", "n_sel", "tiles", "engine ms", "static ms"),
                           [(f"{r['density']:.3f}", r["n_sel"], r["tiles_visited"], f"{r['engine_s'] * 1e3:.0f}",
                             f"{r['static_s'] * 1e3:.0f}") for r in out["density_sweep"]]))
        print("fits:", out["fits"])
    path = f"{results_dir()}/{args.out}"
    write_json(path, out)
    print("wrote", path)


if __name__ == "__main__":
    main()
