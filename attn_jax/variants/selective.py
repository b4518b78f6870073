"""Selective attention: tokens can mask out earlier tokens for every later query.

"Selective Attention Improves Transformer", Leviathan, Kalman, Matias, 2024, arXiv:2410.02703
(§3, the paper's code listing).  A parameter-free change to causal attention: the (scaled,
causally masked) logits of one head, ``s⁰ = scale * Q_0 K_0ᵀ``, are read as *selection*
scores — token ``i`` votes to forget key ``j`` by ``S_ij = ReLU(s⁰_ij)`` — and the votes of the
queries before ``i`` are subtracted from the logits of every head:

    S_ij = ReLU(s⁰_ij)    for visible j != i and j not protected, else 0
                          (protected: the first token, <BOS>; "do not mask self")
    F_ij = sum_{i' < i} S_i'j                       accumulated strictly in the past
    o_i  = sum_j softmax_j(scale * q_i . k_j - F_ij + mask) v_j      (every head)

Gradients flow through ``F`` (no stop-gradient, as the listing).  Zero selection (``S ≡ 0``,
e.g. head-0 logits all ``<= 0``) is plain causal attention.

Forms.  ``F`` needs the head-0 score block ``[B, T, S]`` (one head, not ``H``) and a cumulative
sum over queries; it is then an additive bias of every head, so the fast form materialises that
one block and hands ``-F`` to :func:`attn_jax.attention` as a ``[B, 1, T, S]`` bias (every
backend, masks, sinks, GQA).  Memory is ``B * T * S`` floats instead of ``B * H * T * S``.  The
reference computes ``F`` with an explicit loop over queries and the softmax by hand.

Decoding.  ``F`` of a new query depends only on the queries before it, so a cache carries the
running column sums ``F_next[j] = sum_{i' < next} S_i'j`` (``initial_selection``, float32
``[B, S]``) next to the keys and values; this op takes queries at absolute positions ``offset +
i`` and returns the updated sums with ``return_selection=True``.  Context pruning (§5): at
inference a key whose ``F`` is large is (almost) invisible to every later query, so it can be
evicted; :func:`selective_keep` picks, per row, the ``budget`` filled slots with the smallest
``F`` (protected keys first) — the keep-set of a context buffer of that size.  Using it as a mask
emulates the pruned buffer; it does not shrink the cache arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from attn_jax.core import masks as M
from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike, Bool, Float, Int
from attn_jax.core.declaration import Declaration, Paper, declare
from attn_jax.softmax.api import attention
from attn_jax.variants.dense_scores import (check_inputs, compute_dtype, masked_softmax, mix_values, scores,
                                            visible_pairs, zero_unused)

__all__ = ["selective_attention", "selective_attention_reference", "selection_scores", "selective_keep"]


def _prepare(q, k, v, mask, offset, protected, initial_selection, selection_head):
    dims, extra = check_inputs(q, k, v, mask)
    B, T, S, H = dims.B, dims.T, dims.S, dims.H
    if isinstance(selection_head, bool) or not isinstance(selection_head, (int, np.integer)) \
            or not 0 <= selection_head < H:
        raise ValueError(f"selection_head: expected an int in [0, H={H}), got {selection_head!r}")
    causal = M.causal(offset=offset)
    causal.check(B, H, T, S)
    mask = causal if extra is None else causal & extra
    q_pos = jnp.arange(T, dtype=jnp.int32)[None, :] + (
        S - T if offset is None else jnp.broadcast_to(jnp.asarray(offset, jnp.int32).reshape(-1, 1), (B, 1)))
    if protected is None:
        protected = jnp.broadcast_to(jnp.arange(S) == 0, (B, S))
    else:
        protected = jnp.asarray(protected)
        if protected.dtype != jnp.bool_:
            raise TypeError(f"protected: expected a boolean array [B, S], got dtype {protected.dtype}")
        if protected.shape not in ((B, S), (1, S)):
            raise ValueError(f"protected: expected shape [B, S]=({B}, {S}), got {tuple(protected.shape)}")
        protected = jnp.broadcast_to(protected, (B, S))
    cdt = compute_dtype(q.dtype)
    if initial_selection is None:
        initial_selection = jnp.zeros((B, S), cdt)
    else:
        initial_selection = jnp.asarray(initial_selection)
        V.check_float_array("initial_selection", initial_selection)
        if initial_selection.shape != (B, S):
            raise ValueError(f"initial_selection: expected shape [B, S]=({B}, {S}), got "
                             f"{tuple(initial_selection.shape)}")
        initial_selection = initial_selection.astype(cdt)
    return dims, mask, q_pos, protected, initial_selection


def selection_scores(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"], visible, q_pos,
                     protected, *, selection_head: int = 0, scale: float) -> Float[Array, "B T S"]:
    """``S_ij = ReLU(scale * q_i . k_j)`` of head ``selection_head`` where ``visible [B, T, S]``,
    ``j != q_pos[b, i]`` and ``j`` is not ``protected [B, S]``; 0 elsewhere."""
    G = q.shape[2] // k.shape[2]
    s0 = scores(q[:, :, selection_head:selection_head + 1], k[:, :, selection_head // G:selection_head // G + 1],
                scale)[:, 0]
    S = k.shape[1]
    keep = visible & (jnp.arange(S)[None, None, :] != q_pos[..., None]) & ~protected[:, None, :]
    return jnp.where(keep, jax.nn.relu(s0), 0.0)


def selective_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                        v: Float[ArrayLike, "B S K Dv"], *, mask=None, offset=None,
                        protected: Bool[ArrayLike, "B S"] | None = None,
                        initial_selection: Float[ArrayLike, "B S"] | None = None, selection_head: int = 0,
                        scale: float | None = None, sinks: Float[ArrayLike, " H"] | None = None,
                        return_selection: bool = False, impl="auto"):
    """Selective attention (module docstring): ``attention(q, k, v, mask=causal & mask, bias=-F)``.

    Args:
      q, k, v: ``[B, T, H, Dk]``, ``[B, S, K, Dk]``, ``[B, S, K, Dv]`` (``H % K == 0``).
      mask: an extra mask ``&``-ed to the causal one (segments, key padding, ...).
      offset: query ``i`` sits at position ``i + offset`` (int or int ``[B]``; default ``S - T``).
      protected: bool ``[B, S]`` keys nobody can mask (default: key 0, the first token).
      initial_selection: float ``[B, S]`` selection already accumulated by earlier queries (a
        decode cache); default zeros.
      selection_head: the head whose logits select (default 0, as the paper).
      scale: logit scale, default ``Dk^-1/2`` (the selection logits carry it too).
      sinks, impl: as in :func:`attn_jax.attention`.
      return_selection: also return ``initial_selection + sum_i S_i`` (float32 ``[B, S]``).

    Returns:
      ``o [B, T, H, Dv]`` in ``q``'s dtype, and the accumulated selection when requested.
    """
    dims, mask, q_pos, protected, F0 = _prepare(q, k, v, mask, offset, protected, initial_selection,
                                                selection_head)
    V.check_positive_scalar("scale", scale)
    scale = dims.Dk ** -0.5 if scale is None else scale
    visible = visible_pairs(mask, dims.B, dims.H, dims.T, dims.S)[:, selection_head]      # [B, T, S]
    # rows / columns the selection head never uses are zeroed (NaN padding cannot reach the scores)
    qz = jnp.where(visible.any(axis=2)[:, :, None, None], q, 0)
    kz = jnp.where(visible.any(axis=1)[:, :, None, None], k, 0)
    sel = selection_scores(qz, kz, visible, q_pos, protected, selection_head=selection_head, scale=scale)
    F = F0[:, None, :] + jnp.cumsum(sel, axis=1) - sel                 # exclusive: queries before i
    bias = -F[:, None]
    o = attention(q, k, v, mask=mask, bias=bias.astype(jnp.float32) if bias.dtype != jnp.float64 else bias,
                  scale=scale, sinks=sinks, impl=impl)
    if not return_selection:
        return o
    return o, F0 + sel.sum(axis=1)


def selective_attention_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                                  v: Float[ArrayLike, "B S K Dv"], *, mask=None, offset=None,
                                  protected: Bool[ArrayLike, "B S"] | None = None,
                                  initial_selection: Float[ArrayLike, "B S"] | None = None,
                                  selection_head: int = 0, scale: float | None = None,
                                  sinks: Float[ArrayLike, " H"] | None = None):
    """Materialised reference: ``F`` by an explicit loop over queries, the softmax by hand.
    Returns ``(o, accumulated selection)``."""
    dims, mask, q_pos, protected, F = _prepare(q, k, v, mask, offset, protected, initial_selection,
                                               selection_head)
    B, T, H, S, G = dims.B, dims.T, dims.H, dims.S, dims.H // dims.K
    scale = dims.Dk ** -0.5 if scale is None else scale
    visible = visible_pairs(mask, B, H, T, S)
    q, k, v = zero_unused(q, k, v, visible)
    cdt = compute_dtype(q.dtype)
    s = scores(q, k, scale)                                             # [B, H, T, S]
    h0 = selection_head
    rows = []
    for i in range(T):
        rows.append(F)
        own = jnp.arange(S)[None, :] == q_pos[:, i:i + 1]
        vote = jnp.maximum(s[:, h0, i], 0.0)
        F = F + jnp.where(visible[:, h0, i] & ~own & ~protected, vote, 0.0)
    F_rows = jnp.stack(rows, axis=1).astype(cdt)                        # [B, T, S]
    probs = masked_softmax(s - F_rows[:, None], visible, None if sinks is None else jnp.asarray(sinks))
    return mix_values(probs, v, q.dtype), F


def selective_keep(selection: Float[ArrayLike, "B S"], lengths: Int[ArrayLike, "B"], budget: int, *,
                   protected: Bool[ArrayLike, "B S"] | None = None) -> Bool[Array, "B S"]:
    """Context pruning: per row, the ``budget`` filled slots (``j < lengths[b]``) with the smallest
    accumulated selection ``F`` (protected slots first, then ties by position); bool ``[B, S]``.
    Rows holding at most ``budget`` tokens keep them all."""
    selection = jnp.asarray(selection)
    V.check_float_array("selection", selection)
    if selection.ndim != 2:
        raise ValueError(f"selection: expected [B, S], got shape {tuple(selection.shape)}")
    B, S = selection.shape
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget: expected a positive int, got {budget!r}")
    lengths = V.int_rows("lengths", lengths, B)
    filled = jnp.arange(S)[None, :] < lengths[:, None]
    key = jnp.where(filled, selection.astype(jnp.float32), jnp.inf)
    if protected is not None:
        key = jnp.where(jnp.asarray(protected) & filled, -jnp.inf, key)
    order = jnp.argsort(key, axis=1, stable=True)                       # smallest F first
    rank = jnp.argsort(order, axis=1, stable=True)
    return filled & (rank < budget)


DECLARATION = declare(Declaration(
    name="selective", family="variants", title="Selective attention (accumulated selection masking)",
    papers=(Paper("Selective Attention Improves Transformer", 2024, "2410.02703", "Leviathan et al."),),
    summary="S = ReLU(head-0 logits) (no <BOS>, no self), F_ij = Σ_{i'<i} S_i'j, logits -= F in every head",
    op=selective_attention, forms=("auto",), directions=("causal",),
    layer="attn_jax.nn.variant_attention:SelectiveAttention",
    notes="-F as a [B, 1, T, S] bias into aj.attention (one score block, not H); decode carries the column "
          "sums F; selective_keep gives the keep-set of a pruned context buffer"))
