"""``impl="pallas"`` of the decode registry: the split-K Pallas decode kernels.

Adapter from a :class:`attn_jax.softmax.decode.problem.DecodeProblem` to
:mod:`pallas_kernels.decode_attention` (Triton when lowered for ``cuda``, Mosaic for
``tpu``): flash-decoding over a contiguous cache, partial ``(o, lse)`` per key split merged by
log-sum-exp, sinks added once in the merge (equations in :mod:`attn_jax.softmax.decode`).
Opt-in (``impl="pallas"``): it has been checked in interpret mode and by lowering, never on
hardware, so ``"auto"`` does not pick it yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def decode_pallas(p, q, k, v, lengths, offset, bias, sinks, dropout_rng):
    from pallas_kernels.decode_attention import decode_attention as kernel

    splits = p.num_splits or max(1, min(16, p.dims.S // 512))

    def branch(platform):
        def run(q, k, v, lengths, offset, sinks):
            o, lse = kernel(q, k, v, lengths, offsets=offset, num_splits=splits, scale=p.scale, softcap=p.softcap,
                            sinks=sinks, causal=p.causal, platform=platform)
            return (o, lse) if p.return_lse else o
        return run

    return jax.lax.platform_dependent(q, k, v, lengths, offset, sinks, cuda=branch("gpu"), tpu=branch("tpu"))


def unsupported(platform: str, p) -> list[str]:
    r = []
    if platform not in ("cuda", "tpu"):
        r.append(f"Pallas kernels need a GPU or TPU (lowering platform '{platform}'); use interpret mode for "
                 "testing (pallas_kernels.decode_attention.decode_attention(..., interpret=True))")
    if jnp.dtype(p.dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
        r.append(f"the Pallas decode kernels take float32/bfloat16/float16, got {jnp.dtype(p.dtype).name}")
    if p.window is not None:
        r.append("window: sliding windows are not implemented in the Pallas decode kernels")
    if p.mask is not None:
        r.append("mask: not supported by the Pallas decode kernels (use impl='direct')")
    if p.bias_kind != "none":
        r.append("bias: the Pallas decode kernels take no bias")
    if p.dropout_rate > 0:
        r.append("dropout: not implemented in the Pallas decode kernels")
    if platform == "cuda" and max(p.dims.Dk, p.dims.Dv) > 256:
        r.append(f"head_dim > 256 exceeds the Triton kernel's register budget (Dk={p.dims.Dk}, Dv={p.dims.Dv})")
    return r


def paged_decode_pallas(pp, q, cache, lengths, offset, bias, sinks):
    from pallas_kernels.decode_attention import paged_decode_attention as kernel

    p = pp.decode

    def branch(platform):
        def run(q, cache, lengths, offset, sinks):
            o, lse = kernel(q, cache.k_pages, cache.v_pages, cache.page_table, lengths, offsets=offset,
                            pages_per_split=pp.pages_per_split, scale=p.scale, softcap=p.softcap, sinks=sinks,
                            causal=p.causal, platform=platform)
            return (o, lse) if p.return_lse else o
        return run

    return jax.lax.platform_dependent(q, cache, lengths, offset, sinks, cuda=branch("gpu"), tpu=branch("tpu"))


def paged_unsupported(platform: str, pp) -> list[str]:
    return unsupported(platform, pp.decode)
