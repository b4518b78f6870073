"""Cog attention: signed attention weights, ``sign(s) · softmax(|s|)``.

"More Expressive Attention with Negative Weights", Lv et al., 2024, arXiv:2411.07176: a head
may "delete, copy or retain" tokens by giving them negative, positive or near-zero weights.
The normaliser (as in the authors' code, github.com/trestad/CogAttn) is a softmax of the
absolute logits carrying the logits' signs::

    s_ij = scale · q_i · k_j
    w_ij = sign(s_ij) · exp(|s_ij|) / Σ_{j' visible} exp(|s_ij'|)
    o_i  = Σ_j w_ij v_j

so ``Σ_j |w_ij| = 1``.  Hidden keys get weight 0; a fully masked row gives 0.  This file holds the
materialised form only (a tiled form would run the online softmax of ``|s|`` with signed
weights; not implemented).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.dispatch import Registry, register_explainer
from attn_jax.variants import rowwise as RW

__all__ = ["cog_attention", "cog_attention_reference", "COG_ATTENTION"]

COG_ATTENTION = Registry("variants.cog_attention")
_KWARGS = ("mask", "scale", "length_scale", "impl")


def cog_attention_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                            v: Float[ArrayLike, "B S K Dv"], *, mask=None,
                            scale: float | None = None) -> Float[Array, "B T H Dv"]:
    """Materialised Cog attention (``scale`` the effective logit scale); inputs validated."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s, visible, v, _ = RW.scores_reference(q, k, v, mask, scale)
    a = jnp.abs(s)
    if visible is not None:
        a = jnp.where(visible, a, -jnp.inf)
    m = jnp.max(a, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(a - m)
    denom = e.sum(axis=-1, keepdims=True)
    w = jnp.sign(s) * e / jnp.where(denom > 0, denom, 1.0)
    return RW.weighted_values(w, v, q.dtype)


def cog_attention(q: Float[ArrayLike, "*batch T H Dk"], k: Float[ArrayLike, "*batch S K Dk"],
                  v: Float[ArrayLike, "*batch S K Dv"], *, mask=None, scale: float | None = None,
                  length_scale: float | None = None, impl="auto", **unexpected) -> Float[Array, "*batch T H Dv"]:
    """Cog attention (module docstring); arguments as :func:`attn_jax.variants.sigmoid_attention`
    (``impl``: ``"auto"`` / ``"reference"``)."""
    V.check_no_unexpected_kwargs("cog_attention", unexpected, _KWARGS)
    return RW.normaliser_call(COG_ATTENTION, "cog_attention", q, k, v, mask, scale, length_scale, impl, {})


def _reference(p, q, k, v):
    return cog_attention_reference(q, k, v, mask=p.mask, scale=p.scale)


def _tiled_reasons(platform, p) -> list[str]:
    return ["a tiled form (online softmax of |s| with signed weights) is not implemented; the call materialises "
            "[B, H, T, S]"]


def _explain(q, k, v, *, mask=None, scale=None, length_scale=None, impl="auto", platform=None):
    return RW.normaliser_call(COG_ATTENTION, "cog_attention", q, k, v, mask, scale, length_scale, impl, {},
                              run=False, platform=platform)


COG_ATTENTION.register("blockwise", RW.refuse_whole_row, _tiled_reasons)
COG_ATTENTION.register("reference", _reference, RW.no_reasons)
register_explainer(cog_attention, _explain)

# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="cog", family="variants", title="Cog attention (signed weights)",
    papers=(Paper("More Expressive Attention with Negative Weights", 2024, "2411.07176", "Lv et al."),),
    summary="w_ij = sign(s_ij) softmax_j(|s_ij|)", op=cog_attention, directions=("causal",),
    layer="attn_jax.nn.variant_mixers:cog_mixer", notes="materialised [B, H, T, S] (no tiled form yet)"))
