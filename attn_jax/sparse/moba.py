"""MoBA: mixture of block attention, on the block-sparse engine.

Paper: Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs", 2025, arXiv:2502.13189.

Keys are cut into blocks ``I_b`` of ``block_size`` tokens.  Each query *token* ``q_t`` (position
``p = t + S - T``, own block ``c = p // block_size``) scores every block by its mean-pooled key and
keeps ``top_k`` blocks, its own block always among them, future blocks never::

    s_b  = q_t · mean_{j in I_b} k_j                       (parameter-free gate; no gradient)
    G_t  = {c} ∪ top_{k-1} {b < c : s_b}                   (fewer when fewer past blocks exist)
    o_t  = softmax_{j in ∪_{b in G_t} I_b, j <= p} (scale q_t·k_j) v_j      (causal in block c)

GQA: query head ``h`` gates with the pooled keys of its key/value head.  The mean of a ragged last
block is over its real tokens.

On the engine (:func:`attn_jax.sparse.block_sparse_attention`): queries are cut into blocks of
``block_q`` tokens; each query block's list is the union of its tokens' choices (ascending block
order) and a token-level ``slot_mask`` keeps, for each token, only its own choices.  The engine's
work is the size of those unions (the longest over batch rows and heads), so a smaller ``block_q``
does less wasted work on diverse routing at the price of more loop steps.  ``impl="reference"``
is dense attention under the materialised token mask (:func:`moba_reference`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from attn_jax.core import masks as M
from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.declaration import Declaration, Paper, declare
from attn_jax.softmax.reference import attention_reference
from attn_jax.sparse.engine import block_sparse_attention

__all__ = ["moba", "moba_reference", "moba_gate", "moba_lists", "DEFAULT_BLOCK_Q"]

#: Default query block of the engine (clipped to ``block_size``).
DEFAULT_BLOCK_Q = 64


def _check(q, k, v, block_size, top_k):
    d = V.check_qkv(q, k, v)
    for name, x in (("block_size", block_size), ("top_k", top_k)):
        if not isinstance(x, int) or isinstance(x, bool) or x <= 0:
            raise ValueError(f"{name}: expected a positive int, got {x!r}")
    return d


def moba_gate(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"], *, block_size: int,
              top_k: int, q_offset=None) -> Bool[Array, "B H T nb"]:
    """MoBA's routing: ``sel[b, h, t, blk]`` is True iff token ``t`` of head ``h`` attends to key block
    ``blk`` (its own block, and the ``top_k - 1`` past blocks with the largest mean-pooled-key scores).
    ``q_offset``: position of query 0 (int or ``int[B]``; default ``S - T``).  Only complete past
    blocks are ever scored against each other (the own block is selected whatever its score), so
    keys past the query's position -- unfilled cache slots included -- never change the routing."""
    q, k = jnp.asarray(q), jnp.asarray(k)
    B, T, H, Dk = q.shape
    S, K = k.shape[1], k.shape[2]
    nb = -(-S // block_size)
    kf = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, nb * block_size - S), (0, 0), (0, 0)))
    counts = jnp.minimum(block_size, S - jnp.arange(nb) * block_size).astype(jnp.float32)
    kbar = kf.reshape(B, nb, block_size, K, Dk).sum(2) / counts[None, :, None, None]          # [B, nb, K, Dk]
    qg = q.astype(jnp.float32).reshape(B, T, K, H // K, Dk)
    s = jnp.einsum("btkgd,bnkd->bkgtn", qg, kbar, precision=lax.Precision.HIGHEST).reshape(B, H, T, nb)
    s = lax.stop_gradient(s)
    off = S - T if q_offset is None else q_offset
    off = jnp.reshape(jnp.asarray(off, jnp.int32), (-1, 1, 1, 1))                               # [B|1, 1, 1, 1]
    own = jnp.floor_divide(jnp.arange(T)[None, None, :, None] + off, block_size)                # (< 0: no key)
    blk = jnp.arange(nb)
    sel = (blk == own) & (own >= 0)                                                             # [B|1, 1, T, nb]
    sel = jnp.broadcast_to(sel, (B, H, T, nb))
    n_past = min(top_k - 1, nb)
    if n_past > 0:
        past = blk < own
        vals, ids = lax.top_k(jnp.where(past, s, -jnp.inf), n_past)                             # [B, H, T, n_past]
        chosen = (ids[..., None] == blk) & jnp.isfinite(vals)[..., None]
        sel = sel | chosen.any(axis=-2)
    return sel


def moba_lists(sel: Bool[ArrayLike, "B H T nb"], block_q: int):
    """Engine lists of a token routing: ``(block_idx [B, H, nq, nb], slot_mask [B, H, T, nb])`` -- each
    query block's union of its tokens' blocks in ascending order (``-1`` after them), and per token
    which of those slots it chose."""
    sel = jnp.asarray(sel)
    B, H, T, nb = sel.shape
    nq = -(-T // block_q)
    pad = jnp.pad(sel, ((0, 0), (0, 0), (0, nq * block_q - T), (0, 0)))
    union = pad.reshape(B, H, nq, block_q, nb).any(axis=3)                                      # [B, H, nq, nb]
    blk = jnp.arange(nb, dtype=jnp.int32)
    idx = jnp.sort(jnp.where(union, blk, nb + blk), axis=-1)
    idx = jnp.where(idx < nb, idx, -1).astype(jnp.int32)
    tok_idx = jnp.repeat(idx, block_q, axis=2)[:, :, :T]                                        # [B, H, T, nb]
    slot = jnp.take_along_axis(sel, jnp.clip(tok_idx, 0, nb - 1), axis=-1) & (tok_idx >= 0)
    return idx, slot


def moba(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"], v: Float[ArrayLike, "B S K Dv"], *,
         block_size: int, top_k: int, scale: float | None = None, block_q: int | None = None, q_offset=None,
         segment_ids=None, impl="auto") -> Float[Array, "B T H Dv"]:
    """MoBA attention (causal; see the module docstring).

    Args:
      q, k, v: ``[B, T, H, Dk]``, ``[B, S, K, Dk]``, ``[B, S, K, Dv]`` (GQA by grouping).
      block_size: key block size in tokens.
      top_k: blocks per query token, its own block included (always selected); ``top_k >= nb``
        gives full causal attention.
      scale: logit scale, default ``Dk ** -0.5``.
      block_q: the engine's query block (default ``min(block_size, 64)``); a tuning knob only.
      q_offset: position of query 0 (an int or ``int[B]``, e.g. a cache's lengths; default ``S - T``).
      segment_ids: ``(q ids int[B, T], kv ids int[B, S])``: packed documents (0 = padding) masked
        inside the selected blocks.  Blocks are positions of the packed row (the pooled means may
        mix documents): a deviation only for packed rows.
      impl: ``"auto"`` / ``"xla"`` (the block-sparse engine) or ``"reference"`` (dense, materialised mask).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check(q, k, v, block_size, top_k)
    if impl == "reference":
        return moba_reference(q, k, v, block_size=block_size, top_k=top_k, scale=scale, q_offset=q_offset,
                              segment_ids=segment_ids)
    if impl not in ("auto", "xla"):
        raise ValueError(f"impl: expected 'auto', 'xla' or 'reference', got {impl!r}")
    block_q = min(block_size, DEFAULT_BLOCK_Q) if block_q is None else block_q
    if not isinstance(block_q, int) or isinstance(block_q, bool) or block_q <= 0:
        raise ValueError(f"block_q: expected a positive int, got {block_q!r}")
    idx, slot = moba_lists(moba_gate(q, k, block_size=block_size, top_k=top_k, q_offset=q_offset), block_q)
    return block_sparse_attention(q, k, v, idx, block_size=block_size, block_q=block_q, slot_mask=slot, causal=True,
                                  q_offset=q_offset, segment_ids=segment_ids, scale=scale)


def moba_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"], v: Float[ArrayLike, "B S K Dv"],
                   *, block_size: int, top_k: int, scale: float | None = None, q_offset=None,
                   segment_ids=None) -> Float[Array, "B T H Dv"]:
    """Dense attention under MoBA's token mask: the routing of :func:`moba_gate` expanded to keys, causal."""
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check(q, k, v, block_size, top_k)
    T, S = q.shape[1], k.shape[1]
    sel = moba_gate(q, k, block_size=block_size, top_k=top_k, q_offset=q_offset)
    m = jnp.repeat(sel, block_size, axis=-1)[..., :S] & M.causal(q_offset).materialize(T, S)
    if segment_ids is not None:
        m = m & M.segments(*segment_ids).materialize(T, S)
    return attention_reference(q, k, v, mask=M.dense(m), scale=scale)


DECLARATION = declare(Declaration(
    name="moba", family="sparse", title="MoBA (mixture of block attention)",
    papers=(Paper("MoBA: Mixture of Block Attention for Long-Context LLMs", 2025, "2502.13189", "Lu et al."),),
    summary="G_t = {own block} ∪ top_{k-1}{b < own : q_t·mean(K_b)};  o_t = softmax over the keys of G_t (causal)",
    op=moba, forms=("xla",), directions=("causal",), layer="attn_jax.nn.sparse_mixers:moba_mixer",
    notes="gate per query token (no gradient through the selection); block-sparse engine with token slot masks; "
          "packed rows: blocks are positions of the row"))
