"""Attention masks: one algebra, three lowerings.

A mask says which key ``j`` each query ``i`` may attend to.  Masks compose with
``&`` (both allow) and ``|`` (either allows).  Every mask offers three
lowerings, so no fast path ever needs a ``T x S`` boolean array:

1. ``materialize(T, S) -> bool[B|1, H|1, T, S]`` — for references and tests.
2. ``classify(T, S, bq, bk) -> int8[B|1, H|1, nq, nk]`` — each ``(bq, bk)`` tile
   is :data:`EMPTY` (no visible pair: skip it), :data:`FULL` (every pair
   visible: skip the predicate) or :data:`PARTIAL`.  Masks whose structure is
   independent of the data (``is_static``) return a NumPy array at trace time,
   so work can be skipped at compile time; data-dependent masks return a JAX
   array.  Classification is *sound*: a tile called EMPTY has no visible pair
   and a tile called FULL has no hidden pair.  It is *exact* for every primitive
   mask; compositions with ``&``/``|`` may call a tile PARTIAL that is in fact
   empty or full (the predicate still gives the right answer).
3. ``predicate(q_idx, k_idx, T, S) -> bool[B|1, H|1, tq, tk]`` — elementwise
   evaluation on (possibly traced) index vectors, for partial tiles.

Alignment.  When ``T != S`` the positional masks (causal, sliding window,
chunked, prefix-LM) are *bottom-right aligned*: query ``i`` sits at position
``i + (S - T)``, so the last query lines up with the last key.  That is what
decoding and chunked prefill need (``jax.nn.dot_product_attention`` aligns
top-left instead).  Pass ``offset=`` to choose the query position explicitly:
query ``i`` is at position ``i + offset``.  ``offset`` may be an int or an
integer array of shape ``[B]`` (per-row offsets, e.g. a KV cache whose rows
hold different lengths; the mask is then data-dependent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.core.checks import check_segment_ids

EMPTY, PARTIAL, FULL = 0, 1, 2

__all__ = [
    "EMPTY", "PARTIAL", "FULL", "Mask", "causal", "sliding_window", "chunked", "segments",
    "prefix_lm", "dense", "key_padding", "as_mask", "all_of", "is_concrete_int",
    "PositionalMask", "Causal", "SlidingWindow", "Chunked", "PrefixLM", "Segments", "KeyPadding", "DenseMask",
    "Combination",
]


def is_concrete_int(x) -> bool:
    """True for a Python / NumPy integer (not a bool, not an array): a static value."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _block_bounds(n: int, b: int):
    """First and last valid index of every block of size b over n positions."""
    starts = np.arange(0, n, b)
    ends = np.minimum(starts + b, n) - 1
    return starts, ends


def _check_block_sizes(T, S, bq, bk):
    for name, v in (("bq", bq), ("bk", bk)):
        if not is_concrete_int(v) or v <= 0:
            raise ValueError(f"block size {name} must be a positive int, got {v!r}")
    for name, v in (("T", T), ("S", S)):
        if not is_concrete_int(v) or v <= 0:
            raise ValueError(f"sequence length {name} must be a positive int, got {v!r}")


class Mask:
    """Base class.  Subclasses implement ``predicate`` and ``classify``.

    The mask classes are public and frozen (dataclasses: backends ``match`` on them, e.g.
    ``case Causal(offset=off)``); build them with the constructor functions below, which
    validate their arguments.  :meth:`conjuncts` lists the masks whose conjunction this is.
    """

    #: True when visibility depends only on (i, j, T, S), not on array data.
    is_static: bool = True

    def predicate(self, q_idx, k_idx, T: int, S: int):
        raise NotImplementedError

    def classify(self, T: int, S: int, bq: int, bk: int):
        raise NotImplementedError

    def materialize(self, T: int, S: int):
        out = self.predicate(jnp.arange(T, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32), T, S)
        return jnp.asarray(out, dtype=bool)

    def check(self, B: int, H: int, T: int, S: int) -> None:
        """Raise ValueError if the mask cannot broadcast to ``[B, H, T, S]``."""

    def arrays(self) -> tuple:
        """The data arrays the mask holds (for NaN-safety and sharding logic)."""
        return ()

    def conjuncts(self) -> tuple["Mask", ...]:
        """The masks whose ``&`` is this mask: the parts of an ``&`` composition, else ``(self,)``."""
        return (self,)

    def __and__(self, other: "Mask") -> "Mask":
        return Combination("and", (self, as_mask(other)))

    def __or__(self, other: "Mask") -> "Mask":
        return Combination("or", (self, as_mask(other)))

    def __rand__(self, other):
        return as_mask(other) & self

    def __ror__(self, other):
        return as_mask(other) | self


