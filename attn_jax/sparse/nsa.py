"""NSA: natively trainable sparse attention (compressed + selected + sliding-window branches, gated).

Paper: Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse
Attention", 2025, arXiv:2502.11089.

For a query ``q_t`` at position ``p = t + S - T``::

    compression  K~_i = mean(k_{i d} .. k_{i d + l - 1}) (same for V),  visible iff i d + l - 1 <= p
                 o_cmp = softmax(scale q K~^T) V~,  p_cmp = that softmax          (no key yet: o_cmp = 0)
    selection    p_slc[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[j l'/d - m - n]      (blocks of l' tokens)
                 summed over the query heads of a GQA group (one selection per key/value head);
                 the first block and the ``n_local`` blocks ending at p's block are always selected,
                 future blocks never; the top ``n_selected`` blocks (forced ones included) are kept
                 o_slc = softmax over the keys of the selected blocks, causal
    window       o_win = softmax over the last ``window`` keys (p - window < j <= p)
    output       o = g_cmp o_cmp + g_slc o_slc + g_win o_win,   gates [B, T, H, 3] given by the caller

The selection score is the paper's mapping from compressed to selection blocks (its Eq. 9, as we
read it; not re-checked against the full text here).  Deviations: compression is the mean pool (the paper's phi is an MLP with intra-block positions);
the gates are inputs (the paper's MLP + sigmoid belongs to a layer).  ``l`` and ``l'`` must be
multiples of ``d``.  The compressed branch materialises its ``[B, H, T, T / d]`` scores (``p_cmp`` is
needed for the selection anyway); the selected branch runs on :func:`attn_jax.sparse.block_sparse_attention`
with per-token slot masks (the lists of a query block are the union of its tokens' selections,
shared by the heads of a group), the window branch on ``aj.attention(impl="xla")`` tiles.
``impl="reference"`` computes the selected and window branches densely under materialised masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from attn_jax.core import masks as M
from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.declaration import Declaration, Paper, declare
from attn_jax.softmax.api import attention
from attn_jax.softmax.reference import attention_reference
from attn_jax.sparse.engine import block_sparse_attention
from attn_jax.sparse.moba import moba_lists

__all__ = ["nsa", "nsa_reference", "nsa_compressed", "nsa_select"]


def _check(q, k, v, gates, compress_block, compress_stride, select_block, n_selected, window, n_local):
    d = V.check_qkv(q, k, v)
    for name, x in (("compress_block", compress_block), ("compress_stride", compress_stride),
                    ("select_block", select_block), ("n_selected", n_selected), ("window", window)):
        if not isinstance(x, int) or isinstance(x, bool) or x <= 0:
            raise ValueError(f"{name}: expected a positive int, got {x!r}")
    if not isinstance(n_local, int) or n_local < 0:
        raise ValueError(f"n_local: expected an int >= 0, got {n_local!r}")
    if compress_block % compress_stride or select_block % compress_stride:
        raise ValueError(f"compress_block ({compress_block}) and select_block ({select_block}) must be multiples of "
                         f"compress_stride ({compress_stride})")
    if tuple(jnp.shape(gates)) != (d.B, d.T, d.H, 3):
        raise ValueError(f"gates: expected shape [B, T, H, 3] = [{d.B}, {d.T}, {d.H}, 3], got {tuple(jnp.shape(gates))}")
    return d


def nsa_compressed(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"], v: Float[ArrayLike, "B S K Dv"],
                   *, compress_block: int, compress_stride: int, scale: float | None = None):
    """The compressed branch: ``(o_cmp [B, T, H, Dv], p_cmp [B, H, T, nc] float32)`` over mean-pooled
    blocks of ``compress_block`` keys every ``compress_stride`` tokens (only blocks ending at or before
    the query's position are visible)."""
    B, T, H, Dk = q.shape
    S, K = k.shape[1], k.shape[2]
    l, d = compress_block, compress_stride
    nc = max(0, (S - l) // d + 1)
    if nc == 0:
        return jnp.zeros(q.shape[:3] + (v.shape[-1],), q.dtype), jnp.zeros((B, H, T, 1), jnp.float32)
    starts = jnp.arange(nc) * d
    win = starts[:, None] + jnp.arange(l)[None, :]                                  # [nc, l]
    kc = jnp.take(k.astype(jnp.float32), win, axis=1).mean(axis=2)                # [B, nc, K, Dk]
    vc = jnp.take(v.astype(jnp.float32), win, axis=1).mean(axis=2)
    scale = Dk ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(B, T, K, H // K, Dk)
    s = jnp.einsum("btkgd,bnkd->bkgtn", qg, kc, precision=lax.Precision.HIGHEST) * scale
    visible = (starts + l - 1)[None, :] <= (jnp.arange(T) + (S - T))[:, None]       # [T, nc]
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    z = e.sum(-1, keepdims=True)
    p = e / jnp.where(z > 0, z, 1.0)                                               # rows with no key: 0
    o = jnp.einsum("bkgtn,bnkd->btkgd", p, vc, precision=lax.Precision.HIGHEST)
    return o.reshape(B, T, H, -1).astype(q.dtype), p.reshape(B, H, T, nc)


def nsa_select(p_cmp: Float[ArrayLike, "B H T nc"], *, T: int, S: int, K: int, compress_block: int,
               compress_stride: int, select_block: int, n_selected: int, n_local: int = 2) -> Bool[Array, "B K T ns"]:
    """NSA's block selection from the compressed attention: ``sel[b, kv_head, t, j]`` over blocks of
    ``select_block`` keys (see the module docstring; no gradient flows through it)."""
    p_cmp = lax.stop_gradient(jnp.asarray(p_cmp, jnp.float32))
    B, H, _, nc = p_cmp.shape
    l, d, ls = compress_block, compress_stride, select_block
    ns = -(-S // ls)
    # p_slc[j] = sum_{m < ls/d, n < l/d} p_cmp[j ls/d - m - n]: a 0/1 matrix [nc, ns]
    i = jnp.arange(nc)[:, None]
    jj = jnp.arange(ns)[None, :] * (ls // d)
    diff = jj - i                                                                    # = m + n
    counts = jnp.zeros_like(diff)
    for m in range(ls // d):
        for n in range(l // d):
            counts = counts + (diff == m + n)
    p_slc = jnp.einsum("bhtc,cs->bhts", p_cmp, counts.astype(jnp.float32))
    p_slc = p_slc.reshape(B, K, H // K, T, ns).sum(2)                               # shared by the group
    pos = jnp.arange(T) + (S - T)
    own = pos // ls                                                                  # [T]
    blk = jnp.arange(ns)
    future = blk[None, :] > own[:, None]
    forced = ((blk[None, :] == 0) | ((own[:, None] - blk[None, :] < n_local) & ~future)) & (pos[:, None] >= 0)
    score = jnp.where(forced, jnp.inf, jnp.where(future | (pos[:, None] < 0), -jnp.inf, p_slc))
    n = min(n_selected, ns)
    vals, ids = lax.top_k(score, n)                                                  # [B, K, T, n]
    return ((ids[..., None] == blk) & (vals > -jnp.inf)[..., None]).any(axis=-2)


def _branches(q, k, v, *, compress_block, compress_stride, select_block, n_selected, window, n_local, scale):
    T, S, K = q.shape[1], k.shape[1], k.shape[2]
    o_cmp, p_cmp = nsa_compressed(q, k, v, compress_block=compress_block, compress_stride=compress_stride,
                                  scale=scale)
    sel = nsa_select(p_cmp, T=T, S=S, K=K, compress_block=compress_block, compress_stride=compress_stride,
                     select_block=select_block, n_selected=n_selected, n_local=n_local)
    return o_cmp, sel


def _combine(gates, o_cmp, o_slc, o_win, dtype):
    g = jnp.asarray(gates).astype(jnp.float32)
    o = (g[..., 0:1] * o_cmp.astype(jnp.float32) + g[..., 1:2] * o_slc.astype(jnp.float32)
         + g[..., 2:3] * o_win.astype(jnp.float32))
    return o.astype(dtype)


def nsa(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"], v: Float[ArrayLike, "B S K Dv"],
        gates: Float[ArrayLike, "B T H 3"], *, compress_block: int = 32, compress_stride: int = 16,
        select_block: int = 64, n_selected: int = 16, window: int = 512, n_local: int = 2,
        scale: float | None = None, block_q: int = 64, impl="auto") -> Float[Array, "B T H Dv"]:
    """Native Sparse Attention (causal; see the module docstring).  Defaults are the paper's
    (``l = 32, d = 16, l' = 64, n = 16, w = 512``).

    Args:
      q, k, v: ``[B, T, H, Dk]``, ``[B, S, K, Dk]``, ``[B, S, K, Dv]`` (GQA: one selection per group).
      gates: ``[B, T, H, 3]``: the weights of the compressed, selected and window branches.
      compress_block, compress_stride: ``l`` and ``d`` of the mean-pooled compression.
      select_block, n_selected: ``l'`` and ``n`` (forced blocks included).
      window: sliding-window length ``w`` (keys ``p - w < j <= p``).  n_local: forced local blocks.
      block_q: the engine's query block for the selected branch (a tuning knob).
      impl: ``"auto"`` / ``"xla"`` or ``"reference"`` (selected and window branches dense).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check(q, k, v, gates, compress_block, compress_stride, select_block, n_selected, window, n_local)
    if impl == "reference":
        return nsa_reference(q, k, v, gates, compress_block=compress_block, compress_stride=compress_stride,
                             select_block=select_block, n_selected=n_selected, window=window, n_local=n_local,
                             scale=scale)
    if impl not in ("auto", "xla"):
        raise ValueError(f"impl: expected 'auto', 'xla' or 'reference', got {impl!r}")
    o_cmp, sel = _branches(q, k, v, compress_block=compress_block, compress_stride=compress_stride,
                           select_block=select_block, n_selected=n_selected, window=window, n_local=n_local,
                           scale=scale)
    idx, slot = moba_lists(sel, block_q)
    o_slc = block_sparse_attention(q, k, v, idx, block_size=select_block, block_q=block_q, slot_mask=slot,
                                   causal=True, scale=scale)
    o_win = attention(q, k, v, mask=M.sliding_window(window - 1), scale=scale, impl="xla")
    return _combine(gates, o_cmp, o_slc, o_win, q.dtype)


def nsa_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"], v: Float[ArrayLike, "B S K Dv"],
                  gates: Float[ArrayLike, "B T H 3"], *, compress_block: int = 32, compress_stride: int = 16,
                  select_block: int = 64, n_selected: int = 16, window: int = 512, n_local: int = 2,
                  scale: float | None = None) -> Float[Array, "B T H Dv"]:
    """The three branches densely: selected and window branches under materialised ``[B, H, T, S]`` masks."""
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check(q, k, v, gates, compress_block, compress_stride, select_block, n_selected, window, n_local)
    T, S, H, K = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    o_cmp, sel = _branches(q, k, v, compress_block=compress_block, compress_stride=compress_stride,
                           select_block=select_block, n_selected=n_selected, window=window, n_local=n_local,
                           scale=scale)
    m = jnp.repeat(jnp.repeat(sel, select_block, axis=-1)[..., :S], H // K, axis=1) & M.causal().materialize(T, S)
    o_slc = attention_reference(q, k, v, mask=M.dense(m), scale=scale)
    o_win = attention_reference(q, k, v, mask=M.sliding_window(window - 1), scale=scale)
    return _combine(gates, o_cmp, o_slc, o_win, q.dtype)


DECLARATION = declare(Declaration(
    name="nsa", family="sparse", title="NSA (compressed + selected + sliding-window branches)",
    papers=(Paper("Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention", 2025,
                  "2502.11089", "Yuan et al."),),
    summary="o = g_cmp Attn(q, mean-pooled K~, V~) + g_slc Attn(q, top-n blocks by p_cmp) + g_win Attn(q, window)",
    op=nsa, forms=("xla",), directions=("causal",),
    notes="mean-pool compression (the paper's MLP phi not implemented); gates are inputs; no mixer or decode yet"))
