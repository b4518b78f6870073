"""Dense reference for the flash-attention kernels (same arguments, materialises ``[B, H, T, S]``).

It computes exactly the function documented in :mod:`pallas_kernels.flash_attention`
(no tiling, no block lists) and is differentiated by JAX's autodiff, so kernel tests can check
values and every gradient without importing attn_jax.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash_attention import dropout_keep, evaluate_terms


def flash_attention_reference(q, k, v, *, bias=None, alibi_slopes=None, alibi_offset=None, sinks=None,
                              q_segment_ids=None, kv_segment_ids=None, mask_terms=(), scale=None, softcap=None,
                              dropout_rate=0.0, dropout_seed=None, **unused):
    """``(o [B, T, H, Dv], lse [B, T, H])``; block-size / platform keywords are ignored."""
    B, T, H, Dk = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    scale = Dk ** -0.5 if scale is None else scale
    i = jnp.arange(T)[:, None]
    j = jnp.arange(S)[None, :]
    vis = jnp.ones((T, S), bool)
    t = evaluate_terms(tuple(mask_terms), i, j)
    if t is not None:
        vis = vis & t
    vis = jnp.broadcast_to(vis, (B, H, T, S))
    if q_segment_ids is not None or kv_segment_ids is not None:
        qs = jnp.ones((B, T), jnp.int32) if q_segment_ids is None else q_segment_ids
        ks = qs if kv_segment_ids is None else kv_segment_ids
        vis = vis & ((qs[:, None, :, None] == ks[:, None, None, :]) & (qs[:, None, :, None] != 0))
    kr = jnp.repeat(k.astype(jnp.float32), G, axis=2)
    vr = jnp.repeat(v.astype(jnp.float32), G, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kr, precision=lax.Precision.HIGHEST) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if alibi_slopes is not None:
        off = S - T if alibi_offset is None else alibi_offset
        s = s - alibi_slopes.astype(jnp.float32)[None, :, None, None] * jnp.abs(i + off - j).astype(jnp.float32)
    s = jnp.where(vis, s, -jnp.inf)
    m = s.max(-1)
    if sinks is not None:
        m = jnp.maximum(m, sinks.astype(jnp.float32)[None, :, None])
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.exp(s - m[..., None])
    denom = e.sum(-1)
    if sinks is not None:
        denom = denom + jnp.exp(sinks.astype(jnp.float32)[None, :, None] - m)
    safe = jnp.where(denom > 0, denom, 1.0)
    p = e / safe[..., None]
    if dropout_rate > 0:
        seed = lax.bitcast_convert_type(jnp.asarray(dropout_seed).astype(jnp.uint32), jnp.int32)
        ar = lambda n, ax: jnp.arange(n, dtype=jnp.int32).reshape([-1 if a == ax else 1 for a in range(4)])
        keep = dropout_keep(dropout_rate, seed[0], seed[1], ar(B, 0), ar(H, 1), ar(T, 2), ar(S, 3))
        p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
    o = jnp.einsum("bhts,bshd->bthd", p, vr, precision=lax.Precision.HIGHEST).astype(q.dtype)
    lse = jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf).transpose(0, 2, 1)
    return o, lse