# ----------------------------------------------------------------------------- positional masks


class PositionalMask(Mask):
    """Masks defined by the query position ``p = i + offset`` and key index ``j``."""

    def __post_init__(self):
        offset = self.offset
        if offset is not None and not is_concrete_int(offset):
            offset = jnp.asarray(offset)
            if not jnp.issubdtype(offset.dtype, jnp.integer):
                raise TypeError(f"offset must be an int or an integer array of shape [B], got dtype {offset.dtype}")
            if offset.ndim != 1:
                raise ValueError(f"offset array must have shape [B], got shape {offset.shape}")
            object.__setattr__(self, "offset", offset)

    @property
    def is_static(self) -> bool:
        return self.offset is None or is_concrete_int(self.offset)

    def query_offset(self, T: int, S: int):
        """Position of query 0: ``S - T`` by default (bottom-right), else the int or ``[B]`` array given."""
        return S - T if self.offset is None else self.offset

    def _offset(self, T, S, xp):
        """Offset broadcastable to [B|1, 1, 1, 1] (arrays) or a Python int."""
        if self.offset is None:
            return S - T
        if is_concrete_int(self.offset):
            return int(self.offset)
        return xp.asarray(self.offset).reshape(-1, 1, 1, 1)

    def check(self, B, H, T, S):
        if self.offset is not None and not is_concrete_int(self.offset):
            if self.offset.shape[0] not in (1, B):
                raise ValueError(f"mask offset: expected shape [{B}] (or [1]), got {tuple(self.offset.shape)}")

    def arrays(self):
        return () if self.offset is None or is_concrete_int(self.offset) else (self.offset,)

    def predicate(self, q_idx, k_idx, T, S):
        p = jnp.asarray(q_idx)[:, None] + self._offset(T, S, jnp)
        j = jnp.asarray(k_idx)[None, :]
        out = self._visible(p, j)  # [tq, tk], or [B, 1, tq, tk] with per-row offsets
        return out if out.ndim == 4 else out[None, None]

    def classify(self, T, S, bq, bk):
        _check_block_sizes(T, S, bq, bk)
        xp = np if self.is_static else jnp
        off = self._offset(T, S, xp)
        qs, qe = _block_bounds(T, bq)
        ks, ke = _block_bounds(S, bk)
        pmin = qs[:, None] + off  # broadcasts to [B|1,1,nq,1] or [nq,1]
        pmax = qe[:, None] + off
        kmin = ks[None, :]
        kmax = ke[None, :]
        empty, full = self._classify(pmin, pmax, kmin, kmax, xp)
        cls = xp.where(empty, EMPTY, xp.where(full, FULL, PARTIAL)).astype(xp.int8)
        if cls.ndim == 2:
            cls = cls[None, None]
        return cls


@dataclass(frozen=True, eq=False)
class Causal(PositionalMask):
    offset: Any = None

    def _visible(self, p, j):
        return j <= p

    def _classify(self, pmin, pmax, kmin, kmax, xp):
        return kmin > pmax, kmax <= pmin

    def __repr__(self):
        return f"causal(offset={self.offset!r})"


@dataclass(frozen=True, eq=False)
class SlidingWindow(PositionalMask):
    left: int
    right: int = 0
    offset: Any = None

    # Bounds are compared as differences (p - j <= left, j - p <= right), never as sums such as
    # p + right: with a window up to 2**31 - 1 the sum would wrap around in int32.

    def _visible(self, p, j):
        return (p - j <= self.left) & (j - p <= self.right)

    def _classify(self, pmin, pmax, kmin, kmax, xp):
        # Some query in [pmin, pmax] sees some key in [kmin, kmax] iff the query range
        # intersects [kmin - right, kmax + left]: empty iff it lies wholly after (pmin - kmax > left)
        # or wholly before (kmin - pmax > right) that range.
        empty = (pmin - kmax > self.left) | (kmin - pmax > self.right)
        full = (kmax - pmin <= self.right) & (pmax - kmin <= self.left)
        return empty, full

    def __repr__(self):
        return f"sliding_window(left={self.left}, right={self.right}, offset={self.offset!r})"


