"""The shared engine of the score normalisers: validation, dispatch, references and the tiled XLA form.

A *row-local* normaliser replaces softmax by an elementwise map ``φ`` of the logits, optionally
followed by an l1 normalisation over the visible keys::

    s_ij = c · scale · q_i · k_j + b          c = log_base(S) with length_scale=base, else 1
    w_ij = φ(s_ij)                            0 where the mask hides (i, j)
    o_i  = Σ_j w_ij v_j                       ("none": sigmoid, ReLU)
    o_i  = Σ_j w_ij v_j / Σ_j w_ij            ("l1": softplus; 0 for a row with no visible key)

Neither form needs a row-global quantity before the sum, so :func:`rowwise_blockwise` runs it
over ``(bq, bk)`` tiles like FlashAttention with no ``T x S`` array: the forward accumulates
``Σ w v`` (and ``l = Σ w``); the backward (a custom VJP) recomputes ``w`` per tile::

    D_i   = rowsum(dO_i * O_i)  ("l1"; 0 for "none"),  r_i = 1 / l_i ("l1"; 1 for "none")
    dV_j += (w r)^T dO
    dS    = φ'(s) * (dO V_j^T - D) * r
    dQ   += c·scale dS K_j,   dK_j += c·scale dS^T Q

Tiles come from :class:`attn_jax.core.tiles.TileSchedule` (masks classified per tile, EMPTY
tiles skipped, FULL tiles without a predicate).  Products take the input dtype for bf16/fp16
operands with float32 accumulation, like :mod:`attn_jax.softmax.xla`.

Entropy-invariant length scaling ("Training-free Diffusion Model Adaptation for Variable-Sized
Text-to-Image Synthesis", Jin et al., 2023, arXiv:2306.08645; used by the softplus attention
of Gao & Spratling as a length-dependent scale): ``length_scale=base`` multiplies the logits by
``log(n) / log(base)`` with ``n = S`` the number of keys, so a model trained at length ``base``
sees the factor 1 there.  Every op of the family takes it.  Deviation to note: ``n`` is the static
key count ``S`` of the call, not each row's visible-key count (under a causal mask the latter
grows along the rows); a KV-cache decode therefore sees ``S = max_len``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attn_jax.core import layout as L
from attn_jax.core import tiles as TL
from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.masks import Mask, as_mask
from attn_jax.softmax.problem import AttentionProblem, attention_problem
from attn_jax.softmax import dense as _dense
from attn_jax.softmax.xla import default_block

__all__ = ["ScoreMap", "SIGMOID", "RELU", "SOFTPLUS", "NormaliserProblem", "normaliser_call", "logit_scale",
           "check_length_scale", "no_reasons", "dense_reasons", "whole_row_reasons", "refuse_whole_row", "visible_mask",
           "weighted_values", "scores_reference", "rowwise_reference", "rowwise_blockwise",
           "WHOLE_ROW_REASON"]

#: The reason the whole-row normalisers (entmax, sparsemax, clipped softmax) give for not running tiled.
WHOLE_ROW_REASON = ("the normaliser needs a row-global quantity (threshold or softmax normaliser) before any "
                    "weight is known; a blockwise threshold search over tiles is not implemented, so the call "
                    "materialises [B, H, T, S]")


@dataclass(frozen=True)
class ScoreMap:
    """An elementwise score map ``φ``, ``value_and_grad(s) -> (φ(s), φ'(s))`` (sharing the
    transcendentals: the backward recomputes both per tile) and whether the weights are
    l1-normalised over the row."""

    name: str
    fn: Callable
    value_and_grad: Callable
    l1: bool


def _sigmoid_vg(s):
    w = jax.nn.sigmoid(s)
    return w, w * (1.0 - w)


def _relu_vg(s):
    return jax.nn.relu(s), (s > 0).astype(s.dtype)


def _softplus(s):
    return jnp.maximum(s, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(s)))


def _softplus_vg(s):
    e = jnp.exp(-jnp.abs(s))                      # one exp for the value and the derivative sigmoid(s)
    r = 1.0 / (1.0 + e)
    return jnp.maximum(s, 0.0) + jnp.log1p(e), jnp.where(s >= 0, r, e * r)


SIGMOID = ScoreMap("sigmoid", jax.nn.sigmoid, _sigmoid_vg, l1=False)
RELU = ScoreMap("relu", jax.nn.relu, _relu_vg, l1=False)
SOFTPLUS = ScoreMap("softplus", _softplus, _softplus_vg, l1=True)


# ----------------------------------------------------------------------------- validation and dispatch


@dataclass(frozen=True)
class NormaliserProblem:
    """Static description of one normaliser call (what ``unsupported`` functions read)."""

    op: str
    base: AttentionProblem
    scale: float          # the effective logit scale (c · scale)
    params: tuple = ()    # op-specific static parameters, ((name, value), ...)

    @property
    def dims(self) -> V.AttentionDims:
        return self.base.dims

    @property
    def mask(self) -> Mask | None:
        return self.base.mask

    def param(self, name: str, default=None):
        return dict(self.params).get(name, default)


def check_length_scale(length_scale) -> None:
    """``length_scale``: None or a base ``> 1`` (the training length at which the factor is 1)."""
    if length_scale is None:
        return
    if isinstance(length_scale, bool) or not isinstance(length_scale, (int, float)):
        raise TypeError(f"length_scale: expected None or a number > 1 (the log base), got "
                        f"{type(length_scale).__name__}")
    if not length_scale > 1:
        raise ValueError(f"length_scale: expected a log base > 1, got {length_scale}")


def logit_scale(Dk: int, S: int, scale: float | None, length_scale: float | None) -> float:
    """``c · scale``: ``scale`` (default ``Dk ** -0.5``) times ``log(S) / log(length_scale)`` when given."""
    s = Dk ** -0.5 if scale is None else float(scale)
    if length_scale is not None:
        s *= math.log(S) / math.log(float(length_scale))
    return s


def normaliser_call(registry, op: str, q, k, v, mask, scale, length_scale, impl, params: dict, arrays=(),
                    run: bool = True, platform: str | None = None):
    """Validate, lay out and dispatch one normaliser call.

    ``arrays``: extra per-call arrays handed to the implementation after ``q, k, v`` (e.g. a
    learnable ``alpha``).  ``run=False`` returns the :class:`~attn_jax.core.dispatch.Decision`
    instead (for :func:`attn_jax.explain`).  Implementations are called as
    ``fn(problem, q, k, v, *arrays)`` and return ``o [B, T, H, Dv]``.
    """
    q, k, v, _, mask, _, layout = L.normalize_call(q, k, v, None, mask, None)
    base = attention_problem(q, k, v, mask, None, scale, None, None, 0.0, None, False)
    check_length_scale(length_scale)
    dims = base.dims
    p = NormaliserProblem(op, base, logit_scale(dims.Dk, dims.S, scale, length_scale), tuple(sorted(params.items())))
    if not run:
        return registry.explain(impl, p, platform)
    out = registry.call(impl, p, q, k, v, *arrays)
    return layout.unfold(out)


def no_reasons(platform, p) -> list[str]:
    """``unsupported`` of an implementation that serves every problem on every platform."""
    return []


def dense_reasons(platform, p) -> list[str]:
    """``unsupported`` of the ``dense`` form (the materialised reference chosen by ``auto``): as
    :func:`attn_jax.softmax.dense.unsupported` -- XLA:CPU only, and ``B*H*T*S`` within
    :data:`~attn_jax.softmax.dense.DENSE_BUDGET` (bounded extra memory; the tiled form above it)."""
    return _dense.unsupported(platform, p.base)


def whole_row_reasons(platform, p) -> list[str]:
    """``unsupported`` of the blockwise form of a whole-row normaliser: always this reason."""
    return [WHOLE_ROW_REASON]


def refuse_whole_row(p, *args):
    """The ``blockwise`` entry of a whole-row normaliser (never chosen: see :func:`whole_row_reasons`)."""
    raise ValueError(f"impl: {p.op} has no blockwise form: {WHOLE_ROW_REASON}")


# ----------------------------------------------------------------------------- references


def _compute_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def visible_mask(mask: Mask | None, B: int, H: int, T: int, S: int):
    """``bool [B, H, T, S]`` visibility (None without a mask)."""
    if mask is None:
        return None
    return jnp.broadcast_to(mask.materialize(T, S), (B, H, T, S))


def scores_reference(q, k, v, mask: Mask | None, scale: float):
    """Materialised logits ``s [B, H, T, S]`` (compute dtype), visibility and NaN-safe ``v``.

    Query rows and key/value columns that no visible pair uses are zeroed first, so NaN in
    padded positions cannot reach a product.  Returns ``(s, visible | None, v, G)``.
    """
    B, T, H, Dk = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    cdt = _compute_dtype(q.dtype)
    visible = visible_mask(mask, B, H, T, S)
    if visible is not None:
        q_used = visible.any(axis=3).transpose(0, 2, 1)[..., None]
        kv_used = visible.reshape(B, K, G, T, S).any(axis=(2, 3)).transpose(0, 2, 1)[..., None]
        q = jnp.where(q_used, q, 0)
        k = jnp.where(kv_used, k, 0)
        v = jnp.where(kv_used, v, 0)
    qf = q.astype(cdt).reshape(B, T, K, G, Dk)
    s = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(cdt), precision=lax.Precision.HIGHEST)
    return s.reshape(B, H, T, S) * scale, visible, v, G


def weighted_values(w, v, out_dtype):
    """``o [B, T, H, Dv] = Σ_j w [B, H, T, S] v_j`` with grouped heads (no K/V repeat)."""
    B, H, T, S = w.shape
    K, Dv = v.shape[2], v.shape[3]
    w = w.reshape(B, K, H // K, T, S)
    o = jnp.einsum("bkgts,bskd->btkgd", w, v.astype(w.dtype), precision=lax.Precision.HIGHEST)
    return o.reshape(B, T, H, Dv).astype(out_dtype)


def rowwise_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                      v: Float[ArrayLike, "B S K Dv"], *, score: ScoreMap, mask: Mask | None = None,
                      scale: float, offset: float = 0.0) -> Float[Array, "B T H Dv"]:
    """The materialised row-local normaliser (module docstring); ``scale`` is the effective logit
    scale.  Inputs are assumed validated."""
    s, visible, v, _ = scores_reference(q, k, v, mask, scale)
    w = score.fn(s + offset)
    if visible is not None:
        w = jnp.where(visible, w, 0.0)
    if score.l1:
        denom = w.sum(axis=-1, keepdims=True)
        w = w / jnp.where(denom > 0, denom, 1.0)
    return weighted_values(w, v, q.dtype)


# ----------------------------------------------------------------------------- the tiled form


@dataclass(frozen=True)
class _Cfg:
    t: TL.Tiling
    scale: float
    offset: float
    dtype: Any
    cdt: Any
    mdt: Any
    precision: Any


class _Kernel:
    def __init__(self, c: _Cfg, score: ScoreMap, mask):
        self.c, self.score = c, score
        self.schedule = TL.TileSchedule(c.t, mask)

    def scores(self, qb, kb, mask, qi, kj, partial):
        """Logits of one tile ``[B, K, G, bq, bk]`` and its visibility (None for a FULL tile)."""
        c, t = self.c, self.c.t
        vis = None
        if partial:
            qidx = qi * t.bq + jnp.arange(t.bq, dtype=jnp.int32)
            kidx = kj * t.bk + jnp.arange(t.bk, dtype=jnp.int32)
            vis = TL.tile_visibility(t, mask, qidx, kidx)
            qb = jnp.where(vis.any(axis=4)[..., None], qb, 0)
            kb = jnp.where(TL.tile_columns(vis), kb, 0)
        s = jnp.einsum("bkgqd,bskd->bkgqs", qb, kb, preferred_element_type=c.cdt, precision=c.precision)
        return s * c.scale + c.offset, vis, qb, kb

    def forward(self, q_l, k_l, v_l, mask):
        c, t, score = self.c, self.c.t, self.score
        dkinds = self.schedule.dynamic_kinds(mask)

        def q_block(_, xs):
            qi, qb = xs

            def tile(kj, kind, st):
                acc, l = st
                s, vis, _, _ = self.scores(qb, TL.kv_tile(k_l, kj), mask, qi, kj, kind == TL.PARTIAL)
                vb = TL.kv_tile(v_l, kj)
                w = score.fn(s)
                if vis is not None:
                    w = jnp.where(vis, w, 0.0)
                    vb = jnp.where(TL.tile_columns(vis), vb, 0)
                acc = acc + jnp.einsum("bkgqs,bskd->bkgqd", w.astype(c.mdt), vb.astype(c.mdt),
                                       preferred_element_type=c.cdt, precision=c.precision)
                if score.l1:
                    l = l + w.sum(axis=-1)
                return acc, l

            shape = (t.B, t.K, t.G, t.bq)
            acc0, l0 = jnp.zeros(shape + (t.Dv,), c.cdt), jnp.zeros(shape, c.cdt)
            acc, l = self.schedule.visit(dkinds, qi, tile, (acc0, l0))
            r = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0) if score.l1 else jnp.ones(shape, c.cdt)
            return None, (acc * r[..., None], r)

        _, (o_l, r_l) = lax.scan(q_block, None, (jnp.arange(t.nq, dtype=jnp.int32), q_l))
        return o_l, r_l

    def backward(self, q_l, k_l, v_l, mask, r_l, do_l, delta_l):
        c, t, score = self.c, self.c.t, self.score
        dkinds = self.schedule.dynamic_kinds(mask)

        def kv_block(dq_buf, kj):
            kb_full, vb_full = TL.kv_tile(k_l, kj), TL.kv_tile(v_l, kj)

            def tile(qi, kind, st):
                dk, dv, dq_buf = st
                dob = do_l[qi]
                s, vis, qb, kb = self.scores(q_l[qi], kb_full, mask, qi, kj, kind == TL.PARTIAL)
                vb = vb_full if vis is None else jnp.where(TL.tile_columns(vis), vb_full, 0)
                w, dphi = score.value_and_grad(s)
                dw = jnp.einsum("bkgqd,bskd->bkgqs", dob, vb, preferred_element_type=c.cdt, precision=c.precision)
                r = r_l[qi][..., None]
                ds = dphi * (dw - delta_l[qi][..., None]) * r
                wr = w * r
                if vis is not None:
                    wr = jnp.where(vis, wr, 0.0)
                    ds = jnp.where(vis, ds, 0.0)
                dv = dv + jnp.einsum("bkgqs,bkgqd->bskd", wr.astype(c.mdt), dob.astype(c.mdt),
                                     preferred_element_type=c.cdt, precision=c.precision)
                ds = (ds * c.scale).astype(c.mdt)
                dq_buf = dq_buf.at[qi].add(jnp.einsum("bkgqs,bskd->bkgqd", ds, kb.astype(c.mdt),
                                                      preferred_element_type=c.cdt, precision=c.precision))
                dk = dk + jnp.einsum("bkgqs,bkgqd->bskd", ds, qb.astype(c.mdt), preferred_element_type=c.cdt,
                                     precision=c.precision)
                return dk, dv, dq_buf

            dk0 = jnp.zeros((t.B, t.bk, t.K, t.Dk), c.cdt)
            dv0 = jnp.zeros((t.B, t.bk, t.K, t.Dv), c.cdt)
            dk, dv, dq_buf = self.schedule.visit(dkinds, kj, tile, (dk0, dv0, dq_buf), backward=True)
            return dq_buf, (dk, dv)

        dq_l, (dk_l, dv_l) = lax.scan(kv_block, jnp.zeros(q_l.shape, c.cdt), jnp.arange(t.nk, dtype=jnp.int32))
        return dq_l, dk_l, dv_l


def rowwise_blockwise(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                      v: Float[ArrayLike, "B S K Dv"], *, score: ScoreMap, mask: Mask | None = None,
                      scale: float, offset: float = 0.0, block_q: int | None = None,
                      block_k: int | None = None) -> Float[Array, "B T H Dv"]:
    """The tiled form of :func:`rowwise_reference` (same arguments plus block sizes; defaults
    follow :func:`attn_jax.softmax.xla.default_block`).  Inputs are assumed validated."""
    B, T, H, Dk = q.shape
    S, K, Dv = k.shape[1], k.shape[2], v.shape[3]
    mask = as_mask(mask)
    t = TL.tiling(B, T, S, H, K, Dk, Dv, default_block(T) if block_q is None else block_q,
                  default_block(S) if block_k is None else block_k)
    dtype = q.dtype
    cdt = _compute_dtype(dtype)
    mdt = dtype if dtype in (jnp.bfloat16, jnp.float16) else cdt
    c = _Cfg(t, float(scale), float(offset), dtype, cdt, mdt, lax.Precision.HIGHEST if mdt == cdt else None)
    kernel = _Kernel(c, score, mask)
    mask_in = jax.tree.leaves(mask)
    treedef = jax.tree.structure(mask)

    def run(q, k, v, leaves):
        m = jax.tree.unflatten(treedef, leaves)
        return kernel.forward(TL.layout_q(q, t), TL.layout_kv(k, t), TL.layout_kv(v, t), m)

    @jax.custom_vjp
    def core(q, k, v, leaves):
        o_l, _ = run(q, k, v, leaves)
        return TL.unlayout_q(o_l, t).astype(dtype)

    def core_fwd(q, k, v, leaves):
        o_l, r_l = run(q, k, v, leaves)
        return TL.unlayout_q(o_l, t).astype(dtype), (q, k, v, leaves, o_l, r_l)

    def core_bwd(res, do):
        q, k, v, leaves, o_l, r_l = res
        m = jax.tree.unflatten(treedef, leaves)
        do_l = TL.layout_q(do.astype(dtype), t)
        if score.l1:
            delta = (do_l.astype(cdt) * o_l).sum(axis=-1)
        else:
            delta = jnp.zeros(o_l.shape[:-1], cdt)
        dq_l, dk_l, dv_l = kernel.backward(TL.layout_q(q, t), TL.layout_kv(k, t), TL.layout_kv(v, t), m, r_l,
                                           do_l, delta)
        return (TL.unlayout_q(dq_l, t).astype(q.dtype), TL.unlayout_kv(dk_l, t).astype(k.dtype),
                TL.unlayout_kv(dv_l, t).astype(v.dtype), [None] * len(leaves))

    core.defvjp(core_fwd, core_bwd)
    return core(q, k, v, mask_in)
