"""Tile schedules and tile layouts for blockwise (flash-style) attention in plain XLA.

A tiled attention cuts queries into blocks of ``bq`` rows and keys into blocks of ``bk``
columns and visits only the ``(query block, key block)`` tiles a mask leaves visible.  This
module holds the parts that do not depend on what a tile computes:

* :class:`TileSchedule`: the labels EMPTY / PARTIAL / FULL of every tile (from
  :meth:`attn_jax.masks.Mask.classify`), the padded lists of FULL and PARTIAL key blocks per
  query block (forward) and of query blocks per key block (backward), and
  :meth:`TileSchedule.visit`, which runs a tile body over exactly those tiles (FULL tiles first,
  then PARTIAL ones; data-dependent masks pick ``skip | partial | full`` per tile with
  ``lax.switch`` from their traced labels).
* layouts: ``[B, T, H, D] -> [nq, B, K, G, bq, D]`` for queries and ``[B, S, K, D] ->
  [B, nk, bk, K, D]`` for keys/values (GQA by grouping: no K/V repeat), and back.

The exact-softmax XLA path (:mod:`attn_jax.softmax.xla`) and the row-local normalisers of
:mod:`attn_jax.variants` both run on it; :func:`tile_visibility` holds the NaN-safety rule (rows past
``T`` and keys past ``S`` are no pairs).
No function here builds a ``T x S`` array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from jax import lax

from attn_jax.core import masks as M
from attn_jax.core.validation import AttentionDims

__all__ = ["EMPTY", "PARTIAL", "FULL", "Tiling", "tiling", "split_static", "reduce_kinds", "tile_lists",
           "TileSchedule", "pad_axis", "layout_q", "unlayout_q", "layout_kv", "unlayout_kv", "kv_tile", "heads5",
           "tile_visibility", "tile_columns", "sum_to"]

EMPTY, PARTIAL, FULL = M.EMPTY, M.PARTIAL, M.FULL


@dataclass(frozen=True)
class Tiling(AttentionDims):
    """Static sizes of one tiled call: the problem's :class:`~attn_jax.core.validation.AttentionDims`
    (``q [B, T, H, Dk]``, ``k/v [B, S, K, D]``) plus the block sizes; ``G = H / K``."""

    bq: int
    bk: int

    @property
    def G(self) -> int:
        return self.groups

    @property
    def nq(self) -> int:
        return -(-self.T // self.bq)

    @property
    def nk(self) -> int:
        return -(-self.S // self.bk)


def tiling(B: int, T: int, S: int, H: int, K: int, Dk: int, Dv: int, block_q: int, block_k: int) -> Tiling:
    """A :class:`Tiling` with the block sizes clipped to the sequence lengths."""
    return Tiling(B, T, S, H, K, Dk, Dv, max(1, min(int(block_q), T)), max(1, min(int(block_k), S)))


# ----------------------------------------------------------------------------- schedules


def split_static(mask):
    """``(static part, dynamic part)`` whose conjunction is ``mask`` (either may be None)."""
    if mask is None:
        return None, None
    if mask.is_static:
        return mask, None
    parts = mask.conjuncts()
    return M.all_of(*(p for p in parts if p.is_static)), M.all_of(*(p for p in parts if not p.is_static))


def reduce_kinds(cls, xp):
    """``[B|1, H|1, nq, nk]`` tile labels -> one label per tile valid for every ``(b, h)``."""
    lo = cls.min(axis=(0, 1))
    hi = cls.max(axis=(0, 1))
    return xp.where(hi == EMPTY, EMPTY, xp.where(lo == FULL, FULL, PARTIAL)).astype(xp.int32)


def tile_lists(kinds: np.ndarray, kind: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``kinds``: the padded column indices with label ``kind``, and their count."""
    rows = [np.nonzero(r == kind)[0] for r in kinds]
    width = max(1, max(len(r) for r in rows))
    idx = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = r
    return idx, np.array([len(r) for r in rows], np.int32)