@dataclass(frozen=True, eq=False)
class Chunked(PositionalMask):
    size: int
    offset: Any = None

    def _visible(self, p, j):
        return (p // self.size) == (j // self.size)

    def _classify(self, pmin, pmax, kmin, kmax, xp):
        s = self.size
        cq0, cq1 = xp.floor_divide(pmin, s), xp.floor_divide(pmax, s)
        ck0, ck1 = xp.floor_divide(kmin, s), xp.floor_divide(kmax, s)
        empty = (cq1 < ck0) | (ck1 < cq0)
        full = (cq0 == cq1) & (ck0 == ck1) & (cq0 == ck0)
        return empty, full

    def __repr__(self):
        return f"chunked(size={self.size}, offset={self.offset!r})"


@dataclass(frozen=True, eq=False)
class PrefixLM(PositionalMask):
    prefix_len: int
    offset: Any = None

    def _visible(self, p, j):
        return (j < self.prefix_len) | (j <= p)

    def _classify(self, pmin, pmax, kmin, kmax, xp):
        n = self.prefix_len
        empty = (kmin >= n) & (kmin > pmax)
        full = kmax < xp.maximum(n, pmin + 1)
        return empty, full

    def __repr__(self):
        return f"prefix_lm(prefix_len={self.prefix_len}, offset={self.offset!r})"


#: The largest window bound, chunk size or prefix length a mask accepts: positions are int32.
MAX_INT32 = int(np.iinfo(np.int32).max)


def _check_nonneg_int(name, v):
    if not is_concrete_int(v):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    if v > MAX_INT32:
        raise ValueError(f"{name} must be <= 2**31 - 1 = {MAX_INT32} (positions are int32), got {v}")


def causal(offset=None) -> Mask:
    """Key ``j`` visible to query ``i`` iff ``j <= i + offset`` (default offset ``S - T``)."""
    return Causal(offset)


def sliding_window(left: int, right: int = 0, *, offset=None) -> Mask:
    """Key ``j`` visible to query ``i`` iff ``p - left <= j <= p + right``, ``p = i + offset``.

    Both bounds are inclusive: ``sliding_window(w)`` lets a query see itself and the
    ``w`` keys before it (``w + 1`` keys in all).  It is *not* causal by itself when
    ``right > 0``; ``sliding_window(w)`` with the default ``right=0`` is causal.  ``left`` and
    ``right`` may be as large as ``2**31 - 1`` (an unbounded side); the bounds are evaluated as
    differences ``p - j`` and ``j - p``, so they never overflow int32.
    """
    _check_nonneg_int("left", left)
    _check_nonneg_int("right", right)
    return SlidingWindow(int(left), int(right), offset)


def chunked(size: int, *, offset=None) -> Mask:
    """Bidirectional local blocks: visible iff ``p // size == j // size``.

    Combine with ``causal()`` for causal chunked attention (Llama-4 style).
    """
    _check_nonneg_int("size", size)
    if size == 0:
        raise ValueError("size must be >= 1, got 0")
    return Chunked(int(size), offset)


def prefix_lm(prefix_len: int, *, offset=None) -> Mask:
    """Bidirectional over the first ``prefix_len`` keys, causal after them."""
    _check_nonneg_int("prefix_len", prefix_len)
    return PrefixLM(int(prefix_len), offset)


# ----------------------------------------------------------------------------- data masks


def _block_minmax(ids, n: int, b: int, fill_min, fill_max):
    """Per-block min and max of ids[..., n] over valid positions; ids: [B, n]."""
    nb = -(-n // b)
    pad = nb * b - n
    lo = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=fill_min).reshape(ids.shape[0], nb, b)
    hi = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=fill_max).reshape(ids.shape[0], nb, b)
    return lo.min(-1), hi.max(-1)


