"""Exact softmax attention: the reference every other implementation is tested against.

"Attention Is All You Need", Vaswani et al., 2017, arXiv:1706.03762, with the
extensions attn_jax supports everywhere.  For query head ``h`` (served by key/value
head ``h // G``, ``G = H / K``: grouped-query attention, Ainslie et al. 2023,
arXiv:2305.13245, computed by grouping, never by repeating K/V):

    s_ij  = scale * q_i . k_j                         (scale defaults to Dk ** -0.5)
    s_ij  = c * tanh(s_ij / c)                        if softcap c is given (Gemma 2)
    s_ij += bias_ij                                   dense array or structured (ALiBi, T5), or
                                                      query-dependent: bias(scale * q_i, i, j)
    s_ij  = -inf where the mask hides (i, j)
    l_i   = sum_j exp(s_ij - m_i) + exp(sink_h - m_i) the sink term only with learned sinks
                                                      ("gpt-oss" style: one logit per head,
                                                      a slot that absorbs probability mass)
    p_ij  = exp(s_ij - m_i) / l_i,  m_i = max(max_j s_ij, sink_h)
    o_i   = sum_j (p_ij * keep_ij / (1 - rate)) v_j   dropout on probabilities, counter-based
                                                      keep mask (attn_jax.core.random)
    lse_i = m_i + log l_i                             float32, -inf for a fully masked row
                                                      without sinks

A query row with no visible key yields a zero output and zero, finite
gradients.  Rows or columns that no (query, key) pair uses are zeroed before
any product, so NaN in padded positions cannot leak.  Computation runs in
float32 (float64 when the inputs are float64); the output has the input dtype.
This is the simplest correct code: it materialises ``[B, H, T, S]``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxtyping import Array

from attn_jax.core import random as aj_random
from attn_jax.core.array_types import ArrayLike, Float
from attn_jax.core.bias import StructuredBias, is_query_dependent
from attn_jax.core.masks import Mask


def _compute_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def dense_bias(bias, T: int, S: int):
    if bias is None:
        return None
    if isinstance(bias, StructuredBias):
        return bias.materialize(T, S)
    return bias


def attention_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                        v: Float[ArrayLike, "B S K Dv"], *, mask: Mask | None = None, bias=None,
                        scale: float | None = None, softcap: float | None = None,
                        sinks: Float[ArrayLike, " H"] | None = None, dropout_rate: float = 0.0, dropout_rng=None,
                        return_lse: bool = False) -> (Float[Array, "B T H Dv"]
                                                      | tuple[Float[Array, "B T H Dv"], Float[Array, "B T H"]]):
    """Exact attention (see module docstring).  Inputs are assumed validated."""
    B, T, H, Dk = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // K
    cdt = _compute_dtype(q.dtype)
    scale = Dk ** -0.5 if scale is None else scale

    visible = None
    if mask is not None:
        visible = jnp.broadcast_to(mask.materialize(T, S), (B, H, T, S))
        # Zero rows/columns no pair uses so NaN padding cannot reach a product.
        q_used = visible.any(axis=3).transpose(0, 2, 1)[..., None]          # [B, T, H, 1]
        kv_used = visible.reshape(B, K, G, T, S).any(axis=(2, 3)).transpose(0, 2, 1)[..., None]  # [B, S, K, 1]
        q = jnp.where(q_used, q, 0)
        k = jnp.where(kv_used, k, 0)
        v = jnp.where(kv_used, v, 0)

    qf = q.astype(cdt).reshape(B, T, K, G, Dk)
    s = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(cdt), precision=lax.Precision.HIGHEST)
    s = s.reshape(B, H, T, S) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if is_query_dependent(bias):       # q_i · E[...] style: materialised from the (zeroed) scaled queries
        q5 = (qf * scale).transpose(0, 2, 3, 1, 4)                                # [B, K, G, T, Dk]
        b = bias.materialize_q(q5, T, S).reshape(B, H, T, S)
    else:
        b = dense_bias(bias, T, S)
    if b is not None:
        s = s + b.astype(cdt)
    if visible is not None:
        s = jnp.where(visible, s, -jnp.inf)

    m = jnp.max(s, axis=-1)
    if sinks is not None:
        sink = sinks.astype(cdt)[None, :, None]
        m = jnp.maximum(m, sink)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))  # any finite shift is exact
    e = jnp.exp(s - m[..., None])  # exp(-inf) = 0 with zero gradient for hidden pairs
    denom = e.sum(axis=-1)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    has_mass = denom > 0
    safe_denom = jnp.where(has_mass, denom, 1.0)
    p = e / safe_denom[..., None]
    if dropout_rate > 0.0:
        seed = aj_random.dropout_seed(dropout_rng)
        keep = aj_random.keep_mask(seed, dropout_rate, jnp.arange(B)[:, None, None, None],
                                   jnp.arange(H)[None, :, None, None], jnp.arange(T)[None, None, :, None],
                                   jnp.arange(S)[None, None, None, :])
        p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
    p = p.reshape(B, K, G, T, S)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(cdt), precision=lax.Precision.HIGHEST)
    o = o.reshape(B, T, H, Dv).astype(q.dtype)
    if not return_lse:
        return o
    lse = jnp.where(has_mass, m + jnp.log(safe_denom), -jnp.inf)  # [B, H, T]
    return o, lse.transpose(0, 2, 1).astype(jnp.float32 if cdt == jnp.float32 else cdt)
