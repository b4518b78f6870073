"""Shared pieces of the variants that need the materialised score block ``[B, H, T, S]``.

Talking heads (mixing across heads before and after the softmax) and the references of CoPE and
selective attention read the whole score matrix; these helpers compute it once, with the layout,
mask, GQA grouping and fully-masked-row conventions of :mod:`attn_jax.softmax.reference`:

* scores ``s[b, h, i, j] = scale * q[b, i, h] . k[b, j, h // G]`` in float32 (float64 for
  float64 inputs), ``G = H / K`` (grouped, K/V never repeated);
* ``visible[b, h, i, j]``: the mask broadcast to ``[B, H, T, S]`` (None: everything visible);
* a softmax whose fully masked rows are exactly zero (value and gradient), optionally with
  per-head sink logits in the denominator;
* rows / columns no pair uses are zeroed before any product (NaN padding cannot leak).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attn_jax.core import validation as V
from attn_jax.core.masks import as_mask

__all__ = ["check_inputs", "visible_pairs", "zero_unused", "scores", "masked_softmax", "mix_values", "compute_dtype"]


def compute_dtype(dtype):
    """float64 for float64 inputs, float32 otherwise."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def check_inputs(q, k, v, mask):
    """Validate ``q [B, T, H, Dk]``, ``k [B, S, K, Dk]``, ``v [B, S, K, Dv]`` and the mask (errors name
    the argument); returns ``(dims, mask as a Mask or None)``."""
    dims = V.check_qkv(q, k, v)
    mask = as_mask(mask)
    if mask is not None:
        mask.check(dims.B, dims.H, dims.T, dims.S)
    return dims, mask


def visible_pairs(mask, B: int, H: int, T: int, S: int):
    """The mask as a boolean ``[B, H, T, S]`` array (None when there is no mask)."""
    if mask is None:
        return None
    return jnp.broadcast_to(mask.materialize(T, S), (B, H, T, S))


def zero_unused(q, k, v, visible):
    """Zero query rows and key/value rows that no visible pair uses (NaN padding cannot leak)."""
    if visible is None:
        return q, k, v
    B, H, T, S = visible.shape
    K = k.shape[2]
    q_used = visible.any(axis=3).transpose(0, 2, 1)[..., None]
    kv_used = visible.reshape(B, K, H // K, T, S).any(axis=(2, 3)).transpose(0, 2, 1)[..., None]
    return jnp.where(q_used, q, 0), jnp.where(kv_used, k, 0), jnp.where(kv_used, v, 0)


def scores(q, k, scale):
    """``scale * q . k`` per query head, ``[B, H, T, S]`` in the compute dtype (GQA by grouping)."""
    B, T, H, Dk = q.shape
    S, K = k.shape[1], k.shape[2]
    cdt = compute_dtype(q.dtype)
    s = jnp.einsum("btkgd,bskd->bkgts", q.astype(cdt).reshape(B, T, K, H // K, Dk), k.astype(cdt),
                   precision=lax.Precision.HIGHEST)
    return s.reshape(B, H, T, S) * scale


def masked_softmax(s, visible, sinks=None):
    """Softmax over the last axis of ``s [B, H, T, S]`` restricted to ``visible``; fully masked rows
    give exact zeros.  ``sinks [H]``: a logit per head added to the denominator only."""
    if visible is not None:
        s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    if sinks is not None:
        sink = sinks.astype(s.dtype)[None, :, None]
        m = jnp.maximum(m, sink)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.exp(s - m[..., None])
    denom = e.sum(axis=-1)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    return e / jnp.where(denom > 0, denom, 1.0)[..., None]


def mix_values(p, v, dtype):
    """``o[b, i, h] = sum_j p[b, h, i, j] v[b, j, h // G]`` as ``[B, T, H, Dv]`` in ``dtype``."""
    B, H, T, S = p.shape
    K, Dv = v.shape[2], v.shape[3]
    o = jnp.einsum("bkgts,bskd->btkgd", p.reshape(B, K, H // K, T, S), v.astype(p.dtype),
                   precision=lax.Precision.HIGHEST)
    return o.reshape(B, T, H, Dv).astype(dtype)
