"""`make demo` until the MQAR demo lands: a short end-to-end tour of the API on real computations.

Prints, for a small causal problem: agreement of every registered implementation
with the float64 reference, the dispatch report, a packed-sequence check, the
ALiBi structured bias, sinks, an exact split-key merge, and the compiled
memory and speed of the chunked XLA path against ``jax.nn.dot_product_attention``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import attn_jax as aj
from attn_jax import masks
from attn_jax.core.testing import float64, random_qkv, rel_rmse
from attn_jax.positional import alibi, apply_rope


def _median_time(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main():
    print(f"attn_jax {aj.__version__} on jax {jax.__version__} ({jax.default_backend()})\n")
    q, k, v = random_qkv(jax.random.key(0), B=2, T=256, H=8, K=2, Dk=64)
    q, k = apply_rope(q), apply_rope(k)
    mask = masks.causal() & masks.sliding_window(64)

    with float64():
        q64, k64, v64 = (x.astype(jnp.float64) for x in (q, k, v))
        ref = aj.attention(q64, k64, v64, mask=mask, impl="reference")
    print("1. GQA (8 query heads, 2 kv heads), RoPE, causal sliding window of 64; error vs float64 reference:")
    from attn_jax.softmax import ATTENTION
    for name in ATTENTION.names():
        d = aj.explain(q, k, v, mask=mask, impl=name, platform="cpu")
        if d.chosen["cpu"] != name:
            print(f"   {name:10s} cannot serve on cpu: {'; '.join(d.reasons['cpu'][name])}")
            continue
        o = jax.jit(lambda q, k, v, n=name: aj.attention(q, k, v, mask=mask, impl=n))(q, k, v)
        print(f"   {name:10s} relative RMSE {rel_rmse(o, ref):.2e}")

    print("\n2. What impl='auto' picks on each platform, and why:")
    print("   " + str(aj.explain(q, k, v, mask=mask, softcap=30.0)).replace("\n", "\n   "))

    ids = jnp.array([[1] * 100 + [2] * 120 + [0] * 36, [1] * 256])
    packed = aj.attention(q, k, v, mask=masks.segments(ids) & masks.causal())
    alone = aj.attention(q[:1, 100:220], k[:1, 100:220], v[:1, 100:220], mask=masks.causal())
    print(f"\n3. Packed documents: doc 2 of row 0 vs the same doc alone, max |diff| = "
          f"{float(jnp.abs(packed[0, 100:220] - alone[0]).max()):.2e}; padding output max = "
          f"{float(jnp.abs(packed[0, 220:]).max()):.1f}")

    o_alibi = aj.attention(q, k, v, mask=masks.causal(), bias=alibi(8))
    sinks = jnp.full((8,), 2.0)
    o_sink, lse = aj.attention(q, k, v, mask=masks.causal(), sinks=sinks, return_lse=True)
    on_keys = 1.0 - jnp.exp(2.0 - lse[0, :, 0])  # the sink takes exp(sink - lse) of each row's mass
    print(f"4. ALiBi output norm {float(jnp.linalg.norm(o_alibi)):.2f}; with sink logit 2.0, query 0 puts "
          f"{float(on_keys[0]):.3f} of its mass on real keys, query 255 puts {float(on_keys[-1]):.3f}")

    parts = [aj.attention(q, k[:, a:b], v[:, a:b], return_lse=True) for a, b in ((0, 100), (100, 256))]
    full = aj.attention(q, k, v)
    print(f"5. merge_attention of two key halves vs full attention: max |diff| = "
          f"{float(jnp.abs(aj.merge_attention(parts) - full).max()):.2e}")

    T = 2048
    q, k, v = random_qkv(jax.random.key(1), B=1, T=T, H=8, Dk=64)

    def loss_ours(q, k, v):
        return aj.attention(q, k, v, mask=masks.causal()).sum()

    def loss_jax(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True).sum()

    g_ours = jax.jit(jax.grad(loss_ours, argnums=(0, 1, 2)))
    g_jax = jax.jit(jax.grad(loss_jax, argnums=(0, 1, 2)))
    mem = lambda f: f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes / 2**20
    t_ours, t_jax = _median_time(g_ours, q, k, v, repeats=3), _median_time(g_jax, q, k, v, repeats=3)
    print(f"\n6. Causal forward+backward, B=1 T={T} H=8 D=64 fp32 on this CPU "
          f"(auto -> {aj.explain(q, k, v, mask=masks.causal(), platform='cpu').chosen['cpu']}):")
    print(f"   attn_jax   {t_ours * 1e3:8.1f} ms   temp memory {mem(g_ours):8.1f} MiB")
    print(f"   jax.nn     {t_jax * 1e3:8.1f} ms   temp memory {mem(g_jax):8.1f} MiB")
    print(f"   speedup {t_jax / t_ours:.2f}x, memory ratio {mem(g_jax) / max(mem(g_ours), 1e-9):.1f}x")


if __name__ == "__main__":
    main()
