"""Block-sparse attention from traced (router-made) block lists: the engine of MoBA and NSA.

Papers: Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs", 2025,
arXiv:2502.13189 and Yuan et al., "Native Sparse Attention", 2025, arXiv:2502.11089 (the selected
blocks it serves); the online-softmax tiling of Dao, "FlashAttention-2", 2023, arXiv:2307.08691.

Queries are cut into blocks of ``block_size`` rows, keys into blocks of ``block_size`` columns.
``block_idx[b, h, a, :]`` lists the key blocks query block ``a`` attends to (at most ``n_sel``;
``-1`` pads a short list; repeated entries count once; entries outside ``[0, nk)`` are ignored as
``-1`` is).  For each query block the engine gathers its ``n_sel`` key/value blocks and computes::

    S   = scale * Q_a K_sel^T,  -inf where hidden (padding slots, duplicates, keys past S, and
          j > i + (S - T) when causal: bottom-right aligned as attn_jax.masks.causal)
    O_a = softmax(S) V_sel,     lse_a = logsumexp(S)      (O = 0, lse = -inf for a row with no key)

so the work is ``O(T * n_sel * block_size * D)``: proportional to ``n_sel``, not to ``S``.  The
backward is a custom VJP that recomputes ``P = exp(S - lse)`` per query block (FA-2) and
scatter-adds ``dK``/``dV`` into their blocks, so no array has a ``T x S`` extent and the saved
residuals are ``q, k, v, o, lse``.  The function computed is exactly that of
:func:`block_sparse_reference`: dense attention under the materialised block mask
(:func:`block_mask_from_indices`).

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
           "block_mask_from_indices", "block_layout_from_indices", "selected_block_count"]

BLOCK_SPARSE = Registry("sparse.block_sparse_attention")


@dataclass(frozen=True)
class BlockSparseProblem:
    """The validated static description of one call."""

    dims: V.AttentionDims
    index_heads: int      # H or K
    n_sel: int
    block_size: int
    causal: bool
    scale: float
    return_lse: bool
    dtype: Any

    @property
    def nq(self) -> int:
        return -(-self.dims.T // self.block_size)

    @property
    def nk(self) -> int:
        return -(-self.dims.S // self.block_size)


def _problem(q, k, v, block_idx, block_size, causal, scale, return_lse) -> BlockSparseProblem:
    d = V.check_qkv(q, k, v)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    V.check_positive_scalar("scale", scale)
    nq = -(-d.T // block_size)
    shape = tuple(jnp.shape(block_idx))
    if not jnp.issubdtype(jnp.result_type(block_idx), jnp.integer):
        raise TypeError(f"block_idx: expected an integer array, got dtype {jnp.result_type(block_idx)}")
    if len(shape) != 4 or shape[0] != d.B or shape[1] not in (d.H, d.K) or shape[2] != nq or shape[3] < 1:
        raise ValueError(f"block_idx: expected shape [B, H|K, nq, n_sel] = [{d.B}, {d.H}|{d.K}, {nq}, >=1] "
                         f"(nq = ceil(T / block_size) = ceil({d.T} / {block_size})), got {shape}")
    scale = float(d.Dk ** -0.5 if scale is None else scale)
    return BlockSparseProblem(d, shape[1], shape[3], block_size, causal, scale, bool(return_lse), q.dtype)


def block_layout_from_indices(block_idx: Int[ArrayLike, "B Hi nq n_sel"], nk: int) -> Bool[Array, "B Hi nq nk"]:
    """The boolean block layout ``[B, Hi, nq, nk]`` a list of block indices selects (``-1`` and
    out-of-range entries select nothing; duplicates once)."""
    idx = jnp.asarray(block_idx)
    hit = (idx[..., None] == jnp.arange(nk, dtype=idx.dtype)) & (idx[..., None] >= 0)
    return hit.any(axis=-2)


def block_mask_from_indices(block_idx: Int[ArrayLike, "B Hi nq n_sel"], T: int, S: int, block_size: int, *,
                            causal: bool, heads: int | None = None) -> Bool[Array, "B H T S"]:
    """The materialised ``bool[B, H, T, S]`` mask of a block list (for references and tests):
    selected blocks, keys past ``S`` excluded, and ``j <= i + S - T`` when ``causal``.  ``heads``
    (default ``Hi``) repeats a per-key/value-head list over the query heads of each group."""
    idx = jnp.asarray(block_idx)
    nk = -(-S // block_size)
    lay = block_layout_from_indices(idx, nk)
    m = jnp.repeat(jnp.repeat(lay, block_size, axis=2), block_size, axis=3)[:, :, :T, :S]
    if causal:
        m = m & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T))
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
        self.t = TL.tiling(d.B, d.T, d.S, d.H, d.K, d.Dk, d.Dv, p.block_size, p.block_size)
        self.bs = p.block_size
        self.Gi = d.groups if p.index_heads == d.H and d.H != d.K else 1
        self.cdt = jnp.float64 if p.dtype == jnp.float64 else jnp.float32
        self.mdt = p.dtype if p.dtype in (jnp.bfloat16, jnp.float16) else self.cdt
        self.precision = lax.Precision.HIGHEST if self.mdt == self.cdt else None

    def index_layout(self, block_idx):
        """``[B, Hi, nq, n_sel] -> [nq, B, K, Gi, n_sel]`` (int32)."""
        p, t = self.p, self.t
        idx = jnp.asarray(block_idx, jnp.int32).reshape(t.B, t.K, self.Gi, t.nq, p.n_sel)
        return idx.transpose(3, 0, 1, 2, 4)

    def gather(self, x_t, idx):
        """``x_t [B, K, nk, bk, D]``, ``idx [B, K, Gi, n_sel]`` -> ``[B, K, Gi, n_sel * bk, D]``."""
        t = self.t
        bi = jnp.arange(t.B)[:, None, None, None]
        ki = jnp.arange(t.K)[None, :, None, None]
        g = x_t[bi, ki, jnp.clip(idx, 0, t.nk - 1)]                          # [B, K, Gi, n_sel, bk, D]
        return g.reshape(g.shape[:3] + (-1, g.shape[-1]))

    def visibility(self, qi, idx):
        """``[B, K, Gi, bq, n_sel * bk]``: real pairs the block list and causality leave visible."""
        p, t, bs = self.p, self.t, self.bs
        valid = _slot_valid(idx, t.nk)                                       # [B, K, Gi, n_sel]
        kpos = idx[..., None] * bs + jnp.arange(bs, dtype=jnp.int32)         # [B, K, Gi, n_sel, bk]
        kok = (valid[..., None] & (kpos < t.S)).reshape(valid.shape[:3] + (1, -1))
        kpos = kpos.reshape(kok.shape)
        qrow = qi * bs + jnp.arange(bs, dtype=jnp.int32)                     # [bq]
        vis = kok & (qrow < t.T)[:, None]
        if p.causal:
            vis = vis & (kpos <= (qrow + (t.S - t.T))[:, None])
        return vis

    def scores(self, qb, kg, vis):
        """Masked logits ``[B, K, G, bq, L]`` (cdt) and the zeroed operands."""
        row_used = vis.any(axis=-1)[..., None]                              # [B, K, Gi, bq, 1]
        col_used = vis.any(axis=-2)[..., None]                              # [B, K, Gi, L, 1]
        qb = jnp.where(row_used, qb, 0)
        kg = jnp.where(col_used, kg, 0)
        s = self.einsum("bkgqd,bkgsd->bkgqs", qb, kg) * self.p.scale
        return jnp.where(vis, s, -jnp.inf), qb, kg, col_used

    def einsum(self, spec, a, b, cast=False):
        """``jnp.einsum`` in the compute dtype; ``bkgsd`` names a gathered operand or result, whose group
        axis has size 1 when one list serves all the query heads of a group (summed over, for results)."""
        if cast:
            a, b = a.astype(self.mdt), b.astype(self.mdt)
        shared = self.Gi == 1 and self.t.G > 1
        if shared:
            ins, out = spec.split("->")
            if "bkgsd" in ins:
                b = b[:, :, 0]
            spec = spec.replace("bkgsd", "bksd")
        r = jnp.einsum(spec, a, b, preferred_element_type=self.cdt, precision=self.precision)
        return r[:, :, None] if shared and spec.endswith("bksd") else r

    def forward(self, q, k, v, block_idx):
        t = self.t
        q_l = TL.layout_q(q, t)                                               # [nq, B, K, G, bq, Dk]
        k_t = TL.layout_kv(k, t).transpose(0, 3, 1, 2, 4)                    # [B, K, nk, bk, Dk]
        v_t = TL.layout_kv(v, t).transpose(0, 3, 1, 2, 4)
        idx_l = self.index_layout(block_idx)

        def q_block(_, xs):
            qi, qb, idx = xs
            vis = self.visibility(qi, idx)
            kg, vg = self.gather(k_t, idx), self.gather(v_t, idx)
            s, _, _, col_used = self.scores(qb, kg, vis)
            vg = jnp.where(col_used, vg, 0)
            m = s.max(axis=-1)
            m_safe = jnp.where(m == -jnp.inf, 0.0, m)
            e = jnp.exp(s - m_safe[..., None])
            l = e.sum(axis=-1)
            acc = self.einsum("bkgqs,bkgsd->bkgqd", e, vg, cast=True)
            has = l > 0
            safe_l = jnp.where(has, l, 1.0)
            o = acc / safe_l[..., None]
            lse = jnp.where(has, m_safe + jnp.log(safe_l), -jnp.inf)
            return None, (o, lse)

        _, (o_l, lse_l) = lax.scan(q_block, None, (jnp.arange(t.nq, dtype=jnp.int32), q_l, idx_l))
        return o_l, lse_l

    def backward(self, q, k, v, block_idx, o_l, lse_l, do, dlse):
        t = self.t
        q_l = TL.layout_q(q, t)
        k_t = TL.layout_kv(k, t).transpose(0, 3, 1, 2, 4)
        v_t = TL.layout_kv(v, t).transpose(0, 3, 1, 2, 4)
        idx_l = self.index_layout(block_idx)
        do_l = TL.layout_q(do.astype(q.dtype), t)
        delta_l = (do_l.astype(self.cdt) * o_l).sum(-1) - TL.layout_q(dlse.astype(self.cdt)[..., None], t)[..., 0]
        lse_safe = jnp.where(jnp.isfinite(lse_l), lse_l, 0.0)
        bi = jnp.arange(t.B)[:, None, None, None]
        ki = jnp.arange(t.K)[None, :, None, None]

        def q_block(carry, xs):
            dk_t, dv_t = carry
            qi, qb, idx, dob, lse, delta = xs
            vis = self.visibility(qi, idx)
            kg, vg = self.gather(k_t, idx), self.gather(v_t, idx)
            s, qb, kg, col_used = self.scores(qb, kg, vis)
            vg = jnp.where(col_used, vg, 0)
            pr = jnp.where(vis, jnp.exp(s - lse[..., None]), 0.0)
            dp = self.einsum("bkgqd,bkgsd->bkgqs", dob, vg)
            ds = pr * (dp - delta[..., None]) * self.p.scale
            dq = self.einsum("bkgqs,bkgsd->bkgqd", ds, kg, cast=True)
            dkg = self.einsum("bkgqs,bkgqd->bkgsd", ds, qb, cast=True)              # [B, K, Gi, L, Dk]
            dvg = self.einsum("bkgqs,bkgqd->bkgsd", pr, dob, cast=True)
            shape = idx.shape + (t.bk, -1)                                    # [B, K, Gi, n_sel, bk, D]
            cidx = jnp.clip(idx, 0, t.nk - 1)
            # invalid slots carry zero gradients (their pairs are hidden), so clipping them is harmless
            dk_t = dk_t.at[bi, ki, cidx].add(dkg.reshape(shape))
            dv_t = dv_t.at[bi, ki, cidx].add(dvg.reshape(shape))
            return (dk_t, dv_t), dq

        dk0 = jnp.zeros((t.B, t.K, t.nk, t.bk, t.Dk), self.cdt)
        dv0 = jnp.zeros((t.B, t.K, t.nk, t.bk, t.Dv), self.cdt)
        (dk_t, dv_t), dq_l = lax.scan(q_block, (dk0, dv0), (jnp.arange(t.nq, dtype=jnp.int32), q_l, idx_l, do_l,
                                                            lse_safe, delta_l))
        dq = TL.unlayout_q(dq_l, t).astype(q.dtype)
        dk = TL.unlayout_kv(dk_t.transpose(2, 0, 3, 1, 4), t).astype(k.dtype)
        dv = TL.unlayout_kv(dv_t.transpose(2, 0, 3, 1, 4), t).astype(v.dtype)
        return dq, dk, dv


def _xla(p: BlockSparseProblem, q, k, v, block_idx):
    eng = _Engine(p)

    @jax.custom_vjp
    def core(q, k, v, block_idx):
        o_l, lse_l = eng.forward(q, k, v, block_idx)
        return TL.unlayout_q(o_l, eng.t).astype(q.dtype), TL.unlayout_q(lse_l, eng.t)

    def core_fwd(q, k, v, block_idx):
        o_l, lse_l = eng.forward(q, k, v, block_idx)
        out = (TL.unlayout_q(o_l, eng.t).astype(q.dtype), TL.unlayout_q(lse_l, eng.t))
        return out, (q, k, v, block_idx, o_l, lse_l)

    def core_bwd(res, cts):
        q, k, v, block_idx, o_l, lse_l = res
        do, dlse = cts
        dq, dk, dv = eng.backward(q, k, v, block_idx, o_l, lse_l, do, dlse)
        return dq, dk, dv, None

    core.defvjp(core_fwd, core_bwd)
    o, lse = core(q, k, v, block_idx)
    return (o, lse.astype(jnp.float32 if eng.cdt == jnp.float32 else eng.cdt)) if p.return_lse else o


def block_sparse_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                           v: Float[ArrayLike, "B S K Dv"], block_idx: Int[ArrayLike, "B Hi nq n_sel"], *,
                           block_size: int, causal: bool, scale: float | None = None, return_lse: bool = False):
    """Dense attention under the materialised block mask (:func:`block_mask_from_indices`): the spec."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    m = block_mask_from_indices(block_idx, T, S, block_size, causal=causal, heads=H)
    return attention_reference(q, k, v, mask=M.dense(m), scale=scale, return_lse=return_lse)


