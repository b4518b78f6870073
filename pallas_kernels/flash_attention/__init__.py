"""Flash attention in Pallas: TPU (Mosaic) and GPU (Triton) kernels, forward and backward.

Paper: Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", 2023, arXiv:2307.08691 (Algorithms 1 and 2).  For query head ``h`` served by
key/value head ``h // G`` (grouped-query attention without repeating K/V), a query block ``Q_i``
visits the non-empty key blocks ``j`` of its block list and keeps a running max ``m``,
normaliser ``l`` and unnormalised output ``acc``.  A learned sink is a key with logit ``sink_h``
and value 0, so it only changes the initial state::

    m = sink_h (or -inf),  l = 1 (or 0),  acc = 0
    S_j  = softcap(scale * Q_i K_j^T) + bias_ij - slope_h |qpos_i - j|,  -inf where hidden
    m'   = max(m, rowmax S_j);   P_j = exp(S_j - m')
    l'   = exp(m - m') l + rowsum P_j;   acc' = exp(m - m') acc + P_j V_j
    O_i  = acc / l,   lse_i = m + log l      (O_i = 0 and lse_i = -inf when l = 0)

``softcap(x) = c tanh(x / c)``.  Backward (FA-2 Alg. 2), recomputing ``P`` from ``lse``::

    D_i  = rowsum(dO_i * O_i) - dlse_i
    P    = exp(S - lse);   dP = dO V^T;   dS = P * (dP - D)        (dS is dbias)
    dS~  = dS * (1 - tanh^2(scale QK^T / c)) * scale                (no tanh factor without softcap)
    dQ_i = sum_j dS~ K_j             (dq kernel: one program per query block)
    dK_j = sum_{g,i} dS~^T Q_i,  dV_j = sum_{g,i} P^T dO_i   (dk/dv kernel: one per key block,
                                      summing over the G query heads of the group)
    dslope_h = -sum dS |qpos - j|;   dsink_h = -sum_i exp(sink_h - lse_i) D_i   (outside the kernels)

Masks arrive as a static *predicate* -- a conjunction of positional terms evaluated on iota
indices inside each tile -- plus optional segment-id arrays (``q_seg == kv_seg != 0``), and a
per-query-block list of non-empty key blocks (and the transposed list for dK/dV), so empty tiles
cost nothing: on TPU through scalar-prefetched block indices in the BlockSpec index maps, on GPU
as the trip count of the in-kernel loop.  Positional terms (query position ``p = i + offset``)::

    ("causal", offset)              j <= p
    ("window", offset, left, right) p - left <= j <= p + right  (as p - j <= left, j - p <= right)
    ("chunked", offset, size)       p // size == j // size
    ("prefix", offset, n)           j < n  or  j <= p

NaN safety: a query row or key/value column that no visible pair uses may hold NaN or +-Inf
without touching any valid output or gradient.  Every kernel (forward, dQ, dK/dV, on both
backends) zeroes, per tile, the q rows and k/v rows that no visible pair of that tile uses before
any product (:func:`tile_operands`): visibility includes the predicate, the segment ids and the
block padding (``i < T``, ``j < S``), so unused rows/columns, padding tokens and phantom rows
past ``T`` are all covered.

Deviations from the textbook algorithm: the kernels work on ``[B, H, T, D]`` (this module
transposes from and to the ``[B, T, H, D]`` API layout); ``T``/``S`` are padded to block
multiples here and the padding is hidden by the predicate (``i < T``, ``j < S``); on GPU head
dims are zero-padded to a power of two (exact); ``D`` and ``dsinks`` are computed with XLA
outside the kernels; ``dbias`` is materialised per ``(b, h)`` and then summed to the bias'
broadcast shape.  Dropout multiplies ``P`` by ``Z = keep / (1 - rate)`` after the normaliser
(``acc`` uses ``P Z``, ``l`` uses ``P``; backward ``dV = (P Z)^T dO``, ``dP = Z (dO V^T)``, and
``D = rowsum(dO O)`` still holds), with the keep mask recomputed per tile from a counter hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.common import backend_module, next_pow2
from pallas_kernels.dropout import dropout_keep
from pallas_kernels.flash_attention.block_sizes import BlockSizes, get_block_sizes

__all__ = ["flash_attention", "block_lists", "Config", "evaluate_terms", "tile_operands", "dropout_keep"]

_TERM_ARITY = {"causal": 2, "window": 4, "chunked": 3, "prefix": 3}


@dataclass(frozen=True)
class Config:
    """Static metadata shared by the forward and backward kernels."""

    platform: str                 # "tpu" | "gpu"
    interpret: Any                # False | True | pltpu.InterpretParams
    scale: float
    softcap: float | None
    terms: tuple                  # positional predicate terms (see module docstring)
    q_len: int                    # unpadded T; rows >= q_len are hidden
    kv_len: int                   # unpadded S
    alibi_offset: int             # qpos = i + alibi_offset
    block_q: int
    block_k: int
    num_warps: int | None
    num_stages: int | None
    B: int
    H: int
    K: int
    Tp: int
    Sp: int
    Dk: int
    Dv: int
    has_bias: bool
    bias_batched: bool            # bias has a batch dim of size B (else 1)
    bias_headed: bool             # bias has a head dim of size H (else 1)
    has_alibi: bool
    has_sinks: bool
    has_segments: bool
    dropout_rate: float           # 0.0: no dropout
    lists_batched: bool           # block lists differ per batch row
    nk_max: int                   # width of the kv block lists
    nq_max: int                   # width of the q block lists (dK/dV)

    @property
    def G(self) -> int:
        return self.H // self.K

    @property
    def nq(self) -> int:
        return self.Tp // self.block_q

    @property
    def nk(self) -> int:
        return self.Sp // self.block_k


# ----------------------------------------------------------------------------- tile math
# Backend-independent: both kernels call these on values already loaded from refs.


def evaluate_terms(terms, i, j):
    """Visibility of the positional terms for query indices ``i`` and key indices ``j`` (broadcast)."""
    vis = None
    for term in terms:
        kind, off = term[0], term[1]
        p = i + off
        if kind == "causal":
            v = j <= p
        elif kind == "window":  # differences, not p + right: a window of 2**31 - 1 must not wrap int32
            v = (p - j <= term[2]) & (j - p <= term[3])
        elif kind == "chunked":
            size = term[2]
            # Floor division of possibly negative positions via a shift that keeps both >= 0.
            shift = size * (-(-(abs(off) + 1) // size))
            v = lax.div(p + shift, size) == lax.div(j + shift, size)
        elif kind == "prefix":
            v = (j < term[2]) | (j <= p)
        else:
            raise ValueError(f"unknown mask term {term!r}")
        vis = v if vis is None else vis & v
    return vis


def tile_visible(c: Config, i, j, q_seg=None, kv_seg=None):
    """Visibility of query indices ``i`` and key indices ``j`` (broadcastable to ``[bq, bk]``)."""
    vis = (i < c.q_len) & (j < c.kv_len)
    t = evaluate_terms(c.terms, i, j)
    if t is not None:
        vis = vis & t
    if q_seg is not None:
        vis = vis & (q_seg == kv_seg) & (q_seg != 0)
    return vis


def tile_operands(c: Config, vis, q, k, v):
    """``(q, k, v)`` of one tile with the query rows and key/value rows that no visible pair *of the
    tile* uses set to zero, so NaN/Inf there never reaches a product (``0 * NaN`` is NaN).

    ``vis: bool [bq, bk]``; ``q: [bq, Dk]``, ``k: [bk, Dk]``, ``v: [bk, Dv]``.  Row usage is a lane
    reduction; column usage is ``vis^T @ ones`` (a transposed-lhs matmul, as the dK/dV products
    already do) reduced over its lanes, which keeps every value in a 2-D ``[n, 1]`` layout."""
    visf = vis.astype(jnp.float32)
    row = jnp.max(visf, axis=1, keepdims=True) > 0                                    # [bq, 1]
    ones = jnp.ones((visf.shape[0], 128 if c.platform == "tpu" else 16), jnp.float32)
    col = jnp.max(lax.dot_general(visf, ones, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32),
                  axis=1, keepdims=True) > 0                                          # [bk, 1]
    zero = lambda x, used: jnp.where(used, x, jnp.zeros((), x.dtype))  # noqa: E731
    return zero(q, row), zero(k, col), zero(v, col)


def tile_logits(c: Config, q, k, i, j, bias=None, slope=None):
    """``(s, tanh_term)``: logits of one tile after scale, softcap, bias and ALiBi (float32)."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = s * c.scale
    t = None
    if c.softcap is not None:
        t = jnp.tanh(s * (1.0 / c.softcap))
        s = t * c.softcap
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if slope is not None:
        s = s - slope * jnp.abs(i + c.alibi_offset - j).astype(jnp.float32)
    return s, t


