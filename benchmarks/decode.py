"""Decode-step benchmark: one token against a full 16k KV cache, direct vs split-K vs paged.

    python -m benchmarks.decode [--seq=16384] [--repeats=7]

Measured (CPU, XLA): a jitted ``decode_step`` (cache write + attention, cache donated, fill
levels traced) for B=1, H=K=8, D=64, float32 over a cache of ``seq`` keys, with
``impl="direct"``, ``impl="split_k"`` for a few ``num_splits``, and a paged cache; the
peer is ``aj.attention(q1, k, v, impl="auto")`` — the chunked forward of 1 query over
``seq`` keys — timed in the same process.  Median of ``repeats`` runs after warm-up.
Writes ``results/bench/decode.json``.  Target: decode step <= 1.5x the chunked forward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import attn_jax as aj
from attn_jax.softmax import decode as D
from attn_jax.softmax.kv_cache import KVCache, PagedKVCache
from benchmarks.common import environment, results_dir, time_call, write_json


def _time_steps(step, cache, q, k, v, repeats: int, warmup: int = 2):
    """Median wall time of ``step`` with the (donated) cache threaded through the calls."""
    for _ in range(warmup):
        o, cache = step(q, k, v, cache)
    jax.block_until_ready((o, cache))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        o, cache = step(q, k, v, cache)
        jax.block_until_ready((o, cache))
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}, cache


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--splits", default="4,8,16")
    ap.add_argument("--page_size", type=int, default=256)
    args = ap.parse_args(argv)
    B, H, K, Dh, S, R = 1, 8, 8, 64, args.seq, args.repeats
    warmup = 2
    dt = jnp.float32
    key = jax.random.key(0)
    kq, kk, kv = jax.random.split(key, 3)
    q1 = jax.random.normal(kq, (B, 1, H, Dh), dt)
    k_all = jax.random.normal(kk, (B, S, K, Dh), dt)
    v_all = jax.random.normal(kv, (B, S, K, Dh), dt)
    k1, v1 = k_all[:, -1:], v_all[:, -1:]
    start_len = S - warmup - R  # every step writes one token: the cache ends exactly full

    results = {"config": dict(B=B, H=H, K=K, D=Dh, S=S, dtype="float32", repeats=R, warmup=warmup),
               "environment": environment(), "peer": {}, "decode_step": {}}

    # Peer: the chunked forward of one query over S keys (impl="auto" -> xla on CPU).
    results["peer"]["explain_cpu"] = str(aj.explain(q1, k_all, v_all, impl="auto", platform="cpu"))
    fwd = jax.jit(lambda q, k, v: aj.attention(q, k, v, impl="auto"))
    peer = time_call(fwd, q1, k_all, v_all, repeats=R, warmup=warmup)
    results["peer"]["attention_auto_1xS"] = peer
    print(f"peer aj.attention(impl=auto) 1x{S}: {peer['median_s'] * 1e3:8.2f} ms")

    variants = [("direct", dict(impl="direct"))]
    variants += [(f"split_k/{n}", dict(impl="split_k", num_splits=n)) for n in map(int, args.splits.split(","))]
    for name, kw in variants:
        cache = KVCache(k_all, v_all, jnp.full((B,), start_len, jnp.int32))
        cache = jax.tree.map(jnp.copy, cache)  # the step donates its cache
        step = jax.jit(lambda q, k, v, c, kw=kw: D.decode_step(q, k, v, c, **kw), donate_argnums=3)
        r, cache = _time_steps(step, cache, q1, k1, v1, R, warmup)
        assert int(cache.lengths[0]) == S
        r["ratio_vs_peer"] = r["median_s"] / peer["median_s"]
        results["decode_step"][name] = r
        print(f"decode_step {name:12s}: {r['median_s'] * 1e3:8.2f} ms   ratio vs peer {r['ratio_vs_peer']:.2f}x")

    # The same step as two dispatches: attention (the unused cache output is dead code) and an
    # in-place, donated cache write -- the serving pattern of a separate cache-write kernel.
    cache = jax.tree.map(jnp.copy, KVCache(k_all, v_all, jnp.full((B,), start_len, jnp.int32)))
    attend = jax.jit(lambda q, k, v, c: D.decode_step(q, k, v, c)[0])
    write = jax.jit(lambda k, v, c: c.append(k, v), donate_argnums=2)

    def two_jit(q, k, v, c):
        return attend(q, k, v, c), write(k, v, c)

    r, cache = _time_steps(two_jit, cache, q1, k1, v1, R, warmup)
    assert int(cache.lengths[0]) == S
    r["ratio_vs_peer"] = r["median_s"] / peer["median_s"]
    results["decode_step"]["direct/two_jit"] = r
    print(f"decode_step direct, attention + donated write as two jits: {r['median_s'] * 1e3:8.2f} ms   "
          f"ratio {r['ratio_vs_peer']:.2f}x")

    # Attention only (no cache write) for the direct method, to separate the costs.
    attn_only = jax.jit(lambda q, k, v, n: D.decode_attention(q, k, v, lengths=n, impl="direct"))
    r = time_call(attn_only, q1, k_all, v_all, jnp.full((B,), S, jnp.int32), repeats=R, warmup=warmup)
    r["ratio_vs_peer"] = r["median_s"] / peer["median_s"]
    results["decode_attention_direct_no_write"] = r
    print(f"decode_attention direct (no write): {r['median_s'] * 1e3:8.2f} ms   ratio {r['ratio_vs_peer']:.2f}x")

    # Paged cache: pages of page_size tokens, 16 pages per split (flash-decoding over pages).
    ps = args.page_size
    M = S // ps
    paged = PagedKVCache(k_all.reshape(M, ps, K, Dh), v_all.reshape(M, ps, K, Dh),
                         jnp.arange(M, dtype=jnp.int32)[None], jnp.full((B,), start_len, jnp.int32))
    paged = jax.tree.map(jnp.copy, paged)
    pps = max(1, M // 8)
    step = jax.jit(lambda q, k, v, c: D.decode_step(q, k, v, c, pages_per_split=pps), donate_argnums=3)
    r, paged = _time_steps(step, paged, q1, k1, v1, R, warmup)
    r["ratio_vs_peer"] = r["median_s"] / peer["median_s"]
    results["decode_step"][f"paged/ps{ps}/pps{pps}"] = r
    print(f"decode_step paged (page {ps}, {pps} pages/split): {r['median_s'] * 1e3:8.2f} ms   "
          f"ratio {r['ratio_vs_peer']:.2f}x")

    best = min(results["decode_step"].items(), key=lambda kv: kv[1]["median_s"])
    results["best"] = {"variant": best[0], "ratio_vs_peer": best[1]["ratio_vs_peer"],
                       "direct_ratio_vs_peer": results["decode_step"]["direct"]["ratio_vs_peer"], "target": 1.5}
    path = f"{results_dir()}/decode.json"
    write_json(path, results)
    print(f"best: {best[0]} at {best[1]['ratio_vs_peer']:.2f}x the chunked forward (target <= 1.5x); wrote {path}")


if __name__ == "__main__":
    main()