def _reference(p: BlockSparseProblem, q, k, v, block_idx):
    return block_sparse_reference(q, k, v, block_idx, block_size=p.block_size, causal=p.causal, scale=p.scale,
                                  return_lse=p.return_lse)


def _always(platform, p):
    return []


BLOCK_SPARSE.register("xla", _xla, _always)
BLOCK_SPARSE.register("reference", _reference, _always, auto=False)


def block_sparse_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                           v: Float[ArrayLike, "B S K Dv"], block_idx: Int[ArrayLike, "B Hi nq n_sel"], *,
                           block_size: int, causal: bool = False, scale: float | None = None,
                           return_lse: bool = False, impl="auto"
                           ) -> Float[Array, "B T H Dv"] | tuple[Float[Array, "B T H Dv"], Float[Array, "B T H"]]:
    """Attention of each query block over a traced list of key blocks (see the module docstring).

    Args:
      q, k, v: ``[B, T, H, Dk]``, ``[B, S, K, Dk]``, ``[B, S, K, Dv]`` (``H % K == 0``).
      block_idx: ``int[B, H|K, nq, n_sel]``, ``nq = ceil(T / block_size)``: the key blocks of each
        query block (``-1`` = none; duplicates count once; may be traced, e.g. a router's top-k).
      block_size: query and key block size in tokens.
      causal: hide ``j > i + (S - T)`` inside the selected blocks (bottom-right aligned).
      scale: logit scale, default ``Dk ** -0.5``.
      return_lse: also return the float32 log-sum-exp ``[B, T, H]`` (``-inf`` for a row with no key),
        e.g. to merge with other branches through :func:`attn_jax.merge_attention`.
      impl: ``"auto"`` (= ``"xla"``), ``"xla"`` or ``"reference"``.

    Returns ``o [B, T, H, Dv]`` in q's dtype (and ``lse``).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    block_idx = jnp.asarray(block_idx)
    p = _problem(q, k, v, block_idx, block_size, causal, scale, return_lse)
    return BLOCK_SPARSE.call(impl, p, q, k, v, block_idx)


def _explain(q, k, v, block_idx, *, block_size, causal=False, scale=None, return_lse=False, impl="auto",
             platform=None):
    p = _problem(q, k, v, block_idx, block_size, causal, scale, return_lse)
    return BLOCK_SPARSE.explain(impl, p, platform)


register_explainer(block_sparse_attention, _explain)
