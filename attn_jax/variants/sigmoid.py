"""Sigmoid attention: an elementwise sigmoid in place of the softmax, without row normalisation.

"Theory, Analysis, and Best Practices for Sigmoid Self-Attention", Ramapuram et al., 2024,
arXiv:2409.04431 (used in "When Attention Sink Emerges in Language Models: An Empirical View",
Gu et al., 2024, arXiv:2410.10781, as "sigmoid attention without normalization")::

    o_i = Σ_j sigmoid(scale · q_i · k_j + b) v_j          over the visible keys j

with the bias ``b = -log n`` the paper recommends (``n`` the sequence length; here ``n = S``, the
number of keys of the call, the default ``b="-log n"``) or any float.  No row-global quantity is
needed, so ``impl="xla"`` (``"auto"``'s choice except for small problems on CPU, which get the
materialised ``"dense"`` form within a fixed budget, as :mod:`attn_jax.softmax.dense`) runs it tiled (:func:`attn_jax.variants.rowwise.rowwise_blockwise`, no
``T x S`` array).  Fully masked rows give 0.  ``length_scale`` as in
:mod:`attn_jax.variants.rowwise`.
"""

from __future__ import annotations

import math

import numpy as np
from jaxtyping import Array, Float

from attn_jax.core.array_types import ArrayLike
from attn_jax.core.dispatch import Registry, register_explainer
from attn_jax.core import validation as V
from attn_jax.variants import rowwise as RW

__all__ = ["sigmoid_attention", "sigmoid_attention_reference", "SIGMOID_ATTENTION"]

SIGMOID_ATTENTION = Registry("variants.sigmoid_attention")
_KWARGS = ("mask", "scale", "b", "length_scale", "impl")


def _offset(b, S: int) -> float:
    if isinstance(b, str):
        if b != "-log n":
            raise ValueError(f"b: expected a float or '-log n', got {b!r}")
        return -math.log(S)
    if isinstance(b, bool) or not isinstance(b, (int, float)):
        raise TypeError(f"b: expected a float or '-log n', got {type(b).__name__}")
    return float(b)


def sigmoid_attention(q: Float[ArrayLike, "*batch T H Dk"], k: Float[ArrayLike, "*batch S K Dk"],
                      v: Float[ArrayLike, "*batch S K Dv"], *, mask=None, scale: float | None = None,
                      b: float | str = "-log n", length_scale: float | None = None, impl="auto",
                      **unexpected) -> Float[Array, "*batch T H Dv"]:
    """Sigmoid attention (module docstring); layouts, masks and GQA as :func:`attn_jax.attention`.

    Args:
      q, k, v: ``[B, T, H, Dk]``, ``[B, S, K, Dk]``, ``[B, S, K, Dv]`` (``H % K == 0``).
      mask: an :mod:`attn_jax.masks` object or a boolean array broadcastable to ``[B, H, T, S]``.
      scale: logit scale, default ``Dk ** -0.5``.
      b: the logit bias: a float, or ``"-log n"`` (default) for ``-log(S)``.
      length_scale: entropy-invariant factor ``log_base(S)`` on the logits (None: off).
      impl: ``"auto"`` (``"dense"`` on XLA:CPU while ``B*H*T*S`` is within the dense budget,
        else ``"xla"``), ``"xla"`` (tiled), ``"dense"`` / ``"reference"`` (materialised).
    Returns:
      ``o [B, T, H, Dv]`` in q's dtype.
    """
    V.check_no_unexpected_kwargs("sigmoid_attention", unexpected, _KWARGS)
    S = np.shape(k)[-3] if np.ndim(k) >= 3 else 1
    return RW.normaliser_call(SIGMOID_ATTENTION, "sigmoid_attention", q, k, v, mask, scale, length_scale, impl,
                              {"b": _offset(b, S)})


def sigmoid_attention_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                                v: Float[ArrayLike, "B S K Dv"], *, mask=None, scale: float | None = None,
                                b: float = 0.0) -> Float[Array, "B T H Dv"]:
    """Materialised sigmoid attention (``b`` a float, ``scale`` default ``Dk ** -0.5``); inputs validated."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return RW.rowwise_reference(q, k, v, score=RW.SIGMOID, mask=mask, scale=scale, offset=b)


def _xla(p, q, k, v):
    return RW.rowwise_blockwise(q, k, v, score=RW.SIGMOID, mask=p.mask, scale=p.scale, offset=p.param("b"))


def _reference(p, q, k, v):
    return RW.rowwise_reference(q, k, v, score=RW.SIGMOID, mask=p.mask, scale=p.scale, offset=p.param("b"))


def _explain(q, k, v, *, mask=None, scale=None, b="-log n", length_scale=None, impl="auto", platform=None):
    return RW.normaliser_call(SIGMOID_ATTENTION, "sigmoid_attention", q, k, v, mask, scale, length_scale, impl,
                              {"b": _offset(b, np.shape(k)[-3])}, run=False, platform=platform)


# Registration order is the "auto" order: the materialised form on CPU for small problems, else tiled.
SIGMOID_ATTENTION.register("dense", _reference, RW.dense_reasons)
SIGMOID_ATTENTION.register("xla", _xla, RW.no_reasons)
SIGMOID_ATTENTION.register("reference", _reference, RW.no_reasons, auto=False)
register_explainer(sigmoid_attention, _explain)

# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="sigmoid", family="variants", title="Sigmoid attention (no normalisation, b = -log n)",
    papers=(Paper("Theory, Analysis, and Best Practices for Sigmoid Self-Attention", 2024, "2409.04431",
                  "Ramapuram et al."),
            Paper("When Attention Sink Emerges in Language Models: An Empirical View", 2024, "2410.10781",
                  "Gu et al.")),
    summary="o_i = Σ_j sigmoid(scale q_i·k_j + b) v_j,  b = -log n", op=sigmoid_attention, forms=("dense", "xla"),
    directions=("causal",), layer="attn_jax.nn.variant_mixers:sigmoid_mixer",
    notes="tiled XLA form (no T x S array); explain: aj.explain(aj.variants.sigmoid_attention, q, k, v)"))
