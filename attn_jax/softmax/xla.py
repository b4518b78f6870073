"""``impl="xla"``: memory-efficient exact attention in pure JAX/XLA (the portable fallback).

Papers: Rabe & Staats, "Self-attention Does Not Need O(n^2) Memory", 2021, arXiv:2112.05682
(chunked online softmax in plain XLA); Dao, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", 2023, arXiv:2307.08691 (the tiled forward/backward
recurrences used here).  The function computed is exactly that of
:mod:`attn_jax.softmax.reference` (softcap before bias, sinks, dropout, GQA, masks, ...).

Forward.  Queries are cut into blocks of ``bq`` rows, keys into blocks of ``bk``.  For a query
block, the running max ``m``, normaliser ``l`` and unnormalised output ``acc`` start at
``m = sink_h`` (or ``-inf``), ``l = 1`` (or ``0``), ``acc = 0`` -- a sink is a key with logit
``sink_h`` and value ``0`` -- and every visible key block ``j`` updates them::

    S_j   = softcap(scale * Q K_j^T) + bias_j,  -inf where masked
    m'    = max(m, rowmax(S_j))
    P_j   = exp(S_j - m')
    l'    = exp(m - m') l + rowsum(P_j)
    acc'  = exp(m - m') acc + (P_j * Z_j) V_j        Z = keep / (1 - rate) (dropout), else 1
    O     = acc / l,  lse = m + log l   (O = 0, lse = -inf when l = 0: fully masked row)

Backward (FA-2, Alg. 2), recomputing ``P`` per tile from ``lse`` instead of storing it::

    D_i   = rowsum(dO_i * O_i) - dlse_i          (dlse: cotangent of the returned lse)
    P     = exp(S - lse)
    dV_j += (P * Z)^T dO
    dP    = (dO V_j^T) * Z
    dS    = P * (dP - D)                          (= dbias tile)
    dS'   = dS * (1 - tanh^2) * scale             (softcap chain rule; no tanh term without it)
    dQ   += dS' K_j,   dK_j += dS'^T Q
    dsink_h = -sum_{b,i} exp(sink_h - lse_i) D_i

Blocking and skipping.  ``mask.classify`` labels every ``(bq, bk)`` tile EMPTY / PARTIAL / FULL.
For static masks the labels are NumPy at trace time: each query block gets padded lists of its
FULL and PARTIAL key blocks, and two dynamic-trip-count loops visit exactly those (causal does
about half the tiles, a sliding window O(T w / bk^2) tiles); FULL tiles never evaluate the
predicate.  The backward builds the transposed lists (query blocks per key block) and
accumulates ``dK, dV`` in the loop carry and ``dQ`` in a ``[T, ...]`` float32 buffer, so one pass
does all five matmuls per tile.  For data-dependent masks (segments, key padding, dense, per-row
offsets) the traced labels pick, per tile, ``lax.switch(skip | partial | full)``; a composition
``static & dynamic`` uses the static part for the lists and the dynamic part for the switch.
No array has a ``T x S`` extent (apart from a user's dense bias or dense mask).

Deviations from the reference, all within the test kit's tolerances: summation order (tiled);
for bfloat16/float16 inputs the ``P V``, ``dS K`` and ``dS^T Q`` products take ``P``/``dS``
rounded to the input dtype (as FlashAttention does), with float32 accumulation.

NaN safety.  The rule every backend follows: a query row or key/value column that no visible
(query, key) pair uses may hold NaN or +-Inf without touching any valid output or gradient.
Here, per partial tile, the key/value columns and query rows that no pair *of that tile* uses
are zeroed before any product (the reference does it per whole row/column, so the two differ
only when a NaN sits in a position that is used elsewhere -- where the reference itself returns
NaN).  "Pairs" are real ones: the zero padding that fills a ragged last block (rows past ``T``,
keys past ``S``) is hidden by the tile predicate, so a key that only phantom rows past ``T``
would see counts as unused.  (A FULL tile needs no predicate: every key in it is used by a real
row, and the zero rows past ``T`` contribute exactly zero to ``dK``/``dV``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from attn_jax.core import masks as M
from attn_jax.core.array_types import ArrayLike
from attn_jax.core import random as aj_random
from attn_jax.core.bias import StructuredBias

EMPTY, PARTIAL, FULL = M.EMPTY, M.PARTIAL, M.FULL

#: Default block size per axis by sequence length: ``(longest length, block)`` rows, first match;
#: ``block_q`` follows ``T`` and ``block_k`` follows ``S``.  Measured on a shared 2-core CPU
#: (B=1, H=8, D=64, causal fp32, fwd and fwd+bwd, T in 128..4096, block sizes 32..512, peers in the
#: same process): 512 x 512 tiles (8 MiB of scores per step for 8 heads) fall out of the 2 MiB
#: per-core L2 and were ~2x slower than 256 x 256 from T = 1024 to 4096; at 128 < T <= 512 the
#: causal-diagonal waste of big tiles dominates and 64 x 64 was fastest (128 at T = 1024); below 64
#: the per-iteration loop overhead wins, and T <= 128 is one tile.  Decode (1 query over 16k keys)
#: uses ``bk = 256``.
DEFAULT_BLOCK_TABLE = ((128, 128), (512, 64), (1024, 128), (None, 256))


def default_block(n: int) -> int:
    """The default block size for a sequence axis of length ``n`` (before clipping to ``n``)."""
    for longest, b in DEFAULT_BLOCK_TABLE:
        if longest is None or n <= longest:
            return b
    raise AssertionError("DEFAULT_BLOCK_TABLE must end with a catch-all row")


def unsupported(platform: str, p) -> list[str]:
    """The XLA path serves every problem the reference serves, on every platform."""
    return []


# ----------------------------------------------------------------------------- masks


def _split_static(mask):
    """(static part, dynamic part) whose conjunction is ``mask`` (either may be None)."""
    if mask is None:
        return None, None
    if mask.is_static:
        return mask, None
    parts = mask.conjuncts()
    return M.all_of(*(p for p in parts if p.is_static)), M.all_of(*(p for p in parts if not p.is_static))


def _reduce_kinds(cls, xp):
    """[B|1, H|1, nq, nk] tile labels -> one label per tile valid for every (b, h)."""
    lo = cls.min(axis=(0, 1))
    hi = cls.max(axis=(0, 1))
    return xp.where(hi == EMPTY, EMPTY, xp.where(lo == FULL, FULL, PARTIAL)).astype(xp.int32)


def _lists(kinds: np.ndarray, kind: int):
    """Per row of ``kinds``: padded column indices with that label, and their count."""
    rows = [np.nonzero(r == kind)[0] for r in kinds]
    width = max(1, max(len(r) for r in rows))
    idx = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = r
    return idx, np.array([len(r) for r in rows], np.int32)


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class _Cfg:
    B: int
    T: int
    S: int
    H: int
    K: int
    G: int
    Dk: int
    Dv: int
    bq: int
    bk: int
    nq: int
    nk: int
    scale: float
    softcap: float | None
    rate: float
    dtype: Any      # input dtype
    cdt: Any        # compute dtype (float32, or float64 for float64 inputs)
    mdt: Any        # dtype of the P V / dS K / dS^T Q operands
    precision: Any


def _pad_axis(x, axis, n):
    if x.shape[axis] == n:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad)


def _layout_q(x, c: _Cfg):
    """[B, T, H, D] -> [nq, B, K, G, bq, D]."""
    D = x.shape[-1]
    x = _pad_axis(x, 1, c.nq * c.bq).reshape(c.B, c.nq, c.bq, c.K, c.G, D)
    return x.transpose(1, 0, 3, 4, 2, 5)


def _unlayout_q(x, c: _Cfg):
    """[nq, B, K, G, bq, D] -> [B, T, H, D]  (or without the trailing D)."""
    if x.ndim == 6:
        x = x.transpose(1, 0, 4, 2, 3, 5).reshape(c.B, c.nq * c.bq, c.H, x.shape[-1])
    else:
        x = x.transpose(1, 0, 4, 2, 3).reshape(c.B, c.nq * c.bq, c.H)
    return x[:, :c.T]


def _layout_kv(x, c: _Cfg):
    """[B, S, K, D] -> [B, nk, bk, K, D]: a free reshape (no copy of a KV cache) unless S is ragged."""
    return _pad_axis(x, 1, c.nk * c.bk).reshape(c.B, c.nk, c.bk, c.K, x.shape[-1])


def _kv_tile(x_l, j):
    return lax.dynamic_index_in_dim(x_l, j, axis=1, keepdims=False)  # [B, bk, K, D]


def _unlayout_kv(x, c: _Cfg):
    """[nk, B, bk, K, D] -> [B, S, K, D]."""
    return x.transpose(1, 0, 2, 3, 4).reshape(c.B, c.nk * c.bk, c.K, x.shape[-1])[:, :c.S]


def _heads5(x, c: _Cfg):
    """[B|1, H|1, tq, tk] -> [B|1, K|1, G|1, tq, tk] (grouped heads)."""
    x = jnp.asarray(x)
    if x.ndim < 4:
        x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    b, h, tq, tk = x.shape
    if h == 1:
        return x.reshape(b, 1, 1, tq, tk)
    return x.reshape(b, c.K, c.G, tq, tk)


def _cols(vis):
    """[B|1, K|1, G|1, bq, bk] visibility -> key columns used by the tile, [B|1, bk, K|1, 1]."""
    return vis.any(axis=(2, 3)).transpose(0, 2, 1)[..., None]


def _sum_to(x, shape):
    """Sum ``x`` down to the broadcast-compatible ``shape`` (same rank)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