class TileSchedule:
    """Which tiles a masked tiled attention visits (see the module docstring).

    ``kinds`` (NumPy ``[nq, nk]``) comes from the static part of ``mask``; keys past ``S`` in a
    ragged last key block make that column at most PARTIAL, so the tile body must apply the
    predicate there.  The dynamic part (segments, key padding, dense masks, per-row offsets)
    is classified from the traced mask passed to :meth:`visit`.
    """

    def __init__(self, t: Tiling, mask):
        self.t = t
        static, dynamic = split_static(mask)
        kinds = np.full((t.nq, t.nk), FULL, np.int32)
        if static is not None:
            kinds = np.minimum(kinds, reduce_kinds(np.asarray(static.classify(t.T, t.S, t.bq, t.bk)), np))
        if t.S % t.bk:
            kinds[:, -1] = np.minimum(kinds[:, -1], PARTIAL)
        self.kinds = kinds
        self.has_dynamic = dynamic is not None
        self.forward_lists = {k: tile_lists(kinds, k) for k in (FULL, PARTIAL)}
        self.backward_lists = {k: tile_lists(kinds.T, k) for k in (FULL, PARTIAL)}

    def dynamic_kinds(self, mask):
        """Traced ``[nq, nk]`` labels of the dynamic part of ``mask`` (None without one)."""
        if not self.has_dynamic:
            return None
        _, dyn = split_static(mask)
        return reduce_kinds(dyn.classify(self.t.T, self.t.S, self.t.bq, self.t.bk), jnp)

    def visit(self, dkinds, row, body: Callable[[Any, int, Any], Any], carry, *, backward: bool = False):
        """Run ``carry = body(col, kind, carry)`` over the FULL then PARTIAL tiles of ``row``.

        Forward: ``row`` is a query block and ``col`` a key block; ``backward=True`` swaps them
        (``row`` a key block, ``col`` a query block).  ``kind`` is the static label the body
        may specialise on (FULL: no predicate needed).  ``dkinds``: :meth:`dynamic_kinds` of the
        traced mask, computed once by the caller outside its loop over rows (None without a
        dynamic part).
        """
        lists = self.backward_lists if backward else self.forward_lists
        for kind in (FULL, PARTIAL):
            idx_np, cnt_np = lists[kind]
            if cnt_np.max() == 0:
                continue
            idx, cnt = jnp.asarray(idx_np), jnp.asarray(cnt_np)

            def step(i, carry, kind=kind, idx=idx):
                col = idx[row, i]
                if dkinds is None:
                    return body(col, kind, carry)
                dk = dkinds[col, row] if backward else dkinds[row, col]
                dk = jnp.minimum(dk, kind)
                branches = [lambda c: c, lambda c: body(col, PARTIAL, c)]
                if kind == FULL:
                    branches.append(lambda c: body(col, FULL, c))
                return lax.switch(dk, branches, carry)

            carry = lax.fori_loop(0, cnt[row], step, carry)
        return carry


# ----------------------------------------------------------------------------- layouts


def pad_axis(x, axis: int, n: int):
    """Zero-pad ``x`` along ``axis`` to length ``n``."""
    if x.shape[axis] == n:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad)


def layout_q(x, t: Tiling):
    """``[B, T, H, D] -> [nq, B, K, G, bq, D]``."""
    D = x.shape[-1]
    x = pad_axis(x, 1, t.nq * t.bq).reshape(t.B, t.nq, t.bq, t.K, t.G, D)
    return x.transpose(1, 0, 3, 4, 2, 5)


def unlayout_q(x, t: Tiling):
    """``[nq, B, K, G, bq, D] -> [B, T, H, D]`` (or ``[nq, B, K, G, bq] -> [B, T, H]``)."""
    if x.ndim == 6:
        x = x.transpose(1, 0, 4, 2, 3, 5).reshape(t.B, t.nq * t.bq, t.H, x.shape[-1])
    else:
        x = x.transpose(1, 0, 4, 2, 3).reshape(t.B, t.nq * t.bq, t.H)
    return x[:, :t.T]


def layout_kv(x, t: Tiling):
    """``[B, S, K, D] -> [B, nk, bk, K, D]`` (a free reshape unless ``S`` is ragged)."""
    return pad_axis(x, 1, t.nk * t.bk).reshape(t.B, t.nk, t.bk, t.K, x.shape[-1])


def unlayout_kv(x, t: Tiling):
    """``[nk, B, bk, K, D] -> [B, S, K, D]``."""
    return x.transpose(1, 0, 2, 3, 4).reshape(t.B, t.nk * t.bk, t.K, x.shape[-1])[:, :t.S]


def kv_tile(x_l, j):
    """Key block ``j`` of a laid-out ``[B, nk, bk, K, D]`` array: ``[B, bk, K, D]``."""
    return lax.dynamic_index_in_dim(x_l, j, axis=1, keepdims=False)


def heads5(x, t: Tiling):
    """``[B|1, H|1, tq, tk] -> [B|1, K|1, G|1, tq, tk]`` (grouped heads)."""
    x = jnp.asarray(x)
    if x.ndim < 4:
        x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    b, h, tq, tk = x.shape
    if h == 1:
        return x.reshape(b, 1, 1, tq, tk)
    return x.reshape(b, t.K, t.G, tq, tk)


def tile_visibility(t: Tiling, mask, qidx, kidx):
    """Which (query, key) pairs of a tile are real and visible, ``[B|1, K|1, G|1, bq, bk]``: the mask
    predicate, and neither a query row past ``T`` nor a key past ``S``.  The zero padding of a ragged
    last block is no query and no key, so a key that only phantom rows past ``T`` could see counts as
    unused (it may hold NaN; the tile zeroes it before any product)."""
    vis = ((qidx < t.T)[:, None] & (kidx < t.S)[None, :])[None, None, None]
    if mask is not None:
        vis = vis & heads5(mask.predicate(qidx, kidx, t.T, t.S), t)
    return vis


def tile_columns(vis):
    """``[B|1, K|1, G|1, bq, bk]`` visibility -> key columns some pair of the tile uses, ``[B|1, bk, K|1, 1]``."""
    return vis.any(axis=(2, 3)).transpose(0, 2, 1)[..., None]


def sum_to(x, shape):
    """Sum ``x`` down to the broadcast-compatible ``shape`` (same rank)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x
