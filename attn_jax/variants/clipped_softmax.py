"""Clipped softmax: a stretched, clipped softmax whose weights can reach exactly 0 and 1.

"Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing",
Bondarenko, Nagel & Blankevoort, 2023, arXiv:2306.12929::

    p_ij = softmax_j(scale · q_i · k_j)                     over the visible keys j
    w_ij = clip((ζ - γ) p_ij + γ, 0, 1),   γ ≤ 0, ζ ≥ 1
    o_i  = Σ_j w_ij v_j

so a head can give a key exactly zero weight ("do nothing") without driving its logits to
extremes.  ``γ = 0, ζ = 1`` is plain softmax.  Hidden keys get weight 0 and a fully masked row
gives 0.  The clip needs the row's softmax normaliser first, so the op runs materialised
(``[B, H, T, S]``); :func:`attn_jax.explain` says so.  (A tiled form would need two passes: the
row log-sum-exp, then the clipped weights.)
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.dispatch import Registry, register_explainer
from attn_jax.variants import rowwise as RW

__all__ = ["clipped_softmax", "clipped_softmax_reference", "CLIPPED_SOFTMAX"]

CLIPPED_SOFTMAX = Registry("variants.clipped_softmax")
_KWARGS = ("mask", "scale", "gamma", "zeta", "length_scale", "impl")


def _masked_softmax(s, visible):
    if visible is not None:
        s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    denom = e.sum(axis=-1, keepdims=True)
    return e / jnp.where(denom > 0, denom, 1.0)


def clipped_softmax_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                              v: Float[ArrayLike, "B S K Dv"], *, mask=None, scale: float | None = None,
                              gamma: float = 0.0, zeta: float = 1.0) -> Float[Array, "B T H Dv"]:
    """Materialised clipped-softmax attention (``scale`` the effective logit scale); inputs validated."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s, visible, v, _ = RW.scores_reference(q, k, v, mask, scale)
    w = jnp.clip((zeta - gamma) * _masked_softmax(s, visible) + gamma, 0.0, 1.0)
    if visible is not None:
        w = jnp.where(visible, w, 0.0)
    return RW.weighted_values(w, v, q.dtype)


def _check(gamma, zeta):
    for name, x in (("gamma", gamma), ("zeta", zeta)):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{name}: expected a Python float, got {type(x).__name__}")
    if gamma > 0:
        raise ValueError(f"gamma: expected gamma <= 0 (the lower stretch), got {gamma}")
    if zeta < 1:
        raise ValueError(f"zeta: expected zeta >= 1 (the upper stretch), got {zeta}")


def clipped_softmax(q: Float[ArrayLike, "*batch T H Dk"], k: Float[ArrayLike, "*batch S K Dk"],
                    v: Float[ArrayLike, "*batch S K Dv"], *, mask=None, scale: float | None = None,
                    gamma: float = 0.0, zeta: float = 1.0, length_scale: float | None = None, impl="auto",
                    **unexpected) -> Float[Array, "*batch T H Dv"]:
    """Clipped-softmax attention (module docstring): ``gamma <= 0``, ``zeta >= 1``; other arguments as
    :func:`attn_jax.variants.sigmoid_attention` (``impl``: ``"auto"`` / ``"reference"``)."""
    V.check_no_unexpected_kwargs("clipped_softmax", unexpected, _KWARGS)
    _check(gamma, zeta)
    return RW.normaliser_call(CLIPPED_SOFTMAX, "clipped_softmax", q, k, v, mask, scale, length_scale, impl,
                              {"gamma": float(gamma), "zeta": float(zeta)})


def _reference(p, q, k, v):
    return clipped_softmax_reference(q, k, v, mask=p.mask, scale=p.scale, gamma=p.param("gamma"),
                                     zeta=p.param("zeta"))


def _explain(q, k, v, *, mask=None, scale=None, gamma=0.0, zeta=1.0, length_scale=None, impl="auto", platform=None):
    return RW.normaliser_call(CLIPPED_SOFTMAX, "clipped_softmax", q, k, v, mask, scale, length_scale, impl,
                              {"gamma": gamma, "zeta": zeta}, run=False, platform=platform)


CLIPPED_SOFTMAX.register("blockwise", RW.refuse_whole_row, RW.whole_row_reasons)
CLIPPED_SOFTMAX.register("reference", _reference, RW.no_reasons)
register_explainer(clipped_softmax, _explain)

# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="clipped_softmax", family="variants", title="Clipped softmax (exact zeros, no-op heads)",
    papers=(Paper("Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing", 2023,
                  "2306.12929", "Bondarenko et al."),),
    summary="w = clip((ζ - γ) softmax(s) + γ, 0, 1)", op=clipped_softmax, directions=("causal",),
    layer="attn_jax.nn.variant_mixers:clipped_softmax_mixer",
    notes="needs the row normaliser before the clip: materialised [B, H, T, S]"))