# ----------------------------------------------------------------------------- the tiled kernel


class _Kernel:
    """Everything one call needs: static config, schedules, and the per-tile math."""

    def __init__(self, c: _Cfg, mask, bias_kind: str, bias_static, bias_shape, has_sinks: bool):
        self.c = c
        self.mask = mask
        self.bias_kind = bias_kind          # "none" | "dense" | "structured" | "structured_const"
        self.bias_static = bias_static      # a non-pytree StructuredBias (closed over), else None
        self.bias_shape = bias_shape        # dense bias: padded 4-D shape
        self.has_sinks = has_sinks
        static, dynamic = _split_static(mask)
        kinds = np.full((c.nq, c.nk), FULL, np.int32)
        if static is not None:
            kinds = np.minimum(kinds, _reduce_kinds(np.asarray(static.classify(c.T, c.S, c.bq, c.bk)), np))
        if c.S % c.bk:  # keys past S are padding: the predicate must hide them
            kinds[:, -1] = np.minimum(kinds[:, -1], PARTIAL)
        self.kinds = kinds
        self.dynamic = dynamic
        self.fwd_lists = {k: _lists(kinds, k) for k in (FULL, PARTIAL)}
        self.bwd_lists = {k: _lists(kinds.T, k) for k in (FULL, PARTIAL)}

    # -- per-tile pieces -------------------------------------------------------------------

    def dyn_kinds(self, mask):
        if self.dynamic is None:
            return None
        _, dyn = _split_static(mask)
        return _reduce_kinds(dyn.classify(self.c.T, self.c.S, self.c.bq, self.c.bk), jnp)

    def bias_tile(self, bias, qi, kj, qidx, kidx):
        c = self.c
        if self.bias_kind == "dense":
            b0, h0 = bias.shape[:2]
            t = lax.dynamic_slice(bias, (0, 0, qi * c.bq, kj * c.bk), (b0, h0, c.bq, c.bk))
            return _heads5(t, c).astype(c.cdt)
        if self.bias_kind == "structured":
            return _heads5(bias.tile(qidx, kidx, c.T, c.S), c).astype(c.cdt)
        if self.bias_kind == "structured_const":
            return _heads5(self.bias_static.tile(qidx, kidx, c.T, c.S), c).astype(c.cdt)
        return None

    def visible(self, mask, qidx, kidx):
        """Visibility of a tile [B|1, K|1, G|1, bq, bk]: the mask predicate, and neither a query row
        past T nor a key past S (the zero padding of ragged blocks is no query and no key: a key
        that only phantom rows could see is unused, and may hold NaN)."""
        c = self.c
        vis = (qidx < c.T)[:, None] & (kidx < c.S)[None, :]
        vis = vis[None, None, None]
        if mask is not None:
            vis = vis & _heads5(mask.predicate(qidx, kidx, c.T, c.S), c)
        return vis

    def scores(self, qb, kb, bias, mask, qi, kj, partial):
        """Logits of one tile [B, K, G, bq, bk] (cdt), tanh (softcap) and visibility."""
        c = self.c
        qidx = qi * c.bq + jnp.arange(c.bq, dtype=jnp.int32)
        kidx = kj * c.bk + jnp.arange(c.bk, dtype=jnp.int32)
        vis = self.visible(mask, qidx, kidx) if partial else None
        if vis is not None:
            # Zero operands no pair of this tile uses: NaN padding must not reach a product.
            row_used = vis.any(axis=4)[..., None]                   # [B|1, K|1, G|1, bq, 1]
            col_used = _cols(vis)                                   # [B|1, bk, K|1, 1]
            qb = jnp.where(row_used, qb, 0)
            kb = jnp.where(col_used, kb, 0)
        s = jnp.einsum("bkgqd,bskd->bkgqs", qb, kb, preferred_element_type=c.cdt, precision=c.precision)
        s = s * c.scale
        t = None
        if c.softcap is not None:
            t = jnp.tanh(s / c.softcap)
            s = c.softcap * t
        b = self.bias_tile(bias, qi, kj, qidx, kidx)
        if b is not None:
            s = s + b
        if vis is not None:
            s = jnp.where(vis, s, -jnp.inf)
        return s, t, vis, qb, kb, qidx, kidx

    def keep(self, seed, qidx, kidx):
        c = self.c
        b = jnp.arange(c.B, dtype=jnp.int32)[:, None, None, None, None]
        h = jnp.arange(c.H, dtype=jnp.int32).reshape(1, c.K, c.G, 1, 1)
        return aj_random.keep_mask(seed, c.rate, b, h, qidx[None, None, None, :, None],
                                   kidx[None, None, None, None, :])

    # -- loops -------------------------------------------------------------------------------

    def _visit(self, lists, dkinds, row, body, carry, dyn_row_major: bool):
        """Run ``body(col, kind, carry)`` over the FULL then PARTIAL tiles of ``row``."""
        for kind in (FULL, PARTIAL):
            idx_np, cnt_np = lists[kind]
            if cnt_np.max() == 0:
                continue
            idx, cnt = jnp.asarray(idx_np), jnp.asarray(cnt_np)

            def step(t, carry, kind=kind, idx=idx):
                col = idx[row, t]
                if dkinds is None:
                    return body(col, kind, carry)
                dk = dkinds[row, col] if dyn_row_major else dkinds[col, row]
                dk = jnp.minimum(dk, kind)
                branches = [lambda cr: cr, lambda cr: body(col, PARTIAL, cr)]
                if kind == FULL:
                    branches.append(lambda cr: body(col, FULL, cr))
                return lax.switch(dk, branches, carry)

            carry = lax.fori_loop(0, cnt[row], step, carry)
        return carry

    def forward(self, q_l, k_l, v_l, bias, sinks, seed, mask):
        """q_l [nq,B,K,G,bq,Dk], k_l/v_l [B,nk,bk,K,D] -> o_l [nq,B,K,G,bq,Dv] (cdt), lse_l (cdt).

        Also sets ``self.tiles_visited`` (traced int32): the number of tiles computed.
        """
        c = self.c
        dkinds = self.dyn_kinds(mask)
        inv_keep = 1.0 / (1.0 - c.rate)

        def q_block(_, xs):
            qi, qb = xs

            def tile(kj, kind, st):
                m, l, acc, n = st
                s, _, vis, _, _, qidx, kidx = self.scores(qb, _kv_tile(k_l, kj), bias, mask, qi, kj,
                                                          kind == PARTIAL)
                vb = _kv_tile(v_l, kj)
                if vis is not None:
                    vb = jnp.where(_cols(vis), vb, 0)
                m_new = jnp.maximum(m, s.max(axis=-1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                l = alpha * l + p.sum(axis=-1)
                if c.rate > 0:
                    p = jnp.where(self.keep(seed, qidx, kidx), p, 0.0)
                pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(c.mdt), vb.astype(c.mdt),
                                preferred_element_type=c.cdt, precision=c.precision)
                return m_new, l, alpha[..., None] * acc + pv, n + 1

            shape = (c.B, c.K, c.G, c.bq)
            if self.has_sinks:
                m0 = jnp.broadcast_to(sinks.astype(c.cdt).reshape(1, c.K, c.G, 1), shape)
                l0 = jnp.ones(shape, c.cdt)
            else:
                m0 = jnp.full(shape, -jnp.inf, c.cdt)
                l0 = jnp.zeros(shape, c.cdt)
            acc0 = jnp.zeros(shape + (c.Dv,), c.cdt)
            m, l, acc, n = self._visit(self.fwd_lists, dkinds, qi, tile, (m0, l0, acc0, jnp.int32(0)), True)
            has_mass = l > 0
            safe_l = jnp.where(has_mass, l, 1.0)
            o = acc * (jnp.where(has_mass, inv_keep / safe_l, 0.0))[..., None]
            m_safe = jnp.where(m == -jnp.inf, 0.0, m)
            lse = jnp.where(has_mass, m_safe + jnp.log(safe_l), -jnp.inf)
            return None, (o, lse, n)

        _, (o_l, lse_l, n) = lax.scan(q_block, None, (jnp.arange(c.nq, dtype=jnp.int32), q_l))
        self.tiles_visited = n.sum()  # tiles the forward actually computed (tests, benchmarks)
        return o_l, lse_l

    def backward(self, q_l, k_l, v_l, bias, sinks, seed, mask, lse_l, do_l, delta_l):
        """Gradients (dq_l, dk_l, dv_l, dbias, dsinks) in laid-out form; delta_l = D - dlse."""
        c = self.c
        dkinds = self.dyn_kinds(mask)
        inv_keep = 1.0 / (1.0 - c.rate)
        lse_safe = jnp.where(jnp.isfinite(lse_l), lse_l, 0.0)

        dbias0 = None
        if self.bias_kind == "dense":
            dbias0 = jnp.zeros(bias.shape, c.cdt)
        elif self.bias_kind == "structured":
            dbias0 = jax.tree.map(lambda x: jnp.zeros(x.shape, c.cdt), bias)

        def kv_block(carry, kj):
            dq_buf, dbias_acc = carry
            kb_full, vb_full = _kv_tile(k_l, kj), _kv_tile(v_l, kj)

            def tile(qi, kind, st):
                dk, dv, dq_buf, dbias_acc = st
                qb = q_l[qi]
                dob = do_l[qi]
                s, t, vis, qb, kb, qidx, kidx = self.scores(qb, kb_full, bias, mask, qi, kj, kind == PARTIAL)
                vb = vb_full
                if vis is not None:
                    vb = jnp.where(_cols(vis), vb, 0)
                p = jnp.exp(s - lse_safe[qi][..., None])
                dp = jnp.einsum("bkgqd,bskd->bkgqs", dob, vb, preferred_element_type=c.cdt, precision=c.precision)
                pd = p
                if c.rate > 0:
                    keep = self.keep(seed, qidx, kidx)
                    pd = jnp.where(keep, p * inv_keep, 0.0)
                    dp = jnp.where(keep, dp * inv_keep, 0.0)
                dv = dv + jnp.einsum("bkgqs,bkgqd->bskd", pd.astype(c.mdt), dob.astype(c.mdt),
                                     preferred_element_type=c.cdt, precision=c.precision)
                ds = p * (dp - delta_l[qi][..., None])
                if vis is not None:
                    ds = jnp.where(vis, ds, 0.0)
                if self.bias_kind == "dense":
                    g = _sum_to(ds, (dbias_acc.shape[0], 1 if dbias_acc.shape[1] == 1 else c.K,
                                     1 if dbias_acc.shape[1] == 1 else c.G, c.bq, c.bk))
                    g = g.reshape(dbias_acc.shape[0], dbias_acc.shape[1], c.bq, c.bk)
                    dbias_acc = lax.dynamic_update_slice(dbias_acc, g, (0, 0, qi * c.bq, kj * c.bk))
                elif self.bias_kind == "structured":
                    def tile_fn(bo):
                        return _heads5(bo.tile(qidx, kidx, c.T, c.S), c).astype(c.cdt)
                    out, pull = jax.vjp(tile_fn, bias)
                    (gb,) = pull(_sum_to(ds, out.shape))
                    dbias_acc = jax.tree.map(lambda a, g: a + g.astype(c.cdt), dbias_acc, gb)
                if t is not None:
                    ds = ds * (1.0 - t * t)
                ds = (ds * c.scale).astype(c.mdt)
                dq_t = jnp.einsum("bkgqs,bskd->bkgqd", ds, kb.astype(c.mdt), preferred_element_type=c.cdt,
                                  precision=c.precision)
                dq_buf = dq_buf.at[qi].add(dq_t)
                dk = dk + jnp.einsum("bkgqs,bkgqd->bskd", ds, qb.astype(c.mdt), preferred_element_type=c.cdt,
                                     precision=c.precision)
                return dk, dv, dq_buf, dbias_acc

            dk0 = jnp.zeros((c.B, c.bk, c.K, c.Dk), c.cdt)
            dv0 = jnp.zeros((c.B, c.bk, c.K, c.Dv), c.cdt)
            dk, dv, dq_buf, dbias_acc = self._visit(self.bwd_lists, dkinds, kj, tile,
                                                    (dk0, dv0, dq_buf, dbias_acc), False)
            return (dq_buf, dbias_acc), (dk, dv)

        dq0 = jnp.zeros(q_l.shape, c.cdt)
        (dq_l, dbias), (dk_l, dv_l) = lax.scan(kv_block, (dq0, dbias0), jnp.arange(c.nk, dtype=jnp.int32))
        dsinks = None
        if self.has_sinks:
            p_sink = jnp.exp(sinks.astype(c.cdt).reshape(1, 1, c.K, c.G, 1) - lse_l)
            dsinks = -(p_sink * delta_l).sum(axis=(0, 1, 4)).reshape(c.H)
        return dq_l, dk_l, dv_l, dbias, dsinks


# ----------------------------------------------------------------------------- public entry points


def _choose_block(n: int, b: int) -> int:
    return max(1, min(b, n))


def _tiling(T: int, S: int, block_q: int | None, block_k: int | None) -> tuple[int, int, int, int]:
    """Block sizes (defaults from :func:`default_block`, clipped to the lengths) and counts."""
    bq = _choose_block(T, default_block(T) if block_q is None else int(block_q))
    bk = _choose_block(S, default_block(S) if block_k is None else int(block_k))
    return bq, bk, -(-T // bq), -(-S // bk)


def attention_blockwise(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                        v: Float[ArrayLike, "B S K Dv"], *, mask=None, bias=None, scale: float | None = None,
                        softcap: float | None = None, sinks: Float[ArrayLike, " H"] | None = None,
                        dropout_rate: float = 0.0, dropout_rng=None, return_lse: bool = False,
                        block_q: int | None = None, block_k: int | None = None
                        ) -> Float[Array, "B T H Dv"] | tuple[Float[Array, "B T H Dv"], Float[Array, "B T H"]]:
    """Tiled exact attention with the reference's signature plus ``block_q`` / ``block_k``.

    Inputs are assumed validated (use :func:`attn_jax.attention` with ``impl="xla"`` for the
    validated entry point).  Block sizes default to :func:`default_block` of each length, clipped to
    the sequence lengths; ``T`` and ``S`` need not be multiples of them.
    """
    B, T, H, Dk = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[3]
    mask = M.as_mask(mask)
    bq, bk, nq, nk = _tiling(T, S, block_q, block_k)
    dtype = q.dtype
    cdt = jnp.float64 if dtype == jnp.float64 else jnp.float32
    mdt = dtype if dtype in (jnp.bfloat16, jnp.float16) else cdt
    precision = lax.Precision.HIGHEST if mdt == cdt else None
    c = _Cfg(B, T, S, H, K, H // K, Dk, Dv, bq, bk, nq, nk, float(Dk ** -0.5 if scale is None else scale),
             None if softcap is None else float(softcap), float(dropout_rate), dtype, cdt, mdt, precision)

    # Bias: dense arrays and pytree structured biases are differentiable inputs.
    bias_kind, bias_in, bias_static, bias_shape = "none", None, None, None
    if isinstance(bias, StructuredBias):
        leaves = jax.tree.leaves(bias)
        if len(leaves) == 1 and leaves[0] is bias or not leaves:
            bias_kind, bias_static = "structured_const", bias
        else:
            bias_kind, bias_in = "structured", bias
    elif bias is not None:
        bias = jnp.asarray(bias)
        bias4 = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        bias_kind = "dense"
        bias_shape = bias4.shape
        bias_in = bias

    kernel = _Kernel(c, mask, bias_kind, bias_static, bias_shape, sinks is not None)
    seed = aj_random.dropout_seed(dropout_rng) if c.rate > 0 else None
    mask_in = jax.tree.leaves(mask)

    def prep_bias(b):
        if bias_kind != "dense":
            return b
        b4 = b.reshape((1,) * (4 - b.ndim) + b.shape)
        b4 = jnp.broadcast_to(b4, b4.shape[:2] + (T, S))
        return _pad_axis(_pad_axis(b4, 2, nq * bq), 3, nk * bk)

    def run_fwd(q, k, v, b, sinks, seed, mask_leaves):
        m = jax.tree.unflatten(jax.tree.structure(mask), mask_leaves)
        o_l, lse_l = kernel.forward(_layout_q(q, c), _layout_kv(k, c), _layout_kv(v, c), prep_bias(b), sinks,
                                    seed, m)
        return o_l, lse_l

    @jax.custom_vjp
    def core(q, k, v, b, sinks, seed, mask_leaves):
        o_l, lse_l = run_fwd(q, k, v, b, sinks, seed, mask_leaves)
        return _unlayout_q(o_l, c).astype(dtype), _unlayout_q(lse_l, c)

    def core_fwd(q, k, v, b, sinks, seed, mask_leaves):
        o_l, lse_l = run_fwd(q, k, v, b, sinks, seed, mask_leaves)
        out = (_unlayout_q(o_l, c).astype(dtype), _unlayout_q(lse_l, c))
        return out, (q, k, v, b, sinks, seed, mask_leaves, o_l, lse_l)

    def core_bwd(res, cts):
        q, k, v, b, sinks, seed, mask_leaves, o_l, lse_l = res
        do, dlse = cts
        m = jax.tree.unflatten(jax.tree.structure(mask), mask_leaves)
        do_l = _layout_q(do.astype(dtype), c)
        delta = (do_l.astype(cdt) * o_l).sum(axis=-1)
        delta = delta - _layout_q(dlse.astype(cdt)[..., None], c)[..., 0]
        bp = prep_bias(b)
        dq_l, dk_l, dv_l, dbias, dsinks = kernel.backward(
            _layout_q(q, c), _layout_kv(k, c), _layout_kv(v, c), bp, sinks, seed, m, lse_l, do_l, delta)
        dq = _unlayout_q(dq_l, c).astype(q.dtype)
        dk = _unlayout_kv(dk_l, c).astype(k.dtype)
        dv = _unlayout_kv(dv_l, c).astype(v.dtype)
        db = None
        if bias_kind == "dense":
            g = dbias[:, :, :T, :S]
            g4 = b.reshape((1,) * (4 - b.ndim) + b.shape)
            db = _sum_to(g, g4.shape).reshape(b.shape).astype(b.dtype)
        elif bias_kind == "structured":
            db = jax.tree.map(lambda g, x: g.astype(x.dtype), dbias, b)
        ds = None if sinks is None else dsinks.astype(sinks.dtype)
        return dq, dk, dv, db, ds, None, [None] * len(mask_leaves)

    core.defvjp(core_fwd, core_bwd)
    o, lse = core(q, k, v, bias_in, sinks, seed, mask_in)
    if not return_lse:
        return o
    return o, lse.astype(jnp.float32 if cdt == jnp.float32 else cdt)


def attention_xla(p, q, k, v, bias, sinks, dropout_rng, *, block_q: int | None = None,
                  block_k: int | None = None):
    """Registry entry point for :func:`attn_jax.attention` (``impl="xla"``)."""
    return attention_blockwise(q, k, v, mask=p.mask, bias=bias, scale=p.scale, softcap=p.softcap, sinks=sinks,
                               dropout_rate=p.dropout_rate, dropout_rng=dropout_rng, return_lse=p.return_lse,
                               block_q=block_q, block_k=block_k)


def forward_tile_count(q, k, v, *, mask=None, block_q: int | None = None, block_k: int | None = None):
    """Number of ``(bq, bk)`` tiles the forward pass computes (int32; jit-able).

    Counted inside the loops that do the work, so it measures block skipping (static lists
    and dynamic ``lax.switch``) rather than restating the schedule.
    """
    B, T, H, Dk = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[3]
    mask = M.as_mask(mask)
    bq, bk, nq, nk = _tiling(T, S, block_q, block_k)
    c = _Cfg(B, T, S, H, K, H // K, Dk, Dv, bq, bk, nq, nk, float(Dk ** -0.5), None, 0.0, q.dtype, jnp.float32,
             jnp.float32, lax.Precision.HIGHEST)
    kernel = _Kernel(c, mask, "none", None, None, False)
    kernel.forward(_layout_q(q, c), _layout_kv(k, c), _layout_kv(v, c), None, None, None, mask)
    return kernel.tiles_visited
