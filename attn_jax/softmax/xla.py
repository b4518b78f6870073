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

Query-dependent biases (:class:`~attn_jax.core.bias.QueryDependentBias`, e.g. relative
embeddings ``q_i · E[r]``) are evaluated per tile from the tile's queries, ``tile_q(scale * Q, ...)``;
the backward differentiates that tile with respect to the bias parameters and ``Q`` and adds the
``Q`` part (``dS``-weighted) to the ``dQ`` buffer.

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
from jax import lax
from jaxtyping import Array, Float

from attn_jax.core import masks as M
from attn_jax.core import tiles as TL
from attn_jax.core.array_types import ArrayLike
from attn_jax.core import random as aj_random
from attn_jax.core.bias import StructuredBias, is_query_dependent

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


# ----------------------------------------------------------------------------- the tiled kernel


class _Kernel:
    """Everything one call needs: static config, schedules, and the per-tile math."""

    def __init__(self, c: _Cfg, mask, bias_kind: str, bias_static, bias_shape, has_sinks: bool):
        self.c = c
        self.mask = mask
        self.bias_kind = bias_kind          # "none" | "dense" | "structured" | "structured_const" | "query"
        self.bias_static = bias_static      # a non-pytree StructuredBias (closed over), else None
        self.bias_shape = bias_shape        # dense bias: padded 4-D shape
        self.has_sinks = has_sinks
        self.schedule = TL.TileSchedule(c, mask)   # c has the Tiling fields (B, T, S, H, K, G, bq, bk, nq, nk)
        self.kinds = self.schedule.kinds

    # -- per-tile pieces -------------------------------------------------------------------

    def bias_tile(self, bias, qi, kj, qidx, kidx, qb):
        c = self.c
        if self.bias_kind == "query":
            return self.query_bias_tile(bias, qb.astype(c.cdt), qidx, kidx)
        if self.bias_kind == "dense":
            b0, h0 = bias.shape[:2]
            t = lax.dynamic_slice(bias, (0, 0, qi * c.bq, kj * c.bk), (b0, h0, c.bq, c.bk))
            return TL.heads5(t, c).astype(c.cdt)
        if self.bias_kind == "structured":
            return TL.heads5(bias.tile(qidx, kidx, c.T, c.S), c).astype(c.cdt)
        if self.bias_kind == "structured_const":
            return TL.heads5(self.bias_static.tile(qidx, kidx, c.T, c.S), c).astype(c.cdt)
        return None

    def query_bias_tile(self, bias, qf, qidx, kidx):
        """A query-dependent bias's tile from the tile's (unscaled, compute-dtype) queries."""
        c = self.c
        return bias.tile_q(qf * c.scale, qidx, kidx, c.T, c.S).astype(c.cdt)

    def scores(self, qb, kb, bias, mask, qi, kj, partial):
        """Logits of one tile [B, K, G, bq, bk] (cdt), tanh (softcap) and visibility."""
        c = self.c
        qidx = qi * c.bq + jnp.arange(c.bq, dtype=jnp.int32)
        kidx = kj * c.bk + jnp.arange(c.bk, dtype=jnp.int32)
        vis = TL.tile_visibility(c, mask, qidx, kidx) if partial else None
        if vis is not None:
            # Zero operands no pair of this tile uses: NaN padding must not reach a product.
            row_used = vis.any(axis=4)[..., None]                   # [B|1, K|1, G|1, bq, 1]
            col_used = TL.tile_columns(vis)                                   # [B|1, bk, K|1, 1]
            qb = jnp.where(row_used, qb, 0)
            kb = jnp.where(col_used, kb, 0)
        s = jnp.einsum("bkgqd,bskd->bkgqs", qb, kb, preferred_element_type=c.cdt, precision=c.precision)
        s = s * c.scale
        t = None
        if c.softcap is not None:
            t = jnp.tanh(s / c.softcap)
            s = c.softcap * t
        b = self.bias_tile(bias, qi, kj, qidx, kidx, qb)
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

    def forward(self, q_l, k_l, v_l, bias, sinks, seed, mask):
        """q_l [nq,B,K,G,bq,Dk], k_l/v_l [B,nk,bk,K,D] -> o_l [nq,B,K,G,bq,Dv] (cdt), lse_l (cdt).

        Also sets ``self.tiles_visited`` (traced int32): the number of tiles computed.
        """
        c = self.c
        dkinds = self.schedule.dynamic_kinds(mask)
        inv_keep = 1.0 / (1.0 - c.rate)

        def q_block(_, xs):
            qi, qb = xs

            def tile(kj, kind, st):
                m, l, acc, n = st
                s, _, vis, _, _, qidx, kidx = self.scores(qb, TL.kv_tile(k_l, kj), bias, mask, qi, kj,
                                                          kind == PARTIAL)
                vb = TL.kv_tile(v_l, kj)
                if vis is not None:
                    vb = jnp.where(TL.tile_columns(vis), vb, 0)
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
            m, l, acc, n = self.schedule.visit(dkinds, qi, tile, (m0, l0, acc0, jnp.int32(0)))
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
        dkinds = self.schedule.dynamic_kinds(mask)
        inv_keep = 1.0 / (1.0 - c.rate)
        lse_safe = jnp.where(jnp.isfinite(lse_l), lse_l, 0.0)

        dbias0 = None
        if self.bias_kind == "dense":
            dbias0 = jnp.zeros(bias.shape, c.cdt)
        elif self.bias_kind in ("structured", "query"):
            dbias0 = jax.tree.map(lambda x: jnp.zeros(x.shape, c.cdt), bias)

        def kv_block(carry, kj):
            dq_buf, dbias_acc = carry
            kb_full, vb_full = TL.kv_tile(k_l, kj), TL.kv_tile(v_l, kj)

            def tile(qi, kind, st):
                dk, dv, dq_buf, dbias_acc = st
                qb = q_l[qi]
                dob = do_l[qi]
                s, t, vis, qb, kb, qidx, kidx = self.scores(qb, kb_full, bias, mask, qi, kj, kind == PARTIAL)
                vb = vb_full
                if vis is not None:
                    vb = jnp.where(TL.tile_columns(vis), vb, 0)
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
                    g = TL.sum_to(ds, (dbias_acc.shape[0], 1 if dbias_acc.shape[1] == 1 else c.K,
                                     1 if dbias_acc.shape[1] == 1 else c.G, c.bq, c.bk))
                    g = g.reshape(dbias_acc.shape[0], dbias_acc.shape[1], c.bq, c.bk)
                    dbias_acc = lax.dynamic_update_slice(dbias_acc, g, (0, 0, qi * c.bq, kj * c.bk))
                elif self.bias_kind == "structured":
                    def tile_fn(bo):
                        return TL.heads5(bo.tile(qidx, kidx, c.T, c.S), c).astype(c.cdt)
                    out, pull = jax.vjp(tile_fn, bias)
                    (gb,) = pull(TL.sum_to(ds, out.shape))
                    dbias_acc = jax.tree.map(lambda a, g: a + g.astype(c.cdt), dbias_acc, gb)
                elif self.bias_kind == "query":    # d/dE and the bias's own d/dq (before the softcap rule)
                    _, pull = jax.vjp(lambda bo, qf: self.query_bias_tile(bo, qf, qidx, kidx), bias,
                                      qb.astype(c.cdt))
                    gb, dq_bias = pull(ds)
                    dbias_acc = jax.tree.map(lambda a, g: a + g.astype(c.cdt), dbias_acc, gb)
                    dq_buf = dq_buf.at[qi].add(dq_bias)
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
            dk, dv, dq_buf, dbias_acc = self.schedule.visit(dkinds, kj, tile, (dk0, dv0, dq_buf, dbias_acc),
                                                            backward=True)
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
    if is_query_dependent(bias):       # evaluated per tile from the tile's queries (QueryDependentBias)
        bias_kind, bias_in = "query", bias
    elif isinstance(bias, StructuredBias):
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
        return TL.pad_axis(TL.pad_axis(b4, 2, nq * bq), 3, nk * bk)

    def run_fwd(q, k, v, b, sinks, seed, mask_leaves):
        m = jax.tree.unflatten(jax.tree.structure(mask), mask_leaves)
        o_l, lse_l = kernel.forward(TL.layout_q(q, c), TL.layout_kv(k, c), TL.layout_kv(v, c), prep_bias(b), sinks,
                                    seed, m)
        return o_l, lse_l

    @jax.custom_vjp
    def core(q, k, v, b, sinks, seed, mask_leaves):
        o_l, lse_l = run_fwd(q, k, v, b, sinks, seed, mask_leaves)
        return TL.unlayout_q(o_l, c).astype(dtype), TL.unlayout_q(lse_l, c)

    def core_fwd(q, k, v, b, sinks, seed, mask_leaves):
        o_l, lse_l = run_fwd(q, k, v, b, sinks, seed, mask_leaves)
        out = (TL.unlayout_q(o_l, c).astype(dtype), TL.unlayout_q(lse_l, c))
        return out, (q, k, v, b, sinks, seed, mask_leaves, o_l, lse_l)

    def core_bwd(res, cts):
        q, k, v, b, sinks, seed, mask_leaves, o_l, lse_l = res
        do, dlse = cts
        m = jax.tree.unflatten(jax.tree.structure(mask), mask_leaves)
        do_l = TL.layout_q(do.astype(dtype), c)
        delta = (do_l.astype(cdt) * o_l).sum(axis=-1)
        delta = delta - TL.layout_q(dlse.astype(cdt)[..., None], c)[..., 0]
        bp = prep_bias(b)
        dq_l, dk_l, dv_l, dbias, dsinks = kernel.backward(
            TL.layout_q(q, c), TL.layout_kv(k, c), TL.layout_kv(v, c), bp, sinks, seed, m, lse_l, do_l, delta)
        dq = TL.unlayout_q(dq_l, c).astype(q.dtype)
        dk = TL.unlayout_kv(dk_l, c).astype(k.dtype)
        dv = TL.unlayout_kv(dv_l, c).astype(v.dtype)
        db = None
        if bias_kind == "dense":
            g = dbias[:, :, :T, :S]
            g4 = b.reshape((1,) * (4 - b.ndim) + b.shape)
            db = TL.sum_to(g, g4.shape).reshape(b.shape).astype(b.dtype)
        elif bias_kind in ("structured", "query"):
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
    kernel.forward(TL.layout_q(q, c), TL.layout_kv(k, c), TL.layout_kv(v, c), None, None, None, mask)
    return kernel.tiles_visited
