"""Static sparse attention patterns as masks of :mod:`attn_jax.core.masks`.

Every pattern here is a :class:`~attn_jax.core.masks.Mask` whose structure depends only on the
positions, so ``classify`` returns NumPy at trace time and the XLA tile engine
(:mod:`attn_jax.softmax.xla`, through :class:`attn_jax.core.tiles.TileSchedule`) visits only the
FULL and PARTIAL tiles: the cost of ``aj.attention(q, k, v, mask=pattern, impl="xla")`` is
proportional to the tiles the pattern touches (``attn_jax.softmax.xla.forward_tile_count``).

Patterns (``p = i + offset`` is the position of query ``i``, bottom-right aligned as the
positional masks of :mod:`attn_jax.core.masks`; ``j`` a key index):

* :func:`block_mask` -- a generic block layout ``bool[H|1, nq, nk]`` over ``(block_q, block_k)``
  blocks (query block ``i // block_q``, key block ``j // block_k``): ``classify`` gives the layout
  exactly at any tile size (2-D prefix sums over the layout, no ``T x S`` array) and ``predicate``
  gathers it in-tile.  A per-head layout ``[H, nq, nk]`` is served by the engine as the *union*
  over heads for tile skipping (a tile is skipped only when every head leaves it empty; see
  :func:`attn_jax.core.tiles.reduce_kinds`), with the per-head predicate applied inside the tile.
* Sparse Transformer (Child et al., "Generating Long Sequences with Sparse Transformers", 2019,
  arXiv:1904.10509), causal: :func:`strided` ``A1 = {max(0, p - l), ..., p}``,
  ``A2 = {j <= p : (p - j) mod l = 0}``; :func:`fixed` ``A1 = {j <= p : j // l = p // l}``,
  ``A2 = {j <= p : j mod l >= l - c}`` (the paper writes ``{t, ..., l}``, ``t = l - c``).  The paper
  gives ``A1`` and ``A2`` to different heads (factorised) or their union to one head; these
  functions return the union and :func:`per_head` builds the factorised heads.
* Longformer (Beltagy et al., "Longformer: The Long-Document Transformer", 2020,
  arXiv:2004.05150): :func:`longformer` -- a window ``|p - j| <= w`` (``0 <= p - j <= w`` when
  causal) plus ``n_global`` global tokens that see and are seen by every token
  (:func:`global_tokens`).  Global tokens are the first ``n_global`` positions (a deviation: the
  paper picks task-specific ones, e.g. [CLS] or question tokens; :func:`block_mask` covers any set).
* BigBird (Zaheer et al., "Big Bird: Transformers for Longer Sequences", 2020, arXiv:2007.14062,
  the block form ITC): :func:`bigbird` -- on ``block_size`` blocks, ``num_global_blocks`` global
  blocks (rows and columns), a window of ``window_blocks`` blocks on each side and
  ``num_random_blocks`` random key blocks per query block drawn from a NumPy generator with a fixed
  ``seed`` (static: the same seed gives the same layout).
* PowerAttention (Chen et al., "PowerAttention: Exponentially Scaling of Receptive Fields for
  Effective Sparse Attention", 2025, arXiv:2503.03588), causal: :func:`power_attention` -- query
  block ``a`` sees key block ``b <= a`` iff ``a - b < window_blocks`` or ``a - b`` is a power of
  two, plus ``sink_blocks`` leading blocks.  The abstract states the exponential receptive field
  (``2^d`` tokens after ``d`` layers); the power-of-two block distances are our reading of the
  method (background, not checked against the paper's full text).
* :func:`per_head` -- a different mask per head (dilated / strided heads), stacked on the head axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.core import masks as M

__all__ = ["BlockMask", "StridedDistance", "SummaryColumns", "GlobalTokens", "PerHead", "block_mask", "strided",
           "fixed", "global_tokens", "longformer", "bigbird", "power_attention", "per_head", "layout_of"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_positive_int(name, v):
    if not M.is_concrete_int(v):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v <= 0:
        raise ValueError(f"{name} must be >= 1, got {v}")


def _check_nonneg_int(name, v):
    if not M.is_concrete_int(v):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")


# ----------------------------------------------------------------------------- block layouts


class BlockMask(M.Mask):
    """A static block layout (:func:`block_mask`): ``layout[h, i // block_q, j // block_k]``.

    Hashable by value (its NumPy layout is static pytree data, never a traced leaf).
    """

    is_static = True

    def __init__(self, layout: np.ndarray, block_q: int, block_k: int):
        layout = np.array(layout, dtype=bool, copy=True)
        layout.setflags(write=False)
        self.layout = layout            # [H|1, nq, nk]
        self.block_q = int(block_q)
        self.block_k = int(block_k)
        self._key = (layout.shape, layout.tobytes(), self.block_q, self.block_k)
        # 2-D prefix sums [H|1, nq + 1, nk + 1]: the number of visible blocks in any block rectangle
        c = np.zeros((layout.shape[0], layout.shape[1] + 1, layout.shape[2] + 1), np.int64)
        c[:, 1:, 1:] = layout.astype(np.int64).cumsum(1).cumsum(2)
        self._csum = c

    def __eq__(self, other):
        return isinstance(other, BlockMask) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def _check_lengths(self, T, S):
        nq, nk = self.layout.shape[1:]
        if _ceil_div(T, self.block_q) != nq or _ceil_div(S, self.block_k) != nk:
            raise ValueError(f"block mask: a layout of {nq} x {nk} blocks of ({self.block_q}, {self.block_k}) covers "
                             f"T in [{(nq - 1) * self.block_q + 1}, {nq * self.block_q}] and S in "
                             f"[{(nk - 1) * self.block_k + 1}, {nk * self.block_k}], got T={T}, S={S}")

    def check(self, B, H, T, S):
        if self.layout.shape[0] not in (1, H):
            raise ValueError(f"block mask: expected a layout of shape [{H}|1, nq, nk], got {self.layout.shape}")
        self._check_lengths(T, S)

    def predicate(self, q_idx, k_idx, T, S):
        lay = jnp.asarray(self.layout)
        nq, nk = self.layout.shape[1:]
        qb = jnp.clip(jnp.asarray(q_idx) // self.block_q, 0, nq - 1)
        kb = jnp.clip(jnp.asarray(k_idx) // self.block_k, 0, nk - 1)
        return jnp.take(jnp.take(lay, qb, axis=1), kb, axis=2)[None]       # [1, H|1, tq, tk]

    def classify(self, T, S, bq, bk):
        _check_tile(T, S, bq, bk)
        self._check_lengths(T, S)
        # tile rows [r bq, min((r+1) bq, T) - 1] cover layout rows [lo, hi]; likewise for columns
        qs = np.arange(0, T, bq)
        q0, q1 = qs // self.block_q, (np.minimum(qs + bq, T) - 1) // self.block_q
        ks = np.arange(0, S, bk)
        k0, k1 = ks // self.block_k, (np.minimum(ks + bk, S) - 1) // self.block_k
        c = self._csum
        count = (c[:, q1[:, None] + 1, k1[None, :] + 1] - c[:, q0[:, None], k1[None, :] + 1]
                 - c[:, q1[:, None] + 1, k0[None, :]] + c[:, q0[:, None], k0[None, :]])
        area = (q1 - q0 + 1)[:, None] * (k1 - k0 + 1)[None, :]
        cls = np.where(count == 0, M.EMPTY, np.where(count == area, M.FULL, M.PARTIAL)).astype(np.int8)
        return cls[None]                                                        # [1, H|1, nt_q, nt_k]

    def __repr__(self):
        return f"block_mask(layout{self.layout.shape}, block_q={self.block_q}, block_k={self.block_k})"


def _check_tile(T, S, bq, bk):
    for name, v in (("bq", bq), ("bk", bk), ("T", T), ("S", S)):
        if not M.is_concrete_int(v) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


jax.tree_util.register_pytree_node(BlockMask, lambda m: ((), m), lambda aux, _: aux)


def block_mask(layout, block_q: int, block_k: int | None = None) -> BlockMask:
    """A static block-sparse mask from a boolean block layout.

    Args:
      layout: ``bool[nq, nk]`` or ``bool[H, nq, nk]`` (NumPy or any concrete array-like; a traced
        array is refused: router-made block lists go to
        :func:`attn_jax.sparse.block_sparse_attention`).  Query block ``a`` sees key block ``b``
        iff ``layout[(h,) a, b]``.
      block_q, block_k: the block sizes in tokens (``block_k`` defaults to ``block_q``).  The layout
        must cover the call's lengths exactly: ``nq = ceil(T / block_q)``, ``nk = ceil(S / block_k)``.
    """
    _check_positive_int("block_q", block_q)
    block_k = block_q if block_k is None else block_k
    _check_positive_int("block_k", block_k)
    if isinstance(layout, jax.core.Tracer):
        raise TypeError("layout: expected a concrete (NumPy) boolean array, got a traced array; traced block lists "
                        "go to attn_jax.sparse.block_sparse_attention")
    lay = np.asarray(layout)
    if lay.dtype != np.bool_:
        if not (np.issubdtype(lay.dtype, np.integer) or np.issubdtype(lay.dtype, np.floating)):
            raise TypeError(f"layout: expected a boolean array (nonzero = visible block), got dtype {lay.dtype}")
        lay = lay != 0
    if lay.ndim == 2:
        lay = lay[None]
    if lay.ndim != 3 or 0 in lay.shape:
        raise ValueError(f"layout: expected shape [nq, nk] or [H, nq, nk] with no empty axis, got {np.shape(layout)}")
    return BlockMask(lay, int(block_q), int(block_k))


def layout_of(mask: M.Mask, T: int, S: int, block_q: int, block_k: int | None = None) -> np.ndarray:
    """The ``bool[H|1, nq, nk]`` layout of a static mask at ``(block_q, block_k)`` blocks: a block is
    True unless ``mask.classify`` calls it EMPTY (so the layout is a superset of the visible pairs;
    exact for the masks here when the blocks match their structure)."""
    block_k = block_q if block_k is None else block_k
    if not mask.is_static:
        raise ValueError(f"mask: expected a static mask, got {mask!r}")
    cls = np.asarray(mask.classify(T, S, block_q, block_k))
    return (cls != M.EMPTY).any(axis=0)


# ----------------------------------------------------------------------------- token-level primitives


@dataclass(frozen=True, eq=False)
class StridedDistance(M.PositionalMask):
    """Causal strided keys: visible iff ``p - j >= 0`` and ``(p - j) mod stride == 0``."""

    stride: int
    offset: Any = None

    def _visible(self, p, j):
        d = p - j
        return (d >= 0) & (d % self.stride == 0)

    def _classify(self, pmin, pmax, kmin, kmax, xp):
        # every difference in [pmin - kmax, pmax - kmin] occurs in the tile (a rectangle of pairs)
        lo, hi = pmin - kmax, pmax - kmin
        l = self.stride
        first = -xp.floor_divide(-xp.maximum(lo, 0), l) * l         # smallest multiple of l >= max(lo, 0)
        empty = (hi < 0) | (first > hi)
        full = (lo >= 0) & ((lo == hi) & (lo % l == 0) if l > 1 else True)
        return empty, full

    def __repr__(self):
        return f"strided_distance(stride={self.stride}, offset={self.offset!r})"


@dataclass(frozen=True, eq=False)
class SummaryColumns(M.PositionalMask):
    """Summary keys of the fixed pattern: visible iff ``j mod size >= size - c`` (any query)."""

    size: int
    c: int
    offset: Any = None

    def _visible(self, p, j):
        return jnp.broadcast_to(j % self.size >= self.size - self.c, jnp.broadcast_shapes(p.shape, j.shape))

    def _count(self, x, xp):
        """Summary keys among ``[0, x]``."""
        n = x + 1
        return xp.floor_divide(n, self.size) * self.c + xp.maximum(0, n % self.size - (self.size - self.c))

    def _classify(self, pmin, pmax, kmin, kmax, xp):
        zero = xp.zeros_like(pmin)          # broadcast the column counts over the query blocks
        count = self._count(kmax, xp) - self._count(kmin - 1, xp) + zero
        return count == 0, count == kmax - kmin + 1 + zero

    def __repr__(self):
        return f"summary_columns(size={self.size}, c={self.c}, offset={self.offset!r})"


@dataclass(frozen=True, eq=False)
class GlobalTokens(M.PositionalMask):
    """The first ``n`` positions are global: visible iff ``j < n`` or ``p < n``."""

    n: int
    offset: Any = None

    def _visible(self, p, j):
        return (j < self.n) | (p < self.n)

    def _classify(self, pmin, pmax, kmin, kmax, xp):
        return (kmin >= self.n) & (pmin >= self.n), (kmax < self.n) | (pmax < self.n)

    def __repr__(self):
        return f"global_tokens(n={self.n}, offset={self.offset!r})"


def _flatten_positional(m):
    # static fields only (these masks take int offsets): the whole mask is the static aux data
    return (), tuple(sorted(vars(m).items()))


def _unflatten_positional(cls):
    def unflatten(aux, _):
        m = object.__new__(cls)
        for n, x in aux:
            object.__setattr__(m, n, x)
        return m
    return unflatten


for _cls in (StridedDistance, SummaryColumns, GlobalTokens):
    jax.tree_util.register_pytree_node(_cls, _flatten_positional, _unflatten_positional(_cls))


def _check_offset(offset):
    if offset is not None and not M.is_concrete_int(offset):
        raise TypeError(f"offset: expected None or an int (these patterns are static), got {type(offset).__name__}")


def global_tokens(n_global: int, *, offset: int | None = None) -> M.Mask:
    """The first ``n_global`` positions see every key and are seen by every query."""
    _check_nonneg_int("n_global", n_global)
    _check_offset(offset)
    return GlobalTokens(int(n_global), offset)


def strided(stride: int, *, offset: int | None = None) -> M.Mask:
    """Sparse Transformer strided pattern (causal): ``p - stride <= j <= p`` or ``(p - j) mod stride == 0``."""
    _check_positive_int("stride", stride)
    _check_offset(offset)
    return M.sliding_window(int(stride), offset=offset) | StridedDistance(int(stride), offset)


def fixed(block: int, c: int = 1, *, offset: int | None = None) -> M.Mask:
    """Sparse Transformer fixed pattern (causal): same ``block`` as the query, or one of the last
    ``c`` positions of any earlier block (``j mod block >= block - c``)."""
    _check_positive_int("block", block)
    _check_positive_int("c", c)
    if c > block:
        raise ValueError(f"c must be <= block = {block}, got {c}")
    _check_offset(offset)
    return M.causal(offset) & (M.chunked(int(block), offset=offset) | SummaryColumns(int(block), int(c), offset))


def longformer(window: int, n_global: int = 0, *, causal: bool = False, offset: int | None = None) -> M.Mask:
    """Longformer: a sliding window of ``window`` keys on each side (only to the left when ``causal``)
    plus ``n_global`` global tokens (the first positions) that see and are seen by all."""
    _check_nonneg_int("window", window)
    _check_nonneg_int("n_global", n_global)
    _check_offset(offset)
    local = M.sliding_window(int(window), 0 if causal else int(window), offset=offset)
    out = local if n_global == 0 else local | GlobalTokens(int(n_global), offset)
    return M.causal(offset) & out if causal and n_global else out


def bigbird(seq_len: int, block_size: int, *, num_global_blocks: int = 1, window_blocks: int = 1,
            num_random_blocks: int = 2, seed: int = 0, causal: bool = False, kv_len: int | None = None) -> M.Mask:
    """BigBird (ITC block form) as a :func:`block_mask` over ``block_size`` blocks.

    Query block ``a`` sees key block ``b`` iff ``a`` or ``b`` is one of the first
    ``num_global_blocks`` blocks, ``|a - b| <= window_blocks``, or ``b`` is one of the
    ``num_random_blocks`` blocks drawn for row ``a`` (uniformly without replacement among the blocks
    no other rule gives it; NumPy ``default_rng(seed)``, so the layout is static and reproducible).
    ``causal`` keeps ``b <= a`` only (random blocks are drawn among earlier blocks) and adds the
    token-level causal mask on the diagonal blocks.  ``kv_len`` defaults to ``seq_len``.
    """
    for name, v in (("seq_len", seq_len), ("block_size", block_size)):
        _check_positive_int(name, v)
    for name, v in (("num_global_blocks", num_global_blocks), ("window_blocks", window_blocks),
                    ("num_random_blocks", num_random_blocks), ("seed", seed)):
        _check_nonneg_int(name, v)
    S = seq_len if kv_len is None else kv_len
    _check_positive_int("kv_len", S)
    nq, nk = _ceil_div(seq_len, block_size), _ceil_div(S, block_size)
    a = np.arange(nq)[:, None] + (nk - nq)          # query block positions, bottom-right aligned
    b = np.arange(nk)[None, :]
    lay = (np.abs(a - b) <= window_blocks) | (b < num_global_blocks) | (a < num_global_blocks)
    if causal:
        lay &= b <= a
    rng = np.random.default_rng(seed)
    for r in range(nq):
        free = np.nonzero(~lay[r] & ((b[0] <= a[r, 0]) if causal else True))[0]
        if free.size:
            lay[r, rng.choice(free, size=min(num_random_blocks, free.size), replace=False)] = True
    mask = block_mask(lay, block_size, block_size)
    return mask & M.causal() if causal else mask


def power_attention(seq_len: int, block_size: int, *, window_blocks: int = 1, sink_blocks: int = 1,
                    kv_len: int | None = None) -> M.Mask:
    """PowerAttention (causal) on ``block_size`` blocks: query block ``a`` sees key block ``b <= a`` iff
    ``a - b < window_blocks`` (the diagonal block always), ``a - b`` is a power of two, or
    ``b < sink_blocks``; the diagonal block is causal token by token."""
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("block_size", block_size)
    _check_positive_int("window_blocks", window_blocks)
    _check_nonneg_int("sink_blocks", sink_blocks)
    S = seq_len if kv_len is None else kv_len
    nq, nk = _ceil_div(seq_len, block_size), _ceil_div(S, block_size)
    d = (np.arange(nq)[:, None] + (nk - nq)) - np.arange(nk)[None, :]
    pow2 = (d > 0) & ((d & (d - 1)) == 0)
    lay = (d >= 0) & ((d < window_blocks) | pow2 | (np.arange(nk)[None, :] < sink_blocks))
    return block_mask(lay, block_size, block_size) & M.causal()


# ----------------------------------------------------------------------------- per-head patterns


class PerHead(M.Mask):
    """One static mask per head (:func:`per_head`), stacked on the head axis."""

    is_static = True

    def __init__(self, parts: tuple):
        self.parts = tuple(parts)

    def __eq__(self, other):
        return isinstance(other, PerHead) and len(self.parts) == len(other.parts) and all(
            a is b or a == b for a, b in zip(self.parts, other.parts))

    def __hash__(self):
        return hash(len(self.parts))

    def check(self, B, H, T, S):
        if len(self.parts) != H:
            raise ValueError(f"per_head mask: expected {H} masks (one per head), got {len(self.parts)}")
        for p in self.parts:
            p.check(B, 1, T, S)

    def predicate(self, q_idx, k_idx, T, S):
        outs = [jnp.broadcast_to(p.predicate(q_idx, k_idx, T, S), (1, 1, jnp.shape(q_idx)[0], jnp.shape(k_idx)[0]))
                for p in self.parts]
        return jnp.concatenate(outs, axis=1)

    def classify(self, T, S, bq, bk):
        outs = [np.asarray(p.classify(T, S, bq, bk)) for p in self.parts]
        nq, nk = outs[0].shape[2:]
        return np.concatenate([np.broadcast_to(o, (1, 1, nq, nk)) for o in outs], axis=1)

    def __repr__(self):
        return "per_head(" + ", ".join(map(repr, self.parts)) + ")"


jax.tree_util.register_pytree_node(PerHead, lambda m: ((), m), lambda aux, _: aux)


def per_head(*masks: M.Mask) -> PerHead:
    """Head ``h`` uses ``masks[h]`` (static masks with one head each).  The tile engine skips a tile
    only when every head's mask leaves it empty (union over heads); inside a tile each head applies
    its own predicate."""
    if not masks:
        raise ValueError("masks: expected one static mask per head, got none")
    for i, m in enumerate(masks):
        if not isinstance(m, M.Mask) or not m.is_static:
            raise TypeError(f"masks[{i}]: expected a static attn_jax mask, got {m!r}")
    return PerHead(masks)
