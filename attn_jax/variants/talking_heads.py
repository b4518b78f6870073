"""Talking-heads attention: learned mixing across heads before and after the softmax.

"Talking-Heads Attention", Shazeer, Lan, Cheng, Ding, Hou, 2020, arXiv:2003.02436 (§4).  Multi-head
attention keeps its heads apart until the output projection; talking heads insert two learned
``[H, H]`` projections across the heads dimension, one on the logits (before the softmax) and one
on the attention weights (after it):

    J[h]  = scale * Q_h K_{g(h)}^T                              [B, H, T, S] logits (GQA: g(h) = h // G)
    J'[h'] = sum_h J[h] P_l[h, h']                              logits projection
    W[h'] = softmax_j(J'[h'] + mask)                            per mixed head
    W'[h''] = sum_h' W[h'] P_w[h', h'']                         weights projection
    O[h''] = W'[h''] V_{g(h'')}

The paper allows three head counts (``h_k`` for queries/keys, ``h`` for the softmax, ``h_v`` for
the values); here all three are ``H`` (square projections), and the mask is applied to the
softmax heads ``h'`` (a mask without a head axis, the usual case, is the same for all of them).
Identity projections give plain multi-head attention; fully masked rows give zero.

Why the scores are materialised: the logit of head ``h'`` at ``(i, j)`` needs the logits of every
head at ``(i, j)``, and the output of head ``h''`` needs the weights of every head, so neither the
softmax nor the value product separates by head as :func:`attn_jax.attention` (and every flash
kernel) requires.  A tiled kernel would have to hold all ``H`` heads of a ``(bq, bk)`` tile at once
and make the post-softmax mix exact with the online-softmax rescaling of every head; that kernel is
not written.  So the only form is the dense one (``[B, H, T, S]`` float32), which is also the
reference's math; the separate reference below loops over heads one at a time (an independent
spelling for the tests).

Decoding: :class:`attn_jax.nn.variant_attention.TalkingHeadsAttention` keeps a
:class:`~attn_jax.softmax.kv_cache.KVCache` and runs this op over the cache with
``causal(offset=lengths)``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike, Float
from attn_jax.core.declaration import Declaration, Paper, declare
from attn_jax.variants.dense_scores import (check_inputs, compute_dtype, masked_softmax, mix_values, scores,
                                            visible_pairs, zero_unused)

__all__ = ["talking_heads_attention", "talking_heads_attention_reference"]


def _check_proj(name: str, p, H: int):
    p = jnp.asarray(p)
    V.check_float_array(name, p)
    if p.shape != (H, H):
        raise ValueError(f"{name}: expected a [H, H]=({H}, {H}) head projection, got {tuple(p.shape)}")
    return p


def talking_heads_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                            v: Float[ArrayLike, "B S K Dv"], logits_proj: Float[ArrayLike, "H H"],
                            weights_proj: Float[ArrayLike, "H H"], *, mask=None,
                            scale: float | None = None) -> Float[Array, "B T H Dv"]:
    """Talking-heads attention (module docstring), materialised.

    Args:
      q, k, v: ``[B, T, H, Dk]``, ``[B, S, K, Dk]``, ``[B, S, K, Dv]`` (``H % K == 0``).
      logits_proj: ``P_l [H, H]`` (``J'[h'] = sum_h J[h] P_l[h, h']``), before the softmax.
      weights_proj: ``P_w [H, H]``, after the softmax.
      mask: any :mod:`attn_jax.masks` mask or array, applied to the mixed logits.
      scale: logit scale, default ``Dk^-1/2``.

    Returns:
      ``o [B, T, H, Dv]`` in ``q``'s dtype.
    """
    dims, mask = check_inputs(q, k, v, mask)
    p_l = _check_proj("logits_proj", logits_proj, dims.H)
    p_w = _check_proj("weights_proj", weights_proj, dims.H)
    V.check_positive_scalar("scale", scale)
    scale = dims.Dk ** -0.5 if scale is None else scale
    visible = visible_pairs(mask, dims.B, dims.H, dims.T, dims.S)
    q, k, v = zero_unused(q, k, v, visible)
    cdt = compute_dtype(q.dtype)
    s = jnp.einsum("bhts,hg->bgts", scores(q, k, scale), p_l.astype(cdt), precision=lax.Precision.HIGHEST)
    w = jnp.einsum("bhts,hg->bgts", masked_softmax(s, visible), p_w.astype(cdt), precision=lax.Precision.HIGHEST)
    return mix_values(w, v, q.dtype)


def talking_heads_attention_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                                      v: Float[ArrayLike, "B S K Dv"], logits_proj: Float[ArrayLike, "H H"],
                                      weights_proj: Float[ArrayLike, "H H"], *, mask=None,
                                      scale: float | None = None) -> Float[Array, "B T H Dv"]:
    """Head by head: K/V repeated per query head, each mixed logit / weight a Python sum over heads."""
    dims, mask = check_inputs(q, k, v, mask)
    B, T, H, Dk, S = dims.B, dims.T, dims.H, dims.Dk, dims.S
    p_l = _check_proj("logits_proj", logits_proj, H)
    p_w = _check_proj("weights_proj", weights_proj, H)
    scale = Dk ** -0.5 if scale is None else scale
    visible = visible_pairs(mask, B, H, T, S)
    q, k, v = zero_unused(q, k, v, visible)
    cdt = compute_dtype(q.dtype)
    G = H // dims.K
    hi = lax.Precision.HIGHEST
    logits = [scale * jnp.einsum("btd,bsd->bts", q[:, :, h].astype(cdt), k[:, :, h // G].astype(cdt), precision=hi)
              for h in range(H)]
    weights = []
    for g in range(H):
        mixed = sum(logits[h] * p_l[h, g].astype(cdt) for h in range(H))
        if visible is not None:
            mixed = jnp.where(visible[:, g], mixed, -jnp.inf)
        m = jnp.max(mixed, axis=-1, keepdims=True)
        e = jnp.exp(mixed - jnp.where(jnp.isfinite(m), m, 0.0))
        z = e.sum(-1, keepdims=True)
        weights.append(e / jnp.where(z > 0, z, 1.0))
    outs = []
    for g in range(H):
        w = sum(weights[h] * p_w[h, g].astype(cdt) for h in range(H))
        outs.append(jnp.einsum("bts,bsd->btd", w, v[:, :, g // G].astype(cdt), precision=hi))
    return jnp.stack(outs, axis=2).astype(q.dtype)


DECLARATION = declare(Declaration(
    name="talking_heads", family="variants", title="Talking-heads attention (head mixing before and after softmax)",
    papers=(Paper("Talking-Heads Attention", 2020, "2003.02436", "Shazeer et al."),),
    summary="W = softmax(P_lᵀ · (q kᵀ / sqrt(d)) + mask) over heads; o_h = (Σ_h' P_w[h', h] W_h') v",
    op=talking_heads_attention, forms=(), directions=("causal", "bidirectional"),
    layer="attn_jax.nn.variant_attention:TalkingHeadsAttention",
    notes="materialised [B, H, T, S] (head mixing inside the softmax has no per-head tiled form); decode over a "
          "KVCache"))