def tile_grads(c: Config, s, t, vis, lse, delta, do, v, z=None):
    """``(p * z, ds, ds_raw)`` of one tile: (dropped) probabilities, dlogits (= dbias), d(scale q k^T).

    ``z`` is the dropout multiplier ``keep / (1 - rate)`` of the tile (None without dropout).
    """
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)
    p = jnp.exp(jnp.where(vis, s, -jnp.inf) - lse_safe)
    dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if z is not None:
        dp = dp * z
    ds = jnp.where(vis, p * (dp - delta), 0.0)
    ds_raw = ds if t is None else ds * (1.0 - t * t)
    return (p if z is None else p * z), ds, ds_raw * c.scale


# ----------------------------------------------------------------------------- dropout


def tile_dropout(c: Config, seed0, seed1, b, h, i, j):
    """Dropout multiplier ``keep / (1 - rate)`` of a tile, or None without dropout."""
    if not c.dropout_rate:
        return None
    keep = dropout_keep(c.dropout_rate, seed0, seed1, b, h, i, j)
    return jnp.where(keep, jnp.float32(1.0 / (1.0 - c.dropout_rate)), jnp.float32(0.0))


# ----------------------------------------------------------------------------- block lists


def block_lists(nonempty, *, static: bool):
    """Per-row lists of the non-empty column blocks, and the transposed lists.

    ``nonempty: bool[Bm, nq, nk]`` (NumPy when ``static``, else a JAX array).  Returns
    ``(kv_idx [Bm, nq, nk_max], kv_cnt [Bm, nq], q_idx [Bm, nk, nq_max], q_cnt [Bm, nk])`` int32.
    Unused list slots repeat the last used index so a TPU pipeline issues no new DMA for them.
    Static lists are as wide as the longest row; traced lists are as wide as the grid.
    """
    def lists(ne, xp):
        Bm, n_rows, n_cols = ne.shape
        cnt = ne.sum(-1).astype(xp.int32)
        # non-empty columns first, in ascending order (stable sort on "is empty")
        order = xp.argsort(~ne, axis=-1, kind="stable") if xp is np else jnp.argsort(~ne, axis=-1, stable=True)
        order = order.astype(xp.int32)
        width = max(1, int(cnt.max())) if xp is np else n_cols
        order = order[..., :width]
        last = xp.take_along_axis(order, xp.maximum(cnt - 1, 0)[..., None], axis=-1)
        slot = xp.arange(width, dtype=xp.int32)
        idx = xp.where(slot < cnt[..., None], order, last).astype(xp.int32)
        return idx, cnt

    xp = np if static else jnp
    kv_idx, kv_cnt = lists(nonempty, xp)
    q_idx, q_cnt = lists(xp.swapaxes(nonempty, 1, 2), xp)
    return kv_idx, kv_cnt, q_idx, q_cnt


