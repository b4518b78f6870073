"""MLA vs MHA vs GQA: KV-cache bytes per token and the decode-step time of the whole layer.

    python -m benchmarks.mla [--seq=4096] [--heads=16] [--head_dim=64] [--gqa_kv_heads=4] [--repeats=7]

Equal query heads ``H`` and head dim ``d_h`` (``d_model = H d_h``).  MLA uses DeepSeek-V2's
ratios (arXiv:2405.04434, Table 1 / Sec. 2.1): ``d_c = 4 d_h``, ``d^R = d_h / 2``, one shared
rotary key, so its cache holds ``4.5 d_h`` elements per token against MHA's ``2 H d_h`` and
GQA's ``2 K d_h``.  Cache bytes per token are read from the caches ``init_cache`` builds (the
same ratio for every dtype).

Decode step: one token through the jitted layer (projections, cache write, attention over a
cache of ``seq`` positions, output projection), cache donated and its fill level traced; MLA
attends in the absorbed form (MQA over the latent rows).  Median of ``repeats`` runs after
warm-up, the three layers timed in alternating rounds in one process.  Writes
``results/bench/mla.json`` and ``mla.png``.  Target (issue 14): MLA cache bytes/token <= 1/4 of
MHA's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.nn import MultiHeadAttention
from attn_jax.nn.mla import MultiHeadLatentAttention
from benchmarks.common import environment, format_table, results_dir, write_json


def _build(cls, *args, **kw):
    """``cls(*args, **kw)`` with its initialisers compiled as one program (eager init compiles
    every parameter shape separately)."""
    make = lambda: cls(*args, rngs=nnx.Rngs(0), **kw)  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(make())[1])())


def _bytes_per_token(cache) -> int:
    leaves = [x for x in jax.tree.leaves(cache) if x.ndim >= 3]      # the buffers, not the fill levels
    B, S = leaves[0].shape[:2]
    return sum(x.nbytes for x in leaves) // (B * S)


def _filled(cache, fill: int):
    """``cache`` with random contents and every row filled to ``fill`` positions."""
    keys = iter(jax.random.split(jax.random.key(1), 8))
    cache = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype) if x.ndim >= 3 else x, cache)
    return cache.replace(lengths=jnp.full_like(cache.lengths, fill))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--gqa_kv_heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    B, S, H, dh, R = args.batch, args.seq, args.heads, args.head_dim, args.repeats
    d = H * dh
    layers = {
        "mha": _build(MultiHeadAttention, d, H, head_dim=dh),
        f"gqa(K={args.gqa_kv_heads})": _build(MultiHeadAttention, d, H, num_kv_heads=args.gqa_kv_heads, head_dim=dh),
        "mla": _build(MultiHeadLatentAttention, d, H, head_dim=dh, kv_rank=4 * dh, rope_head_dim=dh // 2),
    }
    warmup = 2
    start = S - args.rounds * (warmup + R)        # every step writes one token: the caches end full
    x = jax.random.normal(jax.random.key(0), (B, 1, d), jnp.float32)
    results = {"config": dict(B=B, S=S, H=H, head_dim=dh, d_model=d, gqa_kv_heads=args.gqa_kv_heads,
                              mla_kv_rank=4 * dh, mla_rope_head_dim=dh // 2, dtype="float32", repeats=R,
                              rounds=args.rounds, warmup=warmup),
               "environment": environment(), "layers": {}}
    steps, caches, times = {}, {}, {n: [] for n in layers}
    for name, m in layers.items():
        graphdef, state = nnx.split(m)
        steps[name] = jax.jit(lambda state, x, cache, g=graphdef: nnx.merge(g, state)(x, cache=cache),
                              donate_argnums=2)
        caches[name] = (state, _filled(m.init_cache(B, S, jnp.float32), start))
        bpt = {str(jnp.dtype(dt)): _bytes_per_token(m.init_cache(1, 8, dt)) for dt in (jnp.float32, jnp.bfloat16)}
        results["layers"][name] = {"cache_bytes_per_token": bpt, "cache_elements_per_token": bpt["float32"] // 4}
    for _ in range(args.rounds):
        for name in layers:
            state, cache = caches[name]
            for i in range(warmup + R):
                t0 = time.perf_counter()
                y, cache = steps[name](state, x, cache)
                jax.block_until_ready((y, cache))
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
            caches[name] = (state, cache)
    mha_bytes = results["layers"]["mha"]["cache_bytes_per_token"]["float32"]
    mha_time = statistics.median(times["mha"])
    rows = []
    for name in layers:
        r = results["layers"][name]
        assert int(caches[name][1].lengths[0]) == S
        r["decode_step"] = {"median_s": statistics.median(times[name]), "min_s": min(times[name]),
                            "times_s": times[name]}
        r["cache_bytes_ratio_vs_mha"] = r["cache_bytes_per_token"]["float32"] / mha_bytes
        r["decode_step_ratio_vs_mha"] = r["decode_step"]["median_s"] / mha_time
        rows.append([name, r["cache_elements_per_token"], r["cache_bytes_per_token"]["bfloat16"],
                     f"{r['cache_bytes_ratio_vs_mha']:.3f}", f"{r['decode_step']['median_s'] * 1e3:.2f} ms",
                     f"{r['decode_step_ratio_vs_mha']:.2f}x"])
    ratio = results["layers"]["mla"]["cache_bytes_ratio_vs_mha"]
    results["target"] = {"mla_cache_bytes_ratio_vs_mha": ratio, "at_most": 0.25, "met": ratio <= 0.25}
    print(f"B={B} S={S} H={H} d_h={dh} (d_model={d}); decode step = one token through the jitted layer, float32, "
          f"median of {args.rounds}x{R}")
    print(format_table(["layer", "cache elems/token", "bf16 bytes/token", "bytes vs MHA", "decode step",
                        "step vs MHA"], rows))
    print(f"target: MLA cache bytes/token <= 1/4 of MHA's: {ratio:.3f} ({'met' if ratio <= 0.25 else 'NOT met'})")
    path = f"{results_dir()}/mla.json"
    write_json(path, results)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {path} (matplotlib missing: no plot)")
        return results
    names = list(layers)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(names, [results["layers"][n]["cache_bytes_per_token"]["bfloat16"] for n in names])
    axes[0].set_ylabel("KV-cache bytes / token (bf16, one layer)")
    axes[1].bar(names, [results["layers"][n]["decode_step"]["median_s"] * 1e3 for n in names])
    axes[1].set_ylabel(f"decode step (ms, {jax.default_backend()}, S={S})")
    fig.suptitle(f"MLA vs MHA vs GQA at H={H}, d_h={dh}")
    fig.tight_layout()
    fig.savefig(f"{results_dir()}/mla.png", dpi=120)
    print(f"wrote {path} and {results_dir()}/mla.png")
    return results


if __name__ == "__main__":
    main()
