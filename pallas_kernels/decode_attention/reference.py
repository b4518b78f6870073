"""Dense jnp reference for the decode kernels (materialises ``[B, H, T, S]``).

Query ``t`` of row ``b`` (position ``offsets[b] + t``, default ``lengths[b] - T``) sees key ``j``
iff ``j < lengths[b]`` and, with ``causal``, ``j <= offsets[b] + t``.  A row with no visible key
(and no sink) gets ``o = 0``, ``lse = -inf``.
"""

from __future__ import annotations

import jax.numpy as jnp


def decode_reference(q, k, v, lengths, *, offsets=None, scale=None, softcap=None, sinks=None, causal=True):
    """``(o [B, T, H, Dv] in q.dtype, lse [B, T, H] float32)`` over a contiguous ``[B, S, K, D]`` cache."""
    B, T, H, Dk = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    scale = Dk ** -0.5 if scale is None else scale
    lengths = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, S)
    offsets = lengths - T if offsets is None else jnp.asarray(offsets, jnp.int32)
    kr = jnp.repeat(k.astype(jnp.float32), G, axis=2)
    vr = jnp.repeat(v.astype(jnp.float32), G, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kr) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    j = jnp.arange(S)[None, None, :]
    t = jnp.arange(T)[None, :, None]
    vis = j < lengths[:, None, None]
    if causal:
        vis = vis & (j <= offsets[:, None, None] + t)
    s = jnp.where(vis[:, None], s, -jnp.inf)
    m = s.max(-1)
    if sinks is not None:
        m = jnp.maximum(m, sinks.astype(jnp.float32)[None, :, None])
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m[..., None])
    l = p.sum(-1)
    if sinks is not None:
        l = l + jnp.exp(sinks.astype(jnp.float32)[None, :, None] - m)
    safe = jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("bhts,bshd->bthd", p / safe[..., None], vr)
    lse = jnp.where(l > 0, m + jnp.log(safe), -jnp.inf).transpose(0, 2, 1)
    return o.astype(q.dtype), lse


def gather_pages(k_pages, page_table):
    """Contiguous ``[B, max_pages * page_size, K, D]`` view of a paged pool (unallocated pages -> 0)."""
    P, ps = k_pages.shape[:2]
    B, Mp = page_table.shape
    g = k_pages[jnp.maximum(page_table, 0)]                      # [B, Mp, ps, K, D]
    g = jnp.where((page_table >= 0)[:, :, None, None, None], g, 0)
    return g.reshape(B, Mp * ps, *k_pages.shape[2:])