# ----------------------------------------------------------------------------- custom VJP


def _sum_to(x, batched, headed):
    if not batched:
        x = x.sum(0, keepdims=True)
    if not headed:
        x = x.sum(1, keepdims=True)
    return x


def _make_core(c: Config):
    backend = backend_module(__name__, c.platform)

    @jax.custom_vjp
    def core(q, k, v, bias, slopes, sinks, q_seg, kv_seg, lists, seed):
        o, lse = backend.forward(c, q, k, v, bias, slopes, sinks, q_seg, kv_seg, lists, seed)
        return o, lse

    def fwd(q, k, v, bias, slopes, sinks, q_seg, kv_seg, lists, seed):
        o, lse = backend.forward(c, q, k, v, bias, slopes, sinks, q_seg, kv_seg, lists, seed)
        return (o, lse), (q, k, v, bias, slopes, sinks, q_seg, kv_seg, lists, seed, o, lse)

    def bwd(res, cts):
        q, k, v, bias, slopes, sinks, q_seg, kv_seg, lists, seed, o, lse = res
        do, dlse = cts
        delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1) - dlse  # [B, H, Tp]
        dq, dbias, dslope_rows = backend.backward_dq(c, q, k, v, bias, slopes, q_seg, kv_seg, lists, seed, do, lse,
                                                     delta)
        dk, dv = backend.backward_dkdv(c, q, k, v, bias, slopes, q_seg, kv_seg, lists, seed, do, lse, delta)
        if bias is not None:
            dbias = _sum_to(dbias, c.bias_batched, c.bias_headed).astype(bias.dtype)
        dslopes = None if slopes is None else dslope_rows.sum(axis=(0, 2)).astype(slopes.dtype)
        dsinks = None
        if sinks is not None:
            p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse)
            dsinks = (-(p_sink * delta).sum(axis=(0, 2))).astype(sinks.dtype)
        int_none = jax.tree.map(lambda _: None, (q_seg, kv_seg, lists, seed))
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, dslopes, dsinks, *int_none)

    core.defvjp(fwd, bwd)
    return core