@dataclass(frozen=True, eq=False)
class Segments(Mask):
    """Packed documents (:func:`segments`); ``kv_ids`` None means the query ids."""

    q_ids: Any
    kv_ids: Any = None
    is_static = False

    def kv(self):
        """The key/value segment ids (the query ids when none were given)."""
        return self.q_ids if self.kv_ids is None else self.kv_ids

    def check(self, B, H, T, S):
        for name, ids, n in (("q_segment_ids", self.q_ids, T), ("kv_segment_ids", self.kv(), S)):
            if ids.ndim != 2 or ids.shape[0] not in (1, B) or ids.shape[1] != n:
                extra = " (kv_segment_ids defaults to q_segment_ids, which needs T == S)" if (
                    self.kv_ids is None and name == "kv_segment_ids") else ""
                raise ValueError(f"{name}: expected shape [{B}, {n}], got {tuple(ids.shape)}{extra}")

    def arrays(self):
        return (self.q_ids, self.kv())

    def predicate(self, q_idx, k_idx, T, S):
        qi = jnp.take(self.q_ids, q_idx, axis=1, mode="clip")
        ki = jnp.take(self.kv(), k_idx, axis=1, mode="clip")
        vis = (qi[:, :, None] == ki[:, None, :]) & (qi[:, :, None] != 0)
        return vis[:, None]

    def classify(self, T, S, bq, bk):
        _check_block_sizes(T, S, bq, bk)
        big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
        q = self.q_ids.astype(jnp.int32)
        k = self.kv().astype(jnp.int32)
        # Padding (id 0) never matches: treat it as "absent" for the range test.  Ranges over
        # real tokens only; a block of pure padding gets max = int32 min (a sentinel no id can
        # take, so even unchecked negative ids are classified as the predicate sees them).
        qmin = _block_minmax(jnp.where(q == 0, big, q), T, bq, big, small)[0]
        qmax = _block_minmax(jnp.where(q == 0, small, q), T, bq, big, small)[1]
        kmin = _block_minmax(jnp.where(k == 0, big, k), S, bk, big, small)[0]
        kmax = _block_minmax(jnp.where(k == 0, small, k), S, bk, big, small)[1]
        qmin_, qmax_ = qmin[:, :, None], qmax[:, :, None]
        kmin_, kmax_ = kmin[:, None, :], kmax[:, None, :]
        empty = (qmax_ < kmin_) | (kmax_ < qmin_) | (qmax_ == small) | (kmax_ == small)
        # a block is all real when none of its tokens is padding (positions past the end are ignored)
        q_all_real = _block_minmax((q != 0).astype(jnp.int32), T, bq, 1, 0)[0] > 0
        k_all_real = _block_minmax((k != 0).astype(jnp.int32), S, bk, 1, 0)[0] > 0
        full = ((qmin_ == qmax_) & (kmin_ == kmax_) & (qmin_ == kmin_)
                & q_all_real[:, :, None] & k_all_real[:, None, :])
        cls = jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int8)
        return cls[:, None]

    def __repr__(self):
        return f"segments(q_segment_ids{tuple(self.q_ids.shape)}, kv_segment_ids=" + (
            "None)" if self.kv_ids is None else f"{tuple(self.kv_ids.shape)})")


