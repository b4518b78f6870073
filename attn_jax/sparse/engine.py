"""Block-sparse attention from traced (router-made) block lists: the engine of MoBA and NSA.

Papers: Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs", 2025,
arXiv:2502.13189 and Yuan et al., "Native Sparse Attention", 2025, arXiv:2502.11089 (the selected
blocks it serves); the online-softmax tiling of Dao, "FlashAttention-2", 2023, arXiv:2307.08691.

Queries are cut into blocks of ``block_q`` rows (default ``block_size``), keys into blocks of
``block_size`` columns.  ``block_idx[b, h, a, :]`` lists the key blocks query block ``a`` attends to
(at most ``n_sel``; ``-1`` pads a short list; repeated entries count once; entries outside
``[0, nk)`` are ignored as ``-1`` is).  An optional ``slot_mask[b, h, i, s]`` says whether *token*
``i`` of that query block sees the block in slot ``s`` (token-level routing such as MoBA's: the
list of a query block is the union of its tokens' choices; a repeated entry is governed by the
slot mask of its first occurrence).  Per query block the engine visits
the valid slots, one key block per step with an online softmax (trip count: the number of valid
slots of that query block, over batch rows and heads; valid slots are moved first)::

    S   = scale * Q_a K_blk^T,  -inf where hidden (the slot mask, keys past S, and
          j > i + (S - T) when causal: bottom-right aligned as attn_jax.masks.causal)
    O_a = softmax(S) V,  over the visited blocks;   lse_a = logsumexp(S)
    (O = 0, lse = -inf for a row with no visible key)

so the work is ``O(T * n_valid * block_size * D)``: proportional to the selected blocks, not to
``S``.  The backward is a custom VJP that recomputes ``P = exp(S - lse)`` per tile (FA-2) and
scatter-adds ``dK``/``dV`` into their blocks; no array has a ``T x S`` extent and the saved
residuals are ``q, k, v, o, lse`` (the lists are integer inputs, not differentiated).  The function
computed is exactly that of :func:`block_sparse_reference`: dense attention under the materialised
block mask (:func:`block_mask_from_indices`).

GQA.  ``block_idx`` has ``H`` heads (one list per query head) or ``K`` heads (one list per key/value
head, shared by its ``H / K`` query heads: the key blocks are then gathered once per group).

NaN safety (the rule of :mod:`attn_jax.softmax.xla`): key/value columns and query rows that no
visible pair of a block uses are zeroed before any product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from attn_jax.core import masks as M
from attn_jax.core import tiles as TL
from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.dispatch import Registry, register_explainer
from attn_jax.softmax.reference import attention_reference

__all__ = ["BLOCK_SPARSE", "BlockSparseProblem", "block_sparse_attention", "block_sparse_reference",
           "block_mask_from_indices", "block_layout_from_indices", "selected_block_count", "block_sparse_tile_count"]

BLOCK_SPARSE = Registry("sparse.block_sparse_attention")


@dataclass(frozen=True)
class BlockSparseProblem:
    """The validated static description of one call."""

    dims: V.AttentionDims
    index_heads: int      # H or K
    n_sel: int
    block_size: int
    block_q: int
    causal: bool
    scale: float
    return_lse: bool
    dtype: Any
    has_slot_mask: bool
    offset: int | None          # static position of query 0 (None: an int[B] array is passed)
    has_segments: bool

    @property
    def nq(self) -> int:
        return -(-self.dims.T // self.block_q)

    @property
    def nk(self) -> int:
        return -(-self.dims.S // self.block_size)


def _check_block(name, b):
    if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
        raise ValueError(f"{name}: expected a positive int, got {b!r}")


def _problem(q, k, v, block_idx, slot_mask, block_size, block_q, causal, scale, return_lse, q_offset=None,
             segment_ids=None) -> BlockSparseProblem:
    d = V.check_qkv(q, k, v)
    _check_block("block_size", block_size)
    block_q = block_size if block_q is None else block_q
    _check_block("block_q", block_q)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    V.check_positive_scalar("scale", scale)
    nq = -(-d.T // block_q)
    shape = tuple(jnp.shape(block_idx))
    if not jnp.issubdtype(jnp.result_type(block_idx), jnp.integer):
        raise TypeError(f"block_idx: expected an integer array, got dtype {jnp.result_type(block_idx)}")
    if len(shape) != 4 or shape[0] != d.B or shape[1] not in (d.H, d.K) or shape[2] != nq or shape[3] < 1:
        raise ValueError(f"block_idx: expected shape [B, H|K, nq, n_sel] = [{d.B}, {d.H}|{d.K}, {nq}, >=1] "
                         f"(nq = ceil(T / block_q) = ceil({d.T} / {block_q})), got {shape}")
    if slot_mask is not None:
        want = (d.B, shape[1], d.T, shape[3])
        if tuple(jnp.shape(slot_mask)) != want:
            raise ValueError(f"slot_mask: expected shape [B, Hi, T, n_sel] = {list(want)}, got {tuple(jnp.shape(slot_mask))}")
        if jnp.result_type(slot_mask) != jnp.bool_:
            raise TypeError(f"slot_mask: expected a boolean array, got dtype {jnp.result_type(slot_mask)}")
    offset = d.S - d.T if q_offset is None else q_offset
    if not M.is_concrete_int(offset):
        if tuple(jnp.shape(offset)) != (d.B,) or not jnp.issubdtype(jnp.result_type(offset), jnp.integer):
            raise ValueError(f"q_offset: expected an int or an int array of shape [{d.B}], got "
                             f"{jnp.result_type(offset)}{tuple(jnp.shape(offset))}")
        offset = None
    else:
        offset = int(offset)
    if segment_ids is not None:
        qs, ks = segment_ids
        if tuple(jnp.shape(qs)) != (d.B, d.T) or tuple(jnp.shape(ks)) != (d.B, d.S):
            raise ValueError(f"segment_ids: expected (q ids [{d.B}, {d.T}], kv ids [{d.B}, {d.S}]), got "
                             f"({tuple(jnp.shape(qs))}, {tuple(jnp.shape(ks))})")
    scale = float(d.Dk ** -0.5 if scale is None else scale)
    return BlockSparseProblem(d, shape[1], shape[3], block_size, block_q, causal, scale, bool(return_lse), q.dtype,
                              slot_mask is not None, offset, segment_ids is not None)


def block_layout_from_indices(block_idx: Int[ArrayLike, "B Hi nq n_sel"], nk: int) -> Bool[Array, "B Hi nq nk"]:
    """The boolean block layout ``[B, Hi, nq, nk]`` a list of block indices selects (``-1`` and
    out-of-range entries select nothing; duplicates once)."""
    idx = jnp.asarray(block_idx)
    hit = (idx[..., None] == jnp.arange(nk, dtype=idx.dtype)) & (idx[..., None] >= 0)
    return hit.any(axis=-2)


def block_mask_from_indices(block_idx: Int[ArrayLike, "B Hi nq n_sel"], T: int, S: int, block_size: int, *,
                            causal: bool, block_q: int | None = None, slot_mask=None, q_offset=None,
                            segment_ids=None, heads: int | None = None) -> Bool[Array, "B H T S"]:
    """The materialised ``bool[B, H, T, S]`` mask of a block list (for references and tests):
    selected blocks (per token through ``slot_mask [B, Hi, T, n_sel]`` when given), keys past ``S``
    excluded, ``j <= i + q_offset`` when ``causal`` (default offset ``S - T``; an int or int[B]) and
    matching non-zero ids when ``segment_ids = (q ids [B, T], kv ids [B, S])``.  ``heads`` (default
    ``Hi``) repeats a per-key/value-head list over the query heads of each group."""
    idx = jnp.asarray(block_idx)
    block_q = block_size if block_q is None else block_q
    nk = -(-S // block_size)
    tok_idx = jnp.repeat(idx, block_q, axis=2)[:, :, :T]                       # [B, Hi, T, n_sel]
    first = jnp.repeat(_slot_valid(idx, nk), block_q, axis=2)[:, :, :T]         # a repeat uses its first slot
    hit = (tok_idx[..., None] == jnp.arange(nk, dtype=idx.dtype)) & first[..., None]
    if slot_mask is not None:
        hit = hit & jnp.asarray(slot_mask, bool)[..., None]
    lay = hit.any(axis=-2)                                                       # [B, Hi, T, nk]
    m = jnp.repeat(lay, block_size, axis=3)[..., :S]
    if causal:
        m = m & M.causal(q_offset).materialize(T, S)
    if segment_ids is not None:
        m = m & M.segments(*segment_ids).materialize(T, S)
    if heads is not None and heads != idx.shape[1]:
        m = jnp.repeat(m, heads // idx.shape[1], axis=1)
    return m


def selected_block_count(block_idx: Int[ArrayLike, "B Hi nq n_sel"], nk: int) -> Int[Array, ""]:
    """How many distinct valid (query block, key block) pairs a list selects: the work the engine does."""
    return block_layout_from_indices(block_idx, nk).sum()


# ----------------------------------------------------------------------------- the XLA engine


def _slot_valid(idx, nk):
    """``[..., n_sel]`` -> valid slots: in range and not a repeat of an earlier slot."""
    n = idx.shape[-1]
    earlier = jnp.tril(jnp.ones((n, n), bool), -1)                       # [s, t]: t < s
    dup = ((idx[..., :, None] == idx[..., None, :]) & earlier).any(axis=-1)
    return (idx >= 0) & (idx < nk) & ~dup


class _Engine:
    def __init__(self, p: BlockSparseProblem):
        d = p.dims
        self.p = p
        self.t = TL.tiling(d.B, d.T, d.S, d.H, d.K, d.Dk, d.Dv, p.block_q, p.block_size)
        self.Gi = d.groups if p.index_heads == d.H and d.H != d.K else 1
        self.cdt = jnp.float64 if p.dtype == jnp.float64 else jnp.float32
        self.mdt = p.dtype if p.dtype in (jnp.bfloat16, jnp.float16) else self.cdt
        self.precision = lax.Precision.HIGHEST if self.mdt == self.cdt else None

    def lists(self, block_idx, slot_mask):
        """Compacted lists in query-block layout: ``idx [nq, B, K, Gi, n_sel]`` (valid slots first),
        ``valid`` (same shape), ``smask [nq, B, K, Gi, bq, n_sel]`` (None without a slot mask) and
        ``count [nq]``: the slots any (batch row, head) of the query block uses (the loop's trip count)."""
        p, t = self.p, self.t
        idx = jnp.asarray(block_idx, jnp.int32)
        valid = _slot_valid(idx, t.nk)
        order = jnp.argsort(~valid, axis=-1, stable=True)
        idx = jnp.take_along_axis(idx, order, axis=-1)
        valid = jnp.take_along_axis(valid, order, axis=-1)
        lay = lambda x: x.reshape(t.B, t.K, self.Gi, t.nq, p.n_sel).transpose(3, 0, 1, 2, 4)  # noqa: E731
        smask = None
        if slot_mask is not None:
            sm = jnp.repeat(order, t.bq, axis=2)[:, :, :t.T]                     # each token's block order
            sm = jnp.take_along_axis(jnp.asarray(slot_mask, bool), sm, axis=-1)  # [B, Hi, T, n_sel]
            sm = TL.pad_axis(sm, 2, t.nq * t.bq).reshape(t.B, t.K, self.Gi, t.nq, t.bq, p.n_sel)
            smask = sm.transpose(3, 0, 1, 2, 4, 5)
        count = lay(valid).sum(-1).reshape(t.nq, -1).max(-1).astype(jnp.int32)
        return lay(idx), lay(valid), smask, count

    def visibility(self, qi, blk, ok, sm, ex, qseg):
        """``[B, K, Gi, bq, bk]``: the real pairs of query block ``qi`` and key block ``blk [B, K, Gi]``
        that the list (``ok``), the slot mask (``sm [B, K, Gi, bq]``), causality and the segment ids
        (``qseg [B, bq]`` of this query block, ``ex``'s kv ids) leave visible."""
        t = self.t
        kpos = blk[..., None] * t.bk + jnp.arange(t.bk, dtype=jnp.int32)       # [B, K, Gi, bk]
        qrow = qi * t.bq + jnp.arange(t.bq, dtype=jnp.int32)
        vis = (ok[..., None] & (kpos < t.S))[..., None, :] & (qrow < t.T)[:, None]
        if self.p.causal:
            off = self.p.offset if self.p.offset is not None else ex["offset"][:, None, None, None, None]
            vis = vis & (kpos[..., None, :] <= qrow[:, None] + off)
        if qseg is not None:
            kv = TL.pad_axis(ex["kv_seg"], 1, t.nk * t.bk)
            kseg = kv[jnp.arange(t.B)[:, None, None, None], jnp.clip(kpos, 0, t.nk * t.bk - 1)]   # [B, K, Gi, bk]
            qs = qseg[:, None, None, :, None]
            vis = vis & (qs == kseg[..., None, :]) & (qs != 0)
        if sm is not None:
            vis = vis & sm[..., None]
        return vis

    def tile(self, x_t, blk):
        """Key block ``blk [B, K, Gi]`` of ``x_t [B, K, nk, bk, D]``: ``[B, K, Gi, bk, D]``."""
        t = self.t
        return x_t[jnp.arange(t.B)[:, None, None], jnp.arange(t.K)[None, :, None], jnp.clip(blk, 0, t.nk - 1)]

    def scores(self, qb, kb, vis):
        """Masked logits ``[B, K, G, bq, bk]`` (cdt) and the operands with unused rows/columns zeroed."""
        qb = jnp.where(vis.any(axis=-1)[..., None], qb, 0)
        col_used = vis.any(axis=-2)[..., None]                                # [B, K, Gi, bk, 1]
        kb = jnp.where(col_used, kb, 0)
        s = self.einsum("bkgqd,bkgsd->bkgqs", qb, kb) * self.p.scale
        return jnp.where(vis, s, -jnp.inf), qb, kb, col_used

    def einsum(self, spec, a, b, cast=False):
        """``jnp.einsum`` in the compute dtype; ``bkgsd`` names a key-block operand or result, whose group
        axis has size 1 when one list serves all the query heads of a group (summed over, for results)."""
        if cast:
            a, b = a.astype(self.mdt), b.astype(self.mdt)
        shared = self.Gi == 1 and self.t.G > 1
        if shared:
            if "bkgsd" in spec.split("->")[0]:
                b = b[:, :, 0]
            spec = spec.replace("bkgsd", "bksd")
        r = jnp.einsum(spec, a, b, preferred_element_type=self.cdt, precision=self.precision)
        return r[:, :, None] if shared and spec.endswith("bksd") else r

    def operands(self, q, k, v):
        t = self.t
        return (TL.layout_q(q, t), TL.layout_kv(k, t).transpose(0, 3, 1, 2, 4),
                TL.layout_kv(v, t).transpose(0, 3, 1, 2, 4))                  # q_l, k_t/v_t [B, K, nk, bk, D]

    def qseg_layout(self, ex):
        """The query segment ids per query block, ``[nq, B, bq]`` (None without segments)."""
        if ex.get("q_seg") is None:
            return None
        t = self.t
        return TL.pad_axis(ex["q_seg"], 1, t.nq * t.bq).reshape(t.B, t.nq, t.bq).transpose(1, 0, 2)

    def forward(self, q, k, v, block_idx, slot_mask, ex):
        t = self.t
        q_l, k_t, v_t = self.operands(q, k, v)
        idx_l, valid_l, smask_l, count = self.lists(block_idx, slot_mask)
        qseg_l = self.qseg_layout(ex)

        def q_block(_, xs):
            qi, qb, idx, valid, smask, n, qseg = xs

            def step(s, st):
                m, l, acc, n_tiles = st
                blk = idx[..., s]
                vis = self.visibility(qi, blk, valid[..., s], None if smask is None else smask[..., s], ex, qseg)
                sc, _, _, col_used = self.scores(qb, self.tile(k_t, blk), vis)
                vb = jnp.where(col_used, self.tile(v_t, blk), 0)
                m_new = jnp.maximum(m, sc.max(axis=-1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                e = jnp.exp(sc - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                pv = self.einsum("bkgqs,bkgsd->bkgqd", e, vb, cast=True)
                return m_new, alpha * l + e.sum(-1), alpha[..., None] * acc + pv, n_tiles + 1

            shape = (t.B, t.K, t.G, t.bq)
            m, l, acc, n_tiles = lax.fori_loop(0, n, step, (jnp.full(shape, -jnp.inf, self.cdt),
                                                            jnp.zeros(shape, self.cdt),
                                                            jnp.zeros(shape + (t.Dv,), self.cdt), jnp.int32(0)))
            has = l > 0
            safe_l = jnp.where(has, l, 1.0)
            m_safe = jnp.where(m == -jnp.inf, 0.0, m)
            return None, (acc / safe_l[..., None], jnp.where(has, m_safe + jnp.log(safe_l), -jnp.inf), n_tiles)

        xs = (jnp.arange(t.nq, dtype=jnp.int32), q_l, idx_l, valid_l, smask_l, count, qseg_l)
        _, (o_l, lse_l, n_tiles) = lax.scan(q_block, None, xs)
        self.tiles_visited = n_tiles.sum()   # key-block steps the forward computed (tests, benchmarks)
        return o_l, lse_l

    def backward(self, q, k, v, block_idx, slot_mask, ex, o_l, lse_l, do, dlse):
        t = self.t
        q_l, k_t, v_t = self.operands(q, k, v)
        idx_l, valid_l, smask_l, count = self.lists(block_idx, slot_mask)
        qseg_l = self.qseg_layout(ex)
        do_l = TL.layout_q(do.astype(q.dtype), t)
        delta_l = (do_l.astype(self.cdt) * o_l).sum(-1) - TL.layout_q(dlse.astype(self.cdt)[..., None], t)[..., 0]
        lse_l = jnp.where(jnp.isfinite(lse_l), lse_l, 0.0)
        bi = jnp.arange(t.B)[:, None, None]
        ki = jnp.arange(t.K)[None, :, None]

        def q_block(carry, xs):
            qi, qb0, idx, valid, smask, n, dob, lse, delta, qseg = xs

            def step(s, st):
                dq, dk_t, dv_t = st
                blk = idx[..., s]
                vis = self.visibility(qi, blk, valid[..., s], None if smask is None else smask[..., s], ex, qseg)
                sc, qb, kb, col_used = self.scores(qb0, self.tile(k_t, blk), vis)
                vb = jnp.where(col_used, self.tile(v_t, blk), 0)
                pr = jnp.where(vis, jnp.exp(sc - lse[..., None]), 0.0)
                dp = self.einsum("bkgqd,bkgsd->bkgqs", dob, vb)
                ds = pr * (dp - delta[..., None]) * self.p.scale
                dq = dq + self.einsum("bkgqs,bkgsd->bkgqd", ds, kb, cast=True)
                cblk = jnp.clip(blk, 0, t.nk - 1)
                # invalid slots carry zero gradients (their pairs are hidden), so clipping them is harmless
                dk_t = dk_t.at[bi, ki, cblk].add(self.einsum("bkgqs,bkgqd->bkgsd", ds, qb, cast=True))
                dv_t = dv_t.at[bi, ki, cblk].add(self.einsum("bkgqs,bkgqd->bkgsd", pr, dob, cast=True))
                return dq, dk_t, dv_t

            dq, dk_t, dv_t = lax.fori_loop(0, n, step, (jnp.zeros(qb0.shape, self.cdt),) + carry)
            return (dk_t, dv_t), dq

        dk0 = jnp.zeros((t.B, t.K, t.nk, t.bk, t.Dk), self.cdt)
        dv0 = jnp.zeros((t.B, t.K, t.nk, t.bk, t.Dv), self.cdt)
        xs = (jnp.arange(t.nq, dtype=jnp.int32), q_l, idx_l, valid_l, smask_l, count, do_l, lse_l, delta_l, qseg_l)
        (dk_t, dv_t), dq_l = lax.scan(q_block, (dk0, dv0), xs)
        dq = TL.unlayout_q(dq_l, t).astype(q.dtype)
        dk = TL.unlayout_kv(dk_t.transpose(2, 0, 3, 1, 4), t).astype(k.dtype)
        dv = TL.unlayout_kv(dv_t.transpose(2, 0, 3, 1, 4), t).astype(v.dtype)
        return dq, dk, dv


def _xla(p: BlockSparseProblem, q, k, v, block_idx, slot_mask, ex):
    eng = _Engine(p)

    @jax.custom_vjp
    def core(q, k, v, block_idx, slot_mask, ex):
        o_l, lse_l = eng.forward(q, k, v, block_idx, slot_mask, ex)
        return TL.unlayout_q(o_l, eng.t).astype(q.dtype), TL.unlayout_q(lse_l, eng.t)

    def core_fwd(q, k, v, block_idx, slot_mask, ex):
        o_l, lse_l = eng.forward(q, k, v, block_idx, slot_mask, ex)
        out = (TL.unlayout_q(o_l, eng.t).astype(q.dtype), TL.unlayout_q(lse_l, eng.t))
        return out, (q, k, v, block_idx, slot_mask, ex, o_l, lse_l)

    def core_bwd(res, cts):
        q, k, v, block_idx, slot_mask, ex, o_l, lse_l = res
        do, dlse = cts
        dq, dk, dv = eng.backward(q, k, v, block_idx, slot_mask, ex, o_l, lse_l, do, dlse)
        return dq, dk, dv, None, None, jax.tree.map(lambda _: None, ex)

    core.defvjp(core_fwd, core_bwd)
    o, lse = core(q, k, v, block_idx, slot_mask, ex)
    return (o, lse.astype(jnp.float32 if eng.cdt == jnp.float32 else eng.cdt)) if p.return_lse else o


def block_sparse_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                           v: Float[ArrayLike, "B S K Dv"], block_idx: Int[ArrayLike, "B Hi nq n_sel"], *,
                           block_size: int, causal: bool, block_q: int | None = None,
                           slot_mask: Bool[ArrayLike, "B Hi T n_sel"] | None = None, q_offset=None,
                           segment_ids=None, scale: float | None = None, return_lse: bool = False):
    """Dense attention under the materialised block mask (:func:`block_mask_from_indices`): the spec."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    m = block_mask_from_indices(block_idx, T, S, block_size, causal=causal, block_q=block_q, slot_mask=slot_mask,
                                q_offset=q_offset, segment_ids=segment_ids, heads=H)
    return attention_reference(q, k, v, mask=M.dense(m), scale=scale, return_lse=return_lse)


def _reference(p: BlockSparseProblem, q, k, v, block_idx, slot_mask, ex):
    seg = (ex["q_seg"], ex["kv_seg"]) if p.has_segments else None
    return block_sparse_reference(q, k, v, block_idx, block_size=p.block_size, causal=p.causal, block_q=p.block_q,
                                  slot_mask=slot_mask, q_offset=ex.get("offset", p.offset), segment_ids=seg,
                                  scale=p.scale, return_lse=p.return_lse)


def _extras(q_offset, segment_ids):
    """The traced extras of a call: an ``int[B]`` offset, segment ids."""
    ex = {}
    if q_offset is not None and not M.is_concrete_int(q_offset):
        ex["offset"] = jnp.asarray(q_offset, jnp.int32)
    if segment_ids is not None:
        ex["q_seg"], ex["kv_seg"] = (jnp.asarray(x, jnp.int32) for x in segment_ids)
    return ex


def _always(platform, p):
    return []


BLOCK_SPARSE.register("xla", _xla, _always)
BLOCK_SPARSE.register("reference", _reference, _always, auto=False)


def block_sparse_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                           v: Float[ArrayLike, "B S K Dv"], block_idx: Int[ArrayLike, "B Hi nq n_sel"], *,
                           block_size: int, causal: bool = False, block_q: int | None = None,
                           slot_mask: Bool[ArrayLike, "B Hi T n_sel"] | None = None, q_offset=None,
                           segment_ids=None, scale: float | None = None, return_lse: bool = False, impl="auto"
                           ) -> Float[Array, "B T H Dv"] | tuple[Float[Array, "B T H Dv"], Float[Array, "B T H"]]:
    """Attention of each query block over a traced list of key blocks (see the module docstring).

    Args:
      q, k, v: ``[B, T, H, Dk]``, ``[B, S, K, Dk]``, ``[B, S, K, Dv]`` (``H % K == 0``).
      block_idx: ``int[B, H|K, nq, n_sel]``, ``nq = ceil(T / block_q)``: the key blocks of each
        query block (``-1`` = none; duplicates count once; may be traced, e.g. a router's top-k).
      block_size: key block size in tokens.
      block_q: query block size in tokens (default ``block_size``).
      slot_mask: optional ``bool[B, H|K, T, n_sel]``: token ``i`` sees slot ``s`` of its query
        block's list only where True (token-level routing).
      q_offset: the position of query 0 for ``causal`` (an int or ``int[B]``, e.g. cache lengths;
        default ``S - T``).
      segment_ids: ``(q ids int[B, T], kv ids int[B, S])``: pairs with equal non-zero ids only
        (packed documents; 0 = padding).
      causal: hide ``j > i + (S - T)`` inside the selected blocks (bottom-right aligned).
      scale: logit scale, default ``Dk ** -0.5``.
      return_lse: also return the float32 log-sum-exp ``[B, T, H]`` (``-inf`` for a row with no key),
        e.g. to merge with other branches through :func:`attn_jax.merge_attention`.
      impl: ``"auto"`` (= ``"xla"``), ``"xla"`` or ``"reference"``.

    Returns ``o [B, T, H, Dv]`` in q's dtype (and ``lse``).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    block_idx = jnp.asarray(block_idx)
    slot_mask = None if slot_mask is None else jnp.asarray(slot_mask)
    p = _problem(q, k, v, block_idx, slot_mask, block_size, block_q, causal, scale, return_lse, q_offset,
                 segment_ids)
    return BLOCK_SPARSE.call(impl, p, q, k, v, block_idx, slot_mask, _extras(q_offset, segment_ids))


def block_sparse_tile_count(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                            v: Float[ArrayLike, "B S K Dv"], block_idx: Int[ArrayLike, "B Hi nq n_sel"], *,
                            block_size: int, causal: bool = False, block_q: int | None = None,
                            slot_mask=None) -> Int[Array, ""]:
    """Key-block steps the XLA forward computes (int32; jit-able), counted inside its loop: each step is
    one ``(block_q, block_size)`` tile for every batch row and head at once."""
    q, k, v, block_idx = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(block_idx)
    slot_mask = None if slot_mask is None else jnp.asarray(slot_mask)
    eng = _Engine(_problem(q, k, v, block_idx, slot_mask, block_size, block_q, causal, None, False))
    eng.forward(q, k, v, block_idx, slot_mask, {})
    return eng.tiles_visited


def _explain(q, k, v, block_idx, *, block_size, causal=False, block_q=None, slot_mask=None, scale=None,
             return_lse=False, impl="auto", platform=None):
    p = _problem(q, k, v, block_idx, slot_mask, block_size, block_q, causal, scale, return_lse)
    return BLOCK_SPARSE.explain(impl, p, platform)


register_explainer(block_sparse_attention, _explain)
