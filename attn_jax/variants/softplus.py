"""Softplus attention with l1 normalisation and the entropy-invariant length scale.

"Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models",
Gao & Spratling, 2025, arXiv:2501.13428: softmax is decomposed into a positive map and an l1
normalisation; the map becomes Softplus, and the logits get a length-dependent scale "based on
invariance entropy"::

    s_ij = c · scale · q_i · k_j,      c = log_base(n)  (length_scale=base; 1 when None)
    o_i  = Σ_j softplus(s_ij) v_j / Σ_j softplus(s_ij)      over the visible keys j

Deviations, named: the length factor is the family's ``length_scale`` option
(:mod:`attn_jax.variants.rowwise`: ``log(S) / log(base)`` with ``n = S``); the paper's exact
factor and its second stage (the re-weighting that sharpens the weights) could not be checked
against the paper's text here and are not implemented.  Row-local (the l1 sum is a running sum),
so ``impl="xla"`` runs tiled with no ``T x S`` array.  Fully masked rows give 0.
"""

from __future__ import annotations

from jaxtyping import Array, Float

from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.dispatch import Registry, register_explainer
from attn_jax.variants import rowwise as RW

__all__ = ["softplus_attention", "softplus_attention_reference", "SOFTPLUS_ATTENTION"]

SOFTPLUS_ATTENTION = Registry("variants.softplus_attention")
_KWARGS = ("mask", "scale", "length_scale", "impl")


def softplus_attention(q: Float[ArrayLike, "*batch T H Dk"], k: Float[ArrayLike, "*batch S K Dk"],
                       v: Float[ArrayLike, "*batch S K Dv"], *, mask=None, scale: float | None = None,
                       length_scale: float | None = None, impl="auto", **unexpected) -> Float[Array, "*batch T H Dv"]:
    """Softplus + l1 attention (module docstring); arguments as :func:`attn_jax.variants.sigmoid_attention`."""
    V.check_no_unexpected_kwargs("softplus_attention", unexpected, _KWARGS)
    return RW.normaliser_call(SOFTPLUS_ATTENTION, "softplus_attention", q, k, v, mask, scale, length_scale, impl, {})


def softplus_attention_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                                 v: Float[ArrayLike, "B S K Dv"], *, mask=None,
                                 scale: float | None = None) -> Float[Array, "B T H Dv"]:
    """Materialised softplus + l1 attention (``scale`` the effective logit scale); inputs validated."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return RW.rowwise_reference(q, k, v, score=RW.SOFTPLUS, mask=mask, scale=scale)


def _xla(p, q, k, v):
    return RW.rowwise_blockwise(q, k, v, score=RW.SOFTPLUS, mask=p.mask, scale=p.scale)


def _reference(p, q, k, v):
    return RW.rowwise_reference(q, k, v, score=RW.SOFTPLUS, mask=p.mask, scale=p.scale)


def _explain(q, k, v, *, mask=None, scale=None, length_scale=None, impl="auto", platform=None):
    return RW.normaliser_call(SOFTPLUS_ATTENTION, "softplus_attention", q, k, v, mask, scale, length_scale, impl, {},
                              run=False, platform=platform)


# Registration order is the "auto" order: the materialised form on CPU for small problems, else tiled.
SOFTPLUS_ATTENTION.register("dense", _reference, RW.dense_reasons)
SOFTPLUS_ATTENTION.register("xla", _xla, RW.no_reasons)
SOFTPLUS_ATTENTION.register("reference", _reference, RW.no_reasons, auto=False)
register_explainer(softplus_attention, _explain)

# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="softplus", family="variants", title="Softplus attention (l1-normalised, length scale)",
    papers=(Paper("Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models", 2025,
                  "2501.13428", "Gao & Spratling"),),
    summary="o_i = Σ_j softplus(c s_ij) v_j / Σ_j softplus(c s_ij),  c = log_base(n)", op=softplus_attention,
    forms=("dense", "xla"), directions=("causal",), layer="attn_jax.nn.variant_mixers:softplus_mixer",
    notes="tiled XLA form; the paper's re-weighting stage is not implemented"))
