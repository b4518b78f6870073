"""Key/value caches for autoregressive decoding: contiguous, ring buffer, paged.

Incremental decoding keeps the keys and values of every past token so that step
``t`` costs one query against ``t`` cached keys instead of a full recomputation
("Fast Transformer Decoding: One Write-Head is All You Need", Shazeer, 2019,
arXiv:1911.02150 — which also shows why the cache's memory traffic, ``B * S * K *
(Dk + Dv)`` per step, is what decoding speed is about, hence MQA/GQA: ``K < H``).

All caches are immutable pytrees: ``append`` returns a new cache, so every
function here works under ``jit``/``vmap`` and the buffers can be donated.  Shapes
are fixed at ``init``; fill levels (``lengths``) are traced int32 arrays, so a
jitted decode step compiles once and runs for every step.

Three layouts, one write rule — token ``t`` of the chunk appended to row ``b``
lands at absolute position ``p = lengths[b] + t`` (only for ``t < n_new[b]``):

* :class:`KVCache` — ``k: [B, S_max, K, Dk]``, ``v: [B, S_max, K, Dv]``,
  ``lengths: int32[B]``.  Position ``p`` is stored at index ``p``.  Rows may hold
  different lengths (a batch of prompts of different lengths: pass
  ``n_new``).  **Overflow**: ``append`` raises ``ValueError`` at trace time if a
  chunk is longer than ``S_max``; tokens that would land at ``p >= S_max`` (only
  detectable at run time) are dropped and ``lengths`` saturates at ``S_max`` —
  outputs for such tokens are not meaningful; size the cache for the longest
  sequence.  Under :func:`attn_jax.checked` such an append raises instead
  (:mod:`attn_jax.core.checks`; so does a paged write to an unallocated page).
* :class:`RingKVCache` — sliding-window attention only ever needs the last
  ``window`` keys, so a ring of ``capacity = W`` slots (default ``window + 1``)
  stores position ``p`` at slot ``p % W`` and records it in ``positions[b, slot]``
  (``-1`` = empty), which keeps the mask exact.  A chunk longer than ``W`` keeps
  only its last ``W`` tokens.  Because the queries of a chunk need keys that the
  chunk itself overwrites, :func:`attn_jax.softmax.decode.prefill` attends over
  ``concat(ring before the write, chunk)`` and writes afterwards; any chunk
  length works with ``W >= window``.
* :class:`PagedKVCache` — "Efficient Memory Management for Large Language Model
  Serving with PagedAttention", Kwon et al., 2023, arXiv:2309.06180.  A shared
  pool of fixed-size pages ``k_pages: [num_pages, page_size, K, Dk]`` and a
  per-row ``page_table: int32[B, max_pages_per_seq]``: position ``p`` of row ``b``
  lives in page ``page_table[b, p // page_size]`` at slot ``p % page_size``
  (``-1`` = unallocated; writes there are dropped).  :meth:`PagedKVCache.gather`
  rebuilds the contiguous ``[B, max_pages * page_size, K, D]`` view — the gather
  reference.  Page allocation is host-side bookkeeping (:class:`PageAllocator`);
  rows must not share a writable page (no copy-on-write here).

Written values are cast to the cache dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float, Int

from attn_jax.core import checks
from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike

__all__ = ["KVCache", "RingKVCache", "PagedKVCache", "PageAllocator"]


# ----------------------------------------------------------------------------- helpers


def _check_int(name: str, x, lo: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__} {x!r}")
    if x < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {x}")
    return int(x)


def _check_new_kv(k_new, v_new, B: int, K: int, Dk: int, Dv: int, what: str):
    """Validate ``k_new: [B, T, K, Dk]``, ``v_new: [B, T, K, Dv]`` against a cache; return T."""
    for name, x, layout in (("k_new", k_new, "[B, T, K, Dk]"), ("v_new", v_new, "[B, T, K, Dv]")):
        V.check_float_array(name, x)
        V.check_rank(name, x, 4, layout)
    if k_new.shape[0] != B or v_new.shape[0] != B:
        raise ValueError(f"k_new/v_new: {what} has batch B={B}, got k_new {V.shape_str(k_new)}, "
                         f"v_new {V.shape_str(v_new)}")
    T = k_new.shape[1]
    if v_new.shape[1] != T:
        raise ValueError(f"v_new: expected sequence length {T} (as k_new), got {V.shape_str(v_new)}")
    if k_new.shape[2] != K or v_new.shape[2] != K:
        raise ValueError(f"k_new/v_new: {what} has K={K} kv heads, got k_new {V.shape_str(k_new)}, "
                         f"v_new {V.shape_str(v_new)}")
    if k_new.shape[3] != Dk:
        raise ValueError(f"k_new: {what} has head_dim Dk={Dk}, got {V.shape_str(k_new)}")
    if v_new.shape[3] != Dv:
        raise ValueError(f"v_new: {what} has value_dim Dv={Dv}, got {V.shape_str(v_new)}")
    if T == 0:
        raise ValueError("k_new: empty chunk (T = 0)")
    return T


def new_token_counts(n_new, B: int, T: int):
    """Per-row number of valid new tokens, int32[B] (traced values allowed)."""
    if n_new is None:
        return jnp.full((B,), T, jnp.int32)
    return jnp.clip(V.int_rows("n_new", n_new, B), 0, T)


def _init_buffers(batch, max_len, kv_heads, head_dim, dtype, value_dim):
    batch = _check_int("batch", batch)
    max_len = _check_int("max_len", max_len)
    kv_heads = _check_int("kv_heads", kv_heads)
    head_dim = _check_int("head_dim", head_dim)
    value_dim = head_dim if value_dim is None else _check_int("value_dim", value_dim)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
    k = jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
    v = jnp.zeros((batch, max_len, kv_heads, value_dim), dtype)
    return k, v


def _scatter_tokens(buf, rows, cols, values):
    """``buf[rows, cols] = values`` with out-of-range indices dropped (the "invalid" marker)."""
    return buf.at[rows, cols].set(values.astype(buf.dtype), mode="drop", unique_indices=False)


def _write_windows(buf, new, starts, first, n, rows=None):
    """In-place-friendly write of ``new[b, i]`` at ``buf[rows[b], starts[b] + i]``, one row at a time.

    The window ``starts[b] .. starts[b] + T - 1`` must lie inside ``buf``; slot ``starts[b] + i``
    receives new token ``starts[b] + i - first[b]`` when that index is in ``[0, n[b])`` and keeps
    its old value otherwise.  A ``fori_loop`` of ``dynamic_update_slice`` (not a scatter) lets
    XLA update a donated buffer in place: a masked scatter lowers to a select over the whole
    buffer, and attention loops that read the result then force copies of the cache per step.
    """
    B, T = new.shape[:2]
    new = jnp.asarray(new).astype(buf.dtype)  # NumPy input: indexed with a traced row below
    rows = jnp.arange(B, dtype=jnp.int32) if rows is None else rows
    zeros = (0,) * (buf.ndim - 2)

    def body(b, buf):
        start = starts[b]
        old = jax.lax.dynamic_slice(buf, (rows[b], start, *zeros), (1, T, *buf.shape[2:]))[0]
        idx = start + jnp.arange(T, dtype=jnp.int32) - first[b]
        val = jnp.take(new[b], jnp.clip(idx, 0, T - 1), axis=0)
        ok = ((idx >= 0) & (idx < n[b])).reshape((T,) + (1,) * (buf.ndim - 2))
        return jax.lax.dynamic_update_slice(buf, jnp.where(ok, val, old)[None], (rows[b], start, *zeros))

    return jax.lax.fori_loop(0, B, body, buf)


def _register(cls, data, meta=()):
    return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))


class _BufferProperties:
    """Shape properties and ``replace`` shared by caches holding ``k: [B, S|W, K, Dk]``."""

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self):
        return self.k.dtype

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------- contiguous cache


# Cache fields are annotated Any (shapes in comments): a pytree's leaves may be anything JAX
# puts there while transforming it (tracers, ShapeDtypeStructs, lowering ArgInfos, NumPy arrays).
@dataclasses.dataclass(frozen=True)
class KVCache(_BufferProperties):
    """Contiguous per-row cache: position ``p`` of row ``b`` at ``k[b, p]`` (see module docstring)."""

    k: Any   # [B, S, K, Dk]
    v: Any   # [B, S, K, Dv]
    lengths: Any   # [B]

    @classmethod
    def init(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32,
             value_dim: int | None = None) -> "KVCache":
        k, v = _init_buffers(batch, max_len, kv_heads, head_dim, dtype, value_dim)
        return cls(k, v, jnp.zeros((k.shape[0],), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def append(self, k_new: Float[ArrayLike, "B T K Dk"], v_new: Float[ArrayLike, "B T K Dv"],
               n_new: Int[ArrayLike, "B"] | None = None) -> "KVCache":
        """Write ``k_new[b, :n_new[b]]`` at positions ``lengths[b] ...``; return the new cache."""
        B, S, K, Dk = self.k.shape
        T = _check_new_kv(k_new, v_new, B, K, Dk, self.v.shape[3], f"cache {type(self).__name__}")
        if T > S:
            raise ValueError(f"k_new: chunk of T_new={T} tokens exceeds the cache capacity max_len={S}")
        n = new_token_counts(n_new, B, T)
        checks.check_capacity("k_new", self.lengths, n, S)
        # Window [start, start + T) inside the buffer; positions >= S fall outside it (dropped).
        starts = jnp.clip(self.lengths, 0, S - T)
        k = _write_windows(self.k, k_new, starts, self.lengths, n)
        v = _write_windows(self.v, v_new, starts, self.lengths, n)
        return KVCache(k, v, jnp.minimum(self.lengths + n, S).astype(jnp.int32))



_register(KVCache, ("k", "v", "lengths"))


# ----------------------------------------------------------------------------- ring buffer


@dataclasses.dataclass(frozen=True)
class RingKVCache(_BufferProperties):
    """Sliding-window cache of ``capacity`` slots; position ``p`` at slot ``p % capacity``.

    ``positions[b, s]`` is the absolute position held in slot ``s`` (``-1``: empty);
    ``lengths[b]`` counts every token ever appended (the next absolute position).
    ``window`` (static) is the ``left`` of ``masks.sliding_window(window)``: a query
    sees itself and the ``window`` keys before it.
    """

    k: Any   # [B, W, K, Dk]
    v: Any   # [B, W, K, Dv]
    positions: Any   # [B, W]
    lengths: Any   # [B]
    window: int

    @classmethod
    def init(cls, batch: int, window: int, kv_heads: int, head_dim: int, dtype=jnp.float32,
             value_dim: int | None = None, capacity: int | None = None) -> "RingKVCache":
        window = _check_int("window", window, lo=0)
        capacity = window + 1 if capacity is None else _check_int("capacity", capacity)
        if capacity < max(window, 1):
            raise ValueError(f"capacity: a ring for window={window} needs capacity >= {max(window, 1)}, "
                             f"got {capacity}")
        k, v = _init_buffers(batch, capacity, kv_heads, head_dim, dtype, value_dim)
        return cls(k, v, jnp.full((k.shape[0], capacity), -1, jnp.int32), jnp.zeros((k.shape[0],), jnp.int32),
                   window)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def append(self, k_new, v_new, n_new=None) -> "RingKVCache":
        """Write the valid tokens of a chunk; only the last ``capacity`` of them are kept."""
        B, W, K, Dk = self.k.shape
        T = _check_new_kv(k_new, v_new, B, K, Dk, self.v.shape[3], "ring cache")
        n = new_token_counts(n_new, B, T)
        t = jnp.arange(T, dtype=jnp.int32)[None, :]
        pos = self.lengths[:, None] + t
        # Tokens older than the last W of the chunk would collide on a slot (scatter order
        # with duplicate indices is unspecified), so they are dropped, not overwritten.
        keep = (t < n[:, None]) & (t >= n[:, None] - W)
        cols = jnp.where(keep, pos % W, W)
        rows = jnp.arange(B, dtype=jnp.int32)[:, None]
        k = _scatter_tokens(self.k, rows, cols, k_new)
        v = _scatter_tokens(self.v, rows, cols, v_new)
        positions = self.positions.at[rows, cols].set(pos, mode="drop")
        return RingKVCache(k, v, positions, (self.lengths + n).astype(jnp.int32), self.window)

    def chronological(self):
        """``(k, v, positions)`` rolled per row so index ``j`` holds position ``lengths - W + j``.

        Entries with ``positions < 0`` are empty slots.
        """
        W = self.capacity
        idx = (self.lengths[:, None] + jnp.arange(W, dtype=jnp.int32)[None, :]) % W      # [B, W]
        k = jnp.take_along_axis(self.k, idx[:, :, None, None], axis=1)
        v = jnp.take_along_axis(self.v, idx[:, :, None, None], axis=1)
        return k, v, jnp.take_along_axis(self.positions, idx, axis=1)



_register(RingKVCache, ("k", "v", "positions", "lengths"), ("window",))


# ----------------------------------------------------------------------------- paged cache


@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """A page pool plus a per-row page table (see module docstring)."""

    k_pages: Any   # [P, page, K, Dk]
    v_pages: Any   # [P, page, K, Dv]
    page_table: Any   # [B, M]
    lengths: Any   # [B]

    @classmethod
    def init(cls, batch: int, num_pages: int, page_size: int, max_pages_per_seq: int, kv_heads: int,
             head_dim: int, dtype=jnp.float32, value_dim: int | None = None, page_table=None) -> "PagedKVCache":
        """Empty pool.  ``page_table`` defaults to rows owning consecutive pages when the pool has
        ``batch * max_pages_per_seq`` pages, else to all ``-1`` (allocate with :class:`PageAllocator`)."""
        batch = _check_int("batch", batch)
        M = _check_int("max_pages_per_seq", max_pages_per_seq)
        _check_int("num_pages", num_pages)
        _check_int("page_size", page_size)
        k, v = _init_buffers(num_pages, page_size, kv_heads, head_dim, dtype, value_dim)
        if page_table is None:
            P = k.shape[0]
            table = (np.arange(batch * M).reshape(batch, M) if P >= batch * M else np.full((batch, M), -1))
            page_table = jnp.asarray(table, jnp.int32)
        page_table = jnp.asarray(page_table)
        if page_table.shape != (batch, M) or not jnp.issubdtype(page_table.dtype, jnp.integer):
            raise ValueError(f"page_table: expected int32 [{batch}, {M}], got {page_table.dtype} "
                             f"{V.shape_str(page_table)}")
        return cls(k, v, page_table.astype(jnp.int32), jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.page_table.shape[0]

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[1]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[0]

    @property
    def max_pages_per_seq(self) -> int:
        return self.page_table.shape[1]

    @property
    def max_len(self) -> int:
        return self.max_pages_per_seq * self.page_size

    @property
    def kv_heads(self) -> int:
        return self.k_pages.shape[2]

    @property
    def dtype(self):
        return self.k_pages.dtype

    def _locate(self, pos):
        """(page, slot) of absolute positions ``pos: [B, T]``; page ``num_pages`` = unallocated/out of range."""
        ps, M, P = self.page_size, self.max_pages_per_seq, self.num_pages
        logical = pos // ps
        page = jnp.take_along_axis(self.page_table, jnp.clip(logical, 0, M - 1), axis=1)
        ok = (logical < M) & (page >= 0)
        return jnp.where(ok, page, P), pos % ps

    def append(self, k_new, v_new, n_new=None) -> "PagedKVCache":
        """Write through the page table; tokens on unallocated pages or past ``max_len`` are dropped."""
        B = self.batch
        T = _check_new_kv(k_new, v_new, B, self.kv_heads, self.k_pages.shape[3], self.v_pages.shape[3],
                          "paged cache")
        if T > self.max_len:
            raise ValueError(f"k_new: chunk of T_new={T} tokens exceeds the cache capacity "
                             f"max_len={self.max_len} (max_pages_per_seq * page_size)")
        n = new_token_counts(n_new, B, T)
        t = jnp.arange(T, dtype=jnp.int32)[None, :]
        pos = self.lengths[:, None] + t
        page, slot = self._locate(pos)
        checks.check_capacity("k_new", self.lengths, n, self.max_len)
        checks.check((page < self.num_pages) | (t >= n[:, None]) | (pos >= self.max_len),
                     "k_new: {} new tokens land on unallocated pages (page_table == -1) and would be dropped; "
                     "reserve pages first (PageAllocator.reserve)", jnp.sum((page >= self.num_pages) & (t < n[:, None])
                                                                            & (pos < self.max_len)))
        if T == 1:  # the decode step: in-place row writes (see _write_windows)
            ok = (page[:, 0] < self.num_pages)
            page0 = jnp.clip(page[:, 0], 0, self.num_pages - 1)
            n1 = jnp.where(ok, n, 0)
            k = _write_windows(self.k_pages, k_new, slot[:, 0], slot[:, 0], n1, rows=page0)
            v = _write_windows(self.v_pages, v_new, slot[:, 0], slot[:, 0], n1, rows=page0)
        else:
            page = jnp.where(t < n[:, None], page, self.num_pages)
            k = _scatter_tokens(self.k_pages, page, slot, k_new)
            v = _scatter_tokens(self.v_pages, page, slot, v_new)
        return PagedKVCache(k, v, self.page_table, jnp.minimum(self.lengths + n, self.max_len).astype(jnp.int32))

    def gather_pages(self, page_table=None):
        """``(k, v)`` as ``[B, M, page_size, K, D]`` in logical order (unallocated pages read as zeros)."""
        table = self.page_table if page_table is None else page_table
        idx = jnp.clip(table, 0, self.num_pages - 1)
        alloc = (table >= 0)[:, :, None, None, None]
        k = jnp.where(alloc, jnp.take(self.k_pages, idx, axis=0), 0)
        v = jnp.where(alloc, jnp.take(self.v_pages, idx, axis=0), 0)
        return k, v

    def gather(self):
        """The gather reference: contiguous ``(k [B, M*page, K, Dk], v [B, M*page, K, Dv])``."""
        k, v = self.gather_pages()
        B, M, ps = k.shape[:3]
        return k.reshape(B, M * ps, *k.shape[3:]), v.reshape(B, M * ps, *v.shape[3:])

    def to_kv_cache(self) -> KVCache:
        k, v = self.gather()
        return KVCache(k, v, self.lengths)

    def replace(self, **kw) -> "PagedKVCache":
        return dataclasses.replace(self, **kw)


_register(PagedKVCache, ("k_pages", "v_pages", "page_table", "lengths"))


class PageAllocator:
    """Host-side page bookkeeping for tests and simple servers (not jit-able, by design).

    ``reserve(row, num_tokens)`` makes sure row ``row`` owns enough pages for
    ``num_tokens`` tokens; ``release(row)`` returns its pages to the free list.
    ``page_table`` is the ``int32 [B, M]`` table to put into the cache
    (``cache.replace(page_table=alloc.page_table)``).  ``shuffle`` hands out pages in
    a random order, so tests see non-contiguous, interleaved page assignments.
    """

    def __init__(self, num_pages: int, page_size: int, batch: int, max_pages_per_seq: int, *,
                 shuffle: bool = False, seed: int = 0):
        self.page_size = _check_int("page_size", page_size)
        self.num_pages = _check_int("num_pages", num_pages)
        free = np.arange(self.num_pages)
        if shuffle:
            free = np.random.default_rng(seed).permutation(free)
        self._free = list(free[::-1])  # pop() from the end
        self.table = np.full((_check_int("batch", batch), _check_int("max_pages_per_seq", max_pages_per_seq)), -1,
                             np.int32)

    def reserve(self, row: int | np.integer, num_tokens: int | np.integer) -> None:
        need = -(-int(num_tokens) // self.page_size)
        if need > self.table.shape[1]:
            raise ValueError(f"num_tokens: {num_tokens} tokens need {need} pages, more than "
                             f"max_pages_per_seq={self.table.shape[1]}")
        have = int((self.table[row] >= 0).sum())
        for i in range(have, need):
            if not self._free:
                raise ValueError(f"out of pages: row {row} needs {need} pages, the pool of {self.num_pages} is empty")
            self.table[row, i] = self._free.pop()

    def release(self, row: int | np.integer) -> None:
        for p in self.table[row][self.table[row] >= 0][::-1]:
            self._free.append(int(p))
        self.table[row] = -1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def page_table(self) -> Any:
        return jnp.asarray(self.table)