@dataclass(frozen=True, eq=False)
class KeyPadding(Mask):
    """Key padding by row lengths (:func:`key_padding`)."""

    lengths: Any
    is_static = False

    def check(self, B, H, T, S):
        if self.lengths.ndim != 1 or self.lengths.shape[0] not in (1, B):
            raise ValueError(f"key_padding lengths: expected shape [{B}], got {tuple(self.lengths.shape)}")

    def arrays(self):
        return (self.lengths,)

    def predicate(self, q_idx, k_idx, T, S):
        vis = jnp.asarray(k_idx)[None, None, None, :] < self.lengths[:, None, None, None]
        return jnp.broadcast_to(vis, (self.lengths.shape[0], 1, jnp.shape(q_idx)[0], jnp.shape(k_idx)[0]))

    def classify(self, T, S, bq, bk):
        _check_block_sizes(T, S, bq, bk)
        ks, ke = _block_bounds(S, bk)
        n = self.lengths[:, None, None, None]
        cls = jnp.where(ks >= n, EMPTY, jnp.where(ke < n, FULL, PARTIAL)).astype(jnp.int8)
        nq = -(-T // bq)
        return jnp.broadcast_to(cls, (self.lengths.shape[0], 1, nq, ks.shape[0]))

    def __repr__(self):
        return f"key_padding(lengths{tuple(self.lengths.shape)})"


@dataclass(frozen=True, eq=False)
class DenseMask(Mask):
    """An explicit boolean array (:func:`dense`)."""

    m: Any
    is_static = False

    def check(self, B, H, T, S):
        m = self.m
        if m.ndim != 4 or any(d not in (1, n) for d, n in zip(m.shape, (B, H, T, S))):
            raise ValueError(f"mask: expected an array broadcastable as [B|1, H|1, T|1, S|1] = "
                             f"[{B}|1, {H}|1, {T}|1, {S}|1], got shape {tuple(m.shape)}")

    def arrays(self):
        return (self.m,)

    def _full(self, T, S):
        return jnp.broadcast_to(self.m, self.m.shape[:2] + (T, S))

    def materialize(self, T, S):
        return self._full(T, S)

    def predicate(self, q_idx, k_idx, T, S):
        rows = jnp.take(self.m, q_idx, axis=2, mode="clip")
        return jnp.take(rows, k_idx, axis=3, mode="clip")

    def classify(self, T, S, bq, bk):
        _check_block_sizes(T, S, bq, bk)
        nq, nk = -(-T // bq), -(-S // bk)
        m = self._full(T, S)
        a = jnp.pad(m, ((0, 0), (0, 0), (0, nq * bq - T), (0, nk * bk - S)), constant_values=False)
        a = a.reshape(m.shape[0], m.shape[1], nq, bq, nk, bk)
        valid = np.zeros((nq * bq, nk * bk), bool)
        valid[:T, :S] = True
        valid = valid.reshape(nq, bq, nk, bk)
        any_ = a.any(axis=(3, 5))
        all_ = (a | ~valid[None, None]).all(axis=(3, 5))
        return jnp.where(~any_, EMPTY, jnp.where(all_, FULL, PARTIAL)).astype(jnp.int8)

    def __repr__(self):
        return f"dense({tuple(self.m.shape)})"


def _int_array(name, x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
    return x


def segments(q_segment_ids, kv_segment_ids=None) -> Mask:
    """Packed documents: visible iff the segment ids match and are non-zero (0 = padding).

    ``q_segment_ids: int[B, T]``; ``kv_segment_ids: int[B, S]`` (defaults to the query ids).
    Ids must be ``>= 0``: 0 marks padding and every positive id a document.  Negative ids are
    refused -- with a ``ValueError`` here when the ids are concrete, and by the opt-in value check
    (:func:`attn_jax.checked`, :func:`attn_jax.core.checks.check_segment_ids`) when they are traced
    -- so every backend (reference, xla, Pallas, decode) and the linear family's ``segment_ids``
    agree on one meaning.
    """
    q = _int_array("q_segment_ids", q_segment_ids)
    kv = None if kv_segment_ids is None else _int_array("kv_segment_ids", kv_segment_ids)
    if q.ndim != 2:
        raise ValueError(f"q_segment_ids: expected shape [B, T], got {tuple(q.shape)}")
    if kv is not None and kv.ndim != 2:
        raise ValueError(f"kv_segment_ids: expected shape [B, S], got {tuple(kv.shape)}")
    check_segment_ids("q_segment_ids", q)
    if kv is not None:
        check_segment_ids("kv_segment_ids", kv)
    return Segments(q, kv)


def key_padding(lengths) -> Mask:
    """Key ``j`` of batch row ``b`` is visible iff ``j < lengths[b]``."""
    n = _int_array("lengths", lengths)
    if n.ndim != 1:
        raise ValueError(f"lengths: expected shape [B], got {tuple(n.shape)}")
    return KeyPadding(n)


def dense(mask) -> Mask:
    """An explicit mask broadcastable to ``[B, H, T, S]`` (True / nonzero = attend).

    Rank 4 ``[B|1, H|1, T|1, S|1]`` or rank 3 ``[H|1, T|1, S|1]`` (a batch axis of 1 is
    added), as ``jax.nn`` and Flax accept them.  Boolean, integer and float arrays are
    accepted; numeric masks are converted with ``mask != 0`` (Flax's
    ``make_causal_mask`` gives float32 ones and zeros).  An *additive* float mask
    (0 / -inf) belongs in ``bias=``, not here.
    """
    m = jnp.asarray(mask)
    if m.dtype != jnp.bool_:
        if not (jnp.issubdtype(m.dtype, jnp.integer) or jnp.issubdtype(m.dtype, jnp.floating)):
            raise TypeError(f"mask: expected a boolean, integer or float array (nonzero = attend), got dtype {m.dtype}")
        m = m != 0
    if m.ndim == 3:
        m = m[None]
    if m.ndim != 4:
        raise ValueError(f"mask: expected rank 4 [B|1, H|1, T|1, S|1] or rank 3 [H|1, T|1, S|1], "
                         f"got shape {tuple(m.shape)}")
    return DenseMask(m)


# ----------------------------------------------------------------------------- composition


@dataclass(frozen=True, eq=False)
class Combination(Mask):
    """``op`` ("and" / "or") of ``parts``; nested compositions of the same op are flattened."""

    op: str
    parts: tuple

    def __post_init__(self):
        if self.op not in ("and", "or"):
            raise ValueError(f"op: expected 'and' or 'or', got {self.op!r}")
        flat = []
        for p in self.parts:
            flat.extend(p.parts if isinstance(p, Combination) and p.op == self.op else [p])
        object.__setattr__(self, "parts", tuple(flat))

    @property
    def is_static(self) -> bool:
        return all(p.is_static for p in self.parts)

    def conjuncts(self):
        return self.parts if self.op == "and" else (self,)

    def check(self, B, H, T, S):
        for p in self.parts:
            p.check(B, H, T, S)

    def arrays(self):
        return tuple(a for p in self.parts for a in p.arrays())

    def predicate(self, q_idx, k_idx, T, S):
        outs = [p.predicate(q_idx, k_idx, T, S) for p in self.parts]
        out = outs[0]
        for o in outs[1:]:
            out = (out & o) if self.op == "and" else (out | o)
        return out

    def classify(self, T, S, bq, bk):
        cls = [p.classify(T, S, bq, bk) for p in self.parts]
        xp = np if self.is_static else jnp
        out = cls[0]
        for c in cls[1:]:
            # EMPTY < PARTIAL < FULL: "and" is the elementwise min, "or" the max. Both are sound.
            out = xp.minimum(out, c) if self.op == "and" else xp.maximum(out, c)
        return out

    def __repr__(self):
        return "(" + f" {'&' if self.op == 'and' else '|'} ".join(map(repr, self.parts)) + ")"


# ----------------------------------------------------------------------------- pytrees
# Masks are pytrees: their arrays (segment ids, lengths, dense masks, per-row offsets) are the
# leaves and everything else is static, so masks can cross jit, custom_vjp and vmap boundaries.


def _flatten_leaf_mask(m):
    arrays = tuple(sorted(n for n, x in vars(m).items() if isinstance(x, jax.Array)))
    static = tuple(sorted((n, x) for n, x in vars(m).items() if n not in arrays))
    return tuple(getattr(m, n) for n in arrays), (arrays, static)


def _unflatten_leaf_mask(cls):
    def unflatten(aux, children):
        arrays, static = aux
        m = object.__new__(cls)
        for n, x in (*static, *zip(arrays, children)):
            object.__setattr__(m, n, x)
        return m
    return unflatten


for _cls in (Causal, SlidingWindow, Chunked, PrefixLM, Segments, KeyPadding, DenseMask):
    jax.tree_util.register_pytree_node(_cls, _flatten_leaf_mask, _unflatten_leaf_mask(_cls))


def _unflatten_combine(op, parts):
    m = object.__new__(Combination)
    object.__setattr__(m, "op", op)
    object.__setattr__(m, "parts", tuple(parts))
    return m


jax.tree_util.register_pytree_node(Combination, lambda m: (m.parts, m.op), _unflatten_combine)


def as_mask(mask: Any) -> Mask | None:
    """None -> None; a Mask -> itself; an array (boolean or numeric, nonzero = attend) -> :func:`dense`."""
    if mask is None or isinstance(mask, Mask):
        return mask
    if isinstance(mask, (jax.Array, np.ndarray)):
        return dense(mask)
    raise TypeError(f"mask: expected an attn_jax.masks.Mask, an array (True / nonzero = attend) or None, got {type(mask).__name__}")


def all_of(*parts: Mask) -> Mask | None:
    """The ``&`` of ``parts`` (None when there are none; the mask itself when there is one)."""
    parts = tuple(as_mask(p) for p in parts if p is not None)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else Combination("and", parts)