# ----------------------------------------------------------------------------- public entry


def _pad_to(x, axis, n, value=0):
    if x.shape[axis] == n:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pads, constant_values=value)


def flash_attention(q, k, v, *, bias=None, alibi_slopes=None, alibi_offset: int | None = None, sinks=None,
                    q_segment_ids=None, kv_segment_ids=None, mask_terms: tuple = (), tile_nonempty=None,
                    tile_nonempty_static: bool = True, scale: float | None = None, softcap: float | None = None,
                    dropout_rate: float = 0.0, dropout_seed=None, platform: str = "tpu", interpret: Any = False,
                    block_q: int | None = None,
                    block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """Flash attention, ``[B, T, H, Dk] x [B, S, K, Dk] x [B, S, K, Dv] -> (o [B, T, H, Dv], lse [B, T, H])``.

    Args:
      bias: dense additive logits ``[B|1, H|1, T, S]`` (differentiable).
      alibi_slopes: ``[H]``; adds ``-slope_h * |i + alibi_offset - j|`` (default offset ``S - T``).
      sinks: ``[H]`` sink logits.
      dropout_rate, dropout_seed: dropout on the probabilities with the counter-hash keep mask of
        ``attn_jax.core.random`` (``dropout_seed``: uint32/int32 ``[2]``).
      q_segment_ids, kv_segment_ids: int ``[B, T]``, ``[B, S]``; visible iff equal and non-zero.
      mask_terms: static positional predicate terms (module docstring); all must hold.
      tile_nonempty: ``callable(block_q, block_k) -> bool[Bm, nq, nk]`` (``Bm`` 1 or B) marking
        the tiles with at least one visible pair, NumPy if ``tile_nonempty_static`` else traced;
        ``None`` visits every tile.  Soundness is the caller's duty: a tile marked empty is
        never computed.
      platform: ``"tpu"`` (Mosaic) or ``"gpu"`` (Triton).
      interpret: ``False``, ``True`` or (TPU) a ``pltpu.InterpretParams``.
      block_q, block_k, num_warps, num_stages: override the table in ``block_sizes``.
    """
    B, T, H, Dk = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[3]
    if H % K:
        raise ValueError(f"q heads H={H} must be a multiple of kv heads K={K}")
    for term in mask_terms:
        if not isinstance(term, tuple) or term[0] not in _TERM_ARITY or len(term) != _TERM_ARITY[term[0]]:
            raise ValueError(f"mask_terms: bad term {term!r}; expected one of {sorted(_TERM_ARITY)} "
                             "with the arity of the module docstring")
    bs: BlockSizes = get_block_sizes(platform, max(Dk, Dv), q.dtype, T, S, block_q=block_q, block_k=block_k,
                                     num_warps=num_warps, num_stages=num_stages)
    bq, bk = bs.block_q, bs.block_k
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    nq, nk = Tp // bq, Sp // bk

    if tile_nonempty is None:
        ne, static = np.ones((1, nq, nk), bool), True
    else:
        ne, static = tile_nonempty(bq, bk), tile_nonempty_static
        if tuple(ne.shape[1:]) != (nq, nk) or ne.shape[0] not in (1, B):
            raise ValueError(f"tile_nonempty: expected shape [1|{B}, {nq}, {nk}], got {tuple(ne.shape)}")
    lists = block_lists(ne if static else jnp.asarray(ne), static=static)
    lists = tuple(jnp.asarray(x) for x in lists)

    # Layout [B, H, T, D]; pad sequences to block multiples (hidden by the predicate) and, on
    # GPU, head dims to a power of two >= 16 (zero columns change no dot product).
    Dkp, Dvp = (Dk, Dv) if platform == "tpu" else (max(16, next_pow2(Dk)), max(16, next_pow2(Dv)))
    qt = _pad_to(_pad_to(q.transpose(0, 2, 1, 3), 2, Tp), 3, Dkp)
    kt = _pad_to(_pad_to(k.transpose(0, 2, 1, 3), 2, Sp), 3, Dkp)
    vt = _pad_to(_pad_to(v.transpose(0, 2, 1, 3), 2, Sp), 3, Dvp)
    if bias is not None:
        if bias.ndim != 4 or bias.shape[0] not in (1, B) or bias.shape[1] not in (1, H) or bias.shape[2:] != (T, S):
            raise ValueError(f"bias: expected [B|1, H|1, T, S] = [{B}|1, {H}|1, {T}, {S}], got {tuple(bias.shape)}")
        bias = _pad_to(_pad_to(bias, 2, Tp), 3, Sp)
    has_seg = q_segment_ids is not None or kv_segment_ids is not None
    if has_seg:
        qs = jnp.ones((B, T), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
        ks = qs if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
        qs = _pad_to(jnp.broadcast_to(qs, (B, T)), 1, Tp)
        ks = _pad_to(jnp.broadcast_to(ks, (B, S)), 1, Sp)
    else:
        qs = ks = None
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.astype(jnp.float32)
    dropout_rate = float(dropout_rate)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate: expected a float in [0, 1), got {dropout_rate}")
    seed = None
    if dropout_rate > 0:
        if dropout_seed is None or jnp.shape(dropout_seed) != (2,):
            raise ValueError("dropout_seed: expected a uint32 [2] array when dropout_rate > 0")
        seed = lax.bitcast_convert_type(jnp.asarray(dropout_seed).astype(jnp.uint32), jnp.int32)

    c = Config(platform=platform, interpret=interpret, scale=float(Dk ** -0.5 if scale is None else scale),
               softcap=None if softcap is None else float(softcap), terms=tuple(mask_terms), q_len=T, kv_len=S,
               alibi_offset=int(S - T if alibi_offset is None else alibi_offset), block_q=bq, block_k=bk,
               num_warps=bs.num_warps, num_stages=bs.num_stages, B=B, H=H, K=K, Tp=Tp, Sp=Sp, Dk=Dkp, Dv=Dvp,
               has_bias=bias is not None, bias_batched=bias is not None and bias.shape[0] == B and B > 1,
               bias_headed=bias is not None and bias.shape[1] == H and H > 1, has_alibi=alibi_slopes is not None,
               has_sinks=sinks is not None, has_segments=has_seg, dropout_rate=dropout_rate,
               lists_batched=lists[0].shape[0] > 1,
               nk_max=lists[0].shape[2], nq_max=lists[2].shape[2])
    o, lse = _make_core(c)(qt, kt, vt, bias, alibi_slopes, sinks, qs, ks, lists, seed)
    o = o[:, :, :T, :Dv].transpose(0, 2, 1, 3)
    lse = lse[:, :, :T].transpose(0, 2, 1)
    return o, lse
