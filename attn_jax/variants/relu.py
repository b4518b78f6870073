"""ReLA: rectified linear attention, ReLU scores with a normalised (optionally gated) output.

"Sparse Attention with Linear Units", Zhang, Titov & Sennrich, 2021, arXiv:2104.07012: the
softmax is replaced with a ReLU, so a query may attend to nothing (a head "switches off" when
every visible score is ``<= 0``), and training is stabilised by a normalisation of the output
with a gain, optionally gated::

    a_ij = relu(scale · q_i · k_j)                          over the visible keys j
    u_i  = Σ_j a_ij v_j
    o_i  = RMSNorm(u_i) ⊙ g_h ⊙ σ_i                         RMSNorm(u) = u / sqrt(mean(u²) + eps)

per head ``h`` over the value dimension: ``g`` the learned gain (``gain [H|1, Dv]``, default 1)
and ``σ_i`` the optional gate (``gate``, e.g. ``sigmoid(x_i W_g)`` computed by the layer:
the "gating function" variant).  ``output_norm=None`` returns ``u`` (the raw ReLU attention).
Deviation: the paper's "specialized initialization" of the gain is not reproduced (gain init 1).
The ReLU part is row-local: ``impl="xla"`` runs it tiled (no ``T x S`` array); the norm and
gate act on the ``[B, T, H, Dv]`` output.  A fully masked row gives 0 (RMSNorm(0) = 0).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.dispatch import Registry, register_explainer
from attn_jax.variants import rowwise as RW

__all__ = ["relu_attention", "relu_attention_reference", "rela_output", "RELU_ATTENTION"]

RELU_ATTENTION = Registry("variants.relu_attention")
_KWARGS = ("mask", "scale", "length_scale", "output_norm", "gain", "gate", "eps", "impl")


def rela_output(u: Float[Array, "B T H Dv"], *, gain: Float[ArrayLike, "H Dv"] | None = None,
                gate: Float[ArrayLike, "B T H Dv"] | None = None, eps: float = 1e-6) -> Float[Array, "B T H Dv"]:
    """``RMSNorm(u) ⊙ gain ⊙ gate`` over the last axis (float32 math, ``u``'s dtype out)."""
    uf = u.astype(jnp.float32)
    y = uf * jnp.reciprocal(jnp.sqrt(jnp.mean(uf * uf, axis=-1, keepdims=True) + eps))
    if gain is not None:
        y = y * jnp.asarray(gain).astype(jnp.float32)
    if gate is not None:
        y = y * jnp.asarray(gate).astype(jnp.float32)
    return y.astype(u.dtype)


def _check_output_args(output_norm, gain, gate, eps, H: int, Dv: int, lead: tuple):
    if output_norm not in ("rms", None):
        raise ValueError(f"output_norm: expected 'rms' or None, got {output_norm!r}")
    if output_norm is None and (gain is not None or gate is not None):
        raise ValueError("gain/gate: they act on the normalised output; pass output_norm='rms'")
    if gain is not None:
        V.check_float_array("gain", gain)
        V.check_broadcastable("gain", gain, (H, Dv), "[H|1, Dv|1]")
    if gate is not None:
        V.check_float_array("gate", gate)
        V.check_broadcastable("gate", gate, lead + (H, Dv), "[B|1, T|1, H|1, Dv|1] (q's batch axes)")
    V.check_positive_scalar("eps", eps, allow_none=False)


def relu_attention(q: Float[ArrayLike, "*batch T H Dk"], k: Float[ArrayLike, "*batch S K Dk"],
                   v: Float[ArrayLike, "*batch S K Dv"], *, mask=None, scale: float | None = None,
                   length_scale: float | None = None, output_norm: str | None = "rms",
                   gain: Float[ArrayLike, "H Dv"] | None = None, gate: Float[ArrayLike, "*batch T H Dv"] | None = None,
                   eps: float = 1e-6, impl="auto", **unexpected) -> Float[Array, "*batch T H Dv"]:
    """ReLA (module docstring); layouts, masks and GQA as :func:`attn_jax.attention`.

    Args:
      q, k, v, mask, scale, length_scale, impl: as :func:`attn_jax.variants.sigmoid_attention`.
      output_norm: ``"rms"`` (default) or None (raw ``Σ relu(s) v``).
      gain: ``[H|1, Dv|1]`` RMSNorm gain; gate: ``[*batch, T, H, Dv]`` (broadcastable) multiplier.
      eps: RMSNorm epsilon.
    Returns:
      ``o [*batch, T, H, Dv]`` in q's dtype.
    """
    V.check_no_unexpected_kwargs("relu_attention", unexpected, _KWARGS)
    qs = jnp.shape(q)
    _check_output_args(output_norm, gain, gate, eps, qs[-2], jnp.shape(v)[-1], tuple(qs[:-2]))
    u = RW.normaliser_call(RELU_ATTENTION, "relu_attention", q, k, v, mask, scale, length_scale, impl, {})
    return u if output_norm is None else rela_output(u, gain=gain, gate=gate, eps=eps)


def relu_attention_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                             v: Float[ArrayLike, "B S K Dv"], *, mask=None,
                             scale: float | None = None) -> Float[Array, "B T H Dv"]:
    """Materialised ``Σ_j relu(scale q·k_j) v_j`` (no output norm); inputs validated."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return RW.rowwise_reference(q, k, v, score=RW.RELU, mask=mask, scale=scale)


def _xla(p, q, k, v):
    return RW.rowwise_blockwise(q, k, v, score=RW.RELU, mask=p.mask, scale=p.scale)


def _reference(p, q, k, v):
    return RW.rowwise_reference(q, k, v, score=RW.RELU, mask=p.mask, scale=p.scale)


def _explain(q, k, v, *, mask=None, scale=None, length_scale=None, impl="auto", platform=None, **_output_args):
    return RW.normaliser_call(RELU_ATTENTION, "relu_attention", q, k, v, mask, scale, length_scale, impl, {},
                              run=False, platform=platform)


# Registration order is the "auto" order: the materialised form on CPU for small problems, else tiled.
RELU_ATTENTION.register("dense", _reference, RW.dense_reasons)
RELU_ATTENTION.register("xla", _xla, RW.no_reasons)
RELU_ATTENTION.register("reference", _reference, RW.no_reasons, auto=False)
register_explainer(relu_attention, _explain)

# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="rela", family="variants", title="ReLA: ReLU attention with RMSNorm / gated output",
    papers=(Paper("Sparse Attention with Linear Units", 2021, "2104.07012", "Zhang et al."),),
    summary="o_i = RMSNorm(Σ_j relu(scale q_i·k_j) v_j) ⊙ g [⊙ sigmoid(x_i W_g)]", op=relu_attention,
    forms=("dense", "xla"), directions=("causal",), layer="attn_jax.nn.variant_mixers:relu_mixer",
    notes="tiled XLA form for the ReLU part; gain init 1 (the paper's special initialisation is not reproduced)"))
