"""CoPE: contextual position encoding.

"Contextual Position Encoding: Learning to Count What's Important", Golovneva, Wang, Weston,
Sukhbaatar, 2024, arXiv:2405.18719 (§3).  Positions are counted by the model: query ``i`` gates
every key ``j`` with ``g_ij = σ(q_i . k_j)`` and the position of key ``j`` seen from ``i`` is the
number of gated keys between them,

    g_ij = σ(scale * q_i . k_j) * visible_ij
    p_ij = sum_{t >= j} g_it                           (causal: t = j .. i; the paper's Eq. 3)
    p_ij <- min(p_ij, npos - 1)
    e[p] = (p - ⌊p⌋) e[⌈p⌉] + (1 - p + ⌊p⌋) e[⌊p⌋]      interpolated learned embeddings e: [npos, Dk]
    o_i  = sum_j softmax_j(scale * q_i . (k_j + e[p_ij])) v_j

Since ``q_i . e[p]`` is linear in ``e``, the interpolation is done on the logits: ``z_i[n] = q_i .
e[n]`` for the ``npos`` integer positions, then ``z_i[p_ij]`` interpolated between ``⌊p_ij⌋`` and
``⌈p_ij⌉`` (the paper's efficient form).  Constants follow the authors' code
(facebookresearch/RAM, ``projects/cope/src/cope/context_position.py``): the gate logits carry the
attention scale ``Dk^-1/2`` (σ(q.k / sqrt(Dk))), the position logits are scaled with the content
logits, keys hidden by the mask get gate 0 (so a query counts only what it may see), positions are
clipped at ``npos - 1``, and ``e`` is shared by the heads of a layer (``pos_emb [npos, Dk]``;
``[H, npos, Dk]`` gives each head its own table).  With constant gates ``g ≡ 1`` the positions
are ``p_ij = i - j + 1`` and CoPE is relative-position attention with the bias ``scale * q_i .
e[i - j + 1]``.

Forms.  The gates need ``q . k`` for every visible pair and the positions a reverse cumulative sum
over the keys of each row, so the position logits are a data-dependent ``[B, H, T, S]`` bias: the
fast form computes it (float32) and hands it to :func:`attn_jax.attention` as a dense bias, which
brings masks, sinks, GQA, dropout and every backend's tiled softmax (its gradient flows back into
``q`` and ``k`` through the gates and through ``z``).  This form is quadratic in memory (one
float32 score block for the gates and one for the bias); a tiled form would need the per-row
suffix sums of the gates before the first tile of the row, i.e. a second pass over the keys, and
is not implemented.  The reference materialises everything, with the interpolation written as
``sum_n max(0, 1 - |p - n|) e[n]``.

Decoding: the positions of the keys of a new query depend on that query (its own gates), so a step
reads every cached key; :class:`attn_jax.nn.variant_attention.CoPEAttention` keeps a
:class:`~attn_jax.softmax.kv_cache.KVCache` and calls this op over it with the mask
``causal(offset=lengths)`` (prefill + decode == full forward, tested).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike, Float
from attn_jax.core.declaration import Declaration, Paper, declare
from attn_jax.softmax.api import attention
from attn_jax.variants.dense_scores import (check_inputs, compute_dtype, masked_softmax, mix_values, scores,
                                            visible_pairs, zero_unused)

__all__ = ["cope_attention", "cope_attention_reference", "cope_positions", "cope_position_logits"]


def _check_pos_emb(pos_emb, H: int, Dk: int):
    pos_emb = jnp.asarray(pos_emb)
    V.check_float_array("pos_emb", pos_emb)
    if pos_emb.ndim == 2 and pos_emb.shape[1] == Dk:
        pos_emb = pos_emb[None]
    if pos_emb.ndim == 3 and pos_emb.shape[0] in (1, H) and pos_emb.shape[2] == Dk:
        return jnp.broadcast_to(pos_emb, (H,) + pos_emb.shape[1:])
    raise ValueError(f"pos_emb: expected [npos, Dk={Dk}] (shared by the heads) or [H={H}, npos, Dk={Dk}], got "
                     f"{tuple(pos_emb.shape)}")


def cope_positions(gates: Float[ArrayLike, "B H T S"], max_position: int | float) -> Float[Array, "B H T S"]:
    """``p_ij = min(sum_{t >= j} gates_it, max_position)``: the reverse cumulative sum over keys
    (gates of hidden keys must already be 0)."""
    gates = jnp.asarray(gates)
    p = jnp.flip(jnp.cumsum(jnp.flip(gates, -1), axis=-1), -1)
    return jnp.minimum(p, max_position)


def cope_position_logits(q: Float[ArrayLike, "B T H Dk"], positions: Float[ArrayLike, "B H T S"],
                         pos_emb) -> Float[Array, "B H T S"]:
    """``q_i . e[p_ij]`` with ``e`` interpolated between ``⌊p⌋`` and ``⌈p⌉`` (computed as the
    interpolation of the integer-position logits ``z_i[n] = q_i . e[n]``), float32 ``[B, H, T, S]``.
    ``positions`` must lie in ``[0, npos - 1]``."""
    q = jnp.asarray(q)
    positions = jnp.asarray(positions)
    e = _check_pos_emb(pos_emb, q.shape[2], q.shape[3])
    cdt = compute_dtype(q.dtype)
    z = jnp.einsum("bthd,hnd->bhtn", q.astype(cdt), e.astype(cdt), precision=jax.lax.Precision.HIGHEST)
    lo = jnp.floor(positions)
    w = positions - lo
    lo_i = lo.astype(jnp.int32)
    hi_i = jnp.ceil(positions).astype(jnp.int32)
    z_lo = jnp.take_along_axis(z, lo_i, axis=-1)
    z_hi = jnp.take_along_axis(z, hi_i, axis=-1)
    return z_hi * w + z_lo * (1 - w)


def _gates_and_positions(q, k, scale, visible, npos):
    s = scores(q, k, scale)
    gates = jax.nn.sigmoid(s)
    if visible is not None:
        gates = jnp.where(visible, gates, 0.0)
    return s, cope_positions(gates, npos - 1)


def cope_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                   v: Float[ArrayLike, "B S K Dv"], pos_emb, *, mask=None, scale: float | None = None,
                   sinks: Float[ArrayLike, " H"] | None = None, dropout_rate: float = 0.0, dropout_rng=None,
                   impl="auto") -> Float[Array, "B T H Dv"]:
    """CoPE attention (module docstring): the position logits as a dense bias of :func:`attn_jax.attention`.

    Args:
      q, k, v: ``[B, T, H, Dk]``, ``[B, S, K, Dk]``, ``[B, S, K, Dv]`` (``H % K == 0``).
      pos_emb: ``[npos, Dk]`` position embeddings shared by the heads, or ``[H, npos, Dk]``.
      mask: any :mod:`attn_jax.masks` mask or array; keys it hides are not counted.  CoPE is
        defined for causal attention (``masks.causal()``); without a causal mask a query also
        counts the visible keys after it.
      scale: logit scale (default ``Dk^-1/2``), used by the gates and by both logit terms.
      sinks, dropout_rate, dropout_rng, impl: as in :func:`attn_jax.attention`.

    Returns:
      ``o [B, T, H, Dv]`` in ``q``'s dtype.
    """
    dims, mask = check_inputs(q, k, v, mask)
    e = _check_pos_emb(pos_emb, dims.H, dims.Dk)
    V.check_positive_scalar("scale", scale)
    scale = dims.Dk ** -0.5 if scale is None else scale
    visible = visible_pairs(mask, dims.B, dims.H, dims.T, dims.S)
    qz, kz, _ = zero_unused(q, k, v, visible)
    _, positions = _gates_and_positions(qz, kz, scale, visible, e.shape[1])
    bias = scale * cope_position_logits(qz, positions, e)
    return attention(q, k, v, mask=mask, bias=bias.astype(jnp.float32) if bias.dtype != jnp.float64 else bias,
                     scale=scale, sinks=sinks, dropout_rate=dropout_rate, dropout_rng=dropout_rng, impl=impl)


def cope_attention_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                             v: Float[ArrayLike, "B S K Dv"], pos_emb, *, mask=None, scale: float | None = None,
                             sinks: Float[ArrayLike, " H"] | None = None) -> Float[Array, "B T H Dv"]:
    """The materialised reference: positions by an explicit triangular sum, embeddings
    interpolated as ``sum_n max(0, 1 - |p - n|) e[n]`` and added to the keys, masked softmax."""
    dims, mask = check_inputs(q, k, v, mask)
    e = _check_pos_emb(pos_emb, dims.H, dims.Dk)
    scale = dims.Dk ** -0.5 if scale is None else scale
    B, T, H, Dk, S = dims.B, dims.T, dims.H, dims.Dk, dims.S
    visible = visible_pairs(mask, B, H, T, S)
    q, k, v = zero_unused(q, k, v, visible)
    cdt = compute_dtype(q.dtype)
    s = scores(q, k, 1.0)                                              # q . k
    g = jax.nn.sigmoid(scale * s)
    if visible is not None:
        g = jnp.where(visible, g, 0.0)
    t_ge_j = (jnp.arange(S)[:, None] >= jnp.arange(S)[None, :]).astype(cdt)   # [t, j]
    p = jnp.minimum(jnp.einsum("bhit,tj->bhij", g, t_ge_j, precision=jax.lax.Precision.HIGHEST),
                    e.shape[1] - 1)
    n = jnp.arange(e.shape[1], dtype=cdt)
    hat = jnp.maximum(0.0, 1.0 - jnp.abs(p[..., None] - n))           # [B, H, T, S, npos]
    e_ij = jnp.einsum("bhijn,hnd->bhijd", hat, e.astype(cdt), precision=jax.lax.Precision.HIGHEST)
    pos_logits = jnp.einsum("bihd,bhijd->bhij", q.astype(cdt), e_ij, precision=jax.lax.Precision.HIGHEST)
    probs = masked_softmax(scale * (s + pos_logits), visible, None if sinks is None else jnp.asarray(sinks))
    return mix_values(probs, v, q.dtype)


DECLARATION = declare(Declaration(
    name="cope", family="variants", title="CoPE (contextual position encoding)",
    papers=(Paper("Contextual Position Encoding: Learning to Count What's Important", 2024, "2405.18719",
                  "Golovneva et al."),),
    summary="g_ij = σ(q_i.k_j / sqrt(d)), p_ij = Σ_{t=j..i} g_it, logits (q_i.(k_j + e[p_ij])) / sqrt(d), "
            "e interpolated",
    op=cope_attention, forms=("auto",), directions=("causal",),
    layer="attn_jax.nn.variant_attention:CoPEAttention",
    notes="positions as a data-dependent dense [B, H, T, S] bias into aj.attention (quadratic memory); decode "
          "over a KVCache"))
