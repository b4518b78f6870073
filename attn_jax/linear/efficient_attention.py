"""Efficient Attention (softmax-normalised factorised attention).

Shen, Zhang, Zhao, Yi & Li, "Efficient Attention: Attention with Linear Complexities", 2021
(WACV), arXiv:1812.01243 (the softmax-normalisation variant):

    E(Q, K, V) = ρ_q(Q) (ρ_k(K)ᵀ V)
    ρ_q(Q) = softmax over the feature axis of each query row
    ρ_k(K) = softmax over the positions of each key channel

computed as ``ρ_k(K)ᵀ V`` first (a ``[Dk, Dv]`` context per head: ``O(T D²)``, no ``T×T`` map).
It is the dot-product attention ``(ρ_q(Q) ρ_k(K)ᵀ) V`` with a factorised, doubly normalised
attention map (each row of that map sums to one).  The paper uses no temperature, neither do we.

Only the non-causal form is defined: ρ_k normalises over all positions, including future ones
(``causal=True`` raises).  GQA: ``ρ_k`` is computed per k/v head and shared by its query heads.
Packed sequences (``segment_ids: int [B, T]``, id 0 = padding, same document convention as
:mod:`attn_jax.linear.common`): the softmax over positions runs over the keys of each document
only (padding excluded), and each query sees only its own document's context; padding queries
output zero.  Computation in float32 (float64 stays float64), output in the dtype of ``q``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attn_jax.core.validation import check_qkv
from attn_jax.linear.common import expand_kv_heads, segment_layout, validate, zero_padding
from attn_jax.linear.gated import gated_linear_attention

__all__ = ["efficient_attention", "efficient_attention_reference"]


def _dt(x):
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _check(q, k, v, causal, segment_ids):
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    if causal:
        raise ValueError("causal: Efficient Attention normalises the keys with a softmax over all positions "
                         "(future ones included), so only causal=False is defined")
    dims = check_qkv(q, k, v)
    if segment_ids is not None:
        validate("efficient_attention", q, k, v, segment_ids=segment_ids, causal=False)
    return dims


def _key_softmax_per_document(k, lay):
    """Softmax over positions of each channel, within each document; padding -> 0.  k: [B, T, K, D]."""
    B, T = k.shape[:2]
    valid = lay.valid[:, :, None, None]
    k = jnp.where(valid, k, 0.0)                       # NaN in padding must not leak
    ids = (jnp.arange(B, dtype=jnp.int32)[:, None] * T + lay.doc).reshape(B * T)
    flat = k.reshape(B * T, *k.shape[2:])
    vflat = valid.reshape(B * T, 1, 1)
    mx = jax.ops.segment_max(jnp.where(vflat, flat, -jnp.inf), ids, num_segments=B * T)
    mx = jax.lax.stop_gradient(jnp.where(jnp.isfinite(mx), mx, 0.0))
    e = jnp.where(vflat, jnp.exp(flat - mx[ids]), 0.0)
    den = jax.ops.segment_sum(e, ids, num_segments=B * T)[ids]
    return (e / jnp.where(den == 0, 1.0, den)).reshape(k.shape)


def efficient_attention(q: Float[Array, "B T H Dk"], k: Float[Array, "B S K Dk"], v: Float[Array, "B S K Dv"], *,
                        causal: bool = False, segment_ids: Int[Array, "B T"] | None = None, impl="auto"):
    """``ρ_q(Q) (ρ_k(K)ᵀ V)`` (arXiv:1812.01243); non-causal.  ``S != T`` allowed without segments.

    ``impl`` is passed to the linear-attention engine when ``segment_ids`` are given (the
    document-restricted context sum); without segments the op is two einsums.
    """
    _check(q, k, v, causal, segment_ids)
    dt = _dt(q)
    H = q.shape[2]
    q, k, v = zero_padding(segment_ids, q, k, v)   # before the softmaxes: NaN padding reaches no gradient
    rq = jax.nn.softmax(q.astype(dt), axis=-1)
    if segment_ids is None:
        rk = jax.nn.softmax(k.astype(dt), axis=1)
        ctx = jnp.einsum("bskd,bskv->bkdv", rk, v.astype(dt))                    # [B, K, Dk, Dv]
        ctx = jnp.repeat(ctx, H // k.shape[2], axis=1)
        return jnp.einsum("bthd,bhdv->bthv", rq, ctx).astype(q.dtype)
    lay = segment_layout(segment_ids, q.shape[0], q.shape[1])
    rq = jnp.where(lay.valid[:, :, None, None], rq, 0.0)      # NaN padding must not reach any gradient
    rk = _key_softmax_per_document(k.astype(dt), lay)
    o, _ = gated_linear_attention(rq, rk, v.astype(dt), None, scale=1.0, causal=False, segment_ids=segment_ids,
                                  impl=impl, mechanism="efficient_attention")
    return o.astype(q.dtype)


def efficient_attention_reference(q, k, v, *, causal: bool = False, segment_ids=None):
    """The attention-matrix form ``(ρ_q(Q) ρ_k(K)ᵀ) V``, with ``ρ_k`` recomputed densely for each query.

    For query ``i`` the keys it may see (its document, no padding) are softmax-normalised over
    positions per channel, then ``A_ij = ρ_q(q_i)·ρ_k^{(i)}(k_j)`` and ``o_i = Σ_j A_ij v_j``.
    """
    _check(q, k, v, causal, segment_ids)
    dt = _dt(q)
    q, k, v = zero_padding(segment_ids, q, k, v)   # before the softmaxes: NaN padding reaches no gradient
    B, T, H = q.shape[:3]
    S = k.shape[1]
    kk = expand_kv_heads(k.astype(dt), H)
    vv = expand_kv_heads(v.astype(dt), H)
    if segment_ids is None:
        vis = jnp.ones((B, T, S), bool)
        qvalid = jnp.ones((B, T), bool)
    else:
        lay = segment_layout(segment_ids, B, T)
        vis = (lay.doc[:, :, None] == lay.doc[:, None, :]) & lay.valid[:, None, :]
        qvalid = lay.valid
        kk = jnp.where(lay.valid[:, :, None, None], kk, 0.0)
        vv = jnp.where(lay.valid[:, :, None, None], vv, 0.0)
    # ρ_k^{(i)}: [B, i, j, H, D] softmax over j restricted to vis[b, i, :]
    logits = jnp.where(vis[..., None, None], kk[:, None], -jnp.inf)
    rk = jax.nn.softmax(logits, axis=2)
    rk = jnp.where(vis[..., None, None], rk, 0.0)
    rq = jax.nn.softmax(q.astype(dt), axis=-1)
    a = jnp.einsum("bihd,bijhd->bhij", rq, rk)
    o = jnp.einsum("bhij,bjhv->bihv", a, vv)
    return jnp.where(qvalid[:, :, None, None], o, 0.0).astype(q.dtype)


# ----------------------------------------------------------------------------- declaration
from attn_jax.core import recipe  # noqa: E402
from attn_jax.core.declaration import Declaration, Paper, Parity, declare  # noqa: E402
from attn_jax.linear.parity import first  # noqa: E402


def _parity(impl, x, *, causal=False, segment_ids=None, initial_state=None):
    if impl == "reference":
        return first(efficient_attention_reference(x["q"], x["k"], x["v"], segment_ids=segment_ids))
    return first(efficient_attention(x["q"], x["k"], x["v"], segment_ids=segment_ids, impl=impl))


DECLARATION = declare(Declaration(
    name="efficient", family="linear", title="Efficient Attention (softmax over features / positions)",
    papers=(Paper("Efficient Attention: Attention with Linear Complexities", 2021, "1812.01243", "Shen et al."),),
    summary="o = ρ_q(q) (ρ_k(k)ᵀ v): ρ_q a softmax over each query's features, ρ_k a softmax over the positions "
            "of each key channel (within each document)",
    op=efficient_attention, forms=("chunk",), directions=("bidirectional",),
    parity=Parity(_parity, initial_state=False),
    layer=recipe.LinearLayer(recipe.EfficientRule(),
                             recipe.Projections(qk_activation="identity", v_activation="identity", scale="one")),
    notes="encoder-only (non-causal); no temperature"))
