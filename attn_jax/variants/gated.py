"""Gated attention: a query-dependent, head-specific sigmoid gate on the attention output.

"Gated Attention for Large Language Models: Non-linearity, Sparsity, and Attention-Sink-Free",
Qiu et al., 2025, arXiv:2505.06708.  Of the gating positions the paper compares, the one it
recommends (G1) multiplies the output of scaled dot-product attention, before the output
projection, by a sigmoid gate computed from the same hidden state ``X`` the queries come from
(the layer input after pre-normalisation):

    Y  = SDPA(Q, K, V)                                    [B, T, H, Dv]
    Y' = Y ⊙ σ(X W_θ)                                     W_θ: [d, H] (headwise) or [d, H, Dv] (elementwise)
    O  = concat_h(Y'_h) W^O

The functional op takes the gate logits ``X W_θ`` (``[B, T, H]``: one gate per head,
"headwise"; ``[B, T, H, Dv]``: one per output channel, "elementwise") and computes

    o = attention(q, k, v, mask, bias, ...) ⊙ σ(gate_logits)

The gate is an epilogue on the output, so the fastest form is :func:`attn_jax.attention` itself
(every backend, mask, bias, sink and GQA layout; nothing ``T×S`` beyond what it materialises)
followed by the elementwise gate; XLA fuses the gate into the output.  The gate's gradient
flows through ``o`` only, so no custom VJP is needed.  Gate ≡ 1 (logits → +∞) is plain
attention; gate logits are query-side only, so a fully masked row stays zero.

The same epilogue (:func:`output_gate`) is the ``gate=`` option of
:class:`attn_jax.nn.MultiHeadAttention`; the ``"gated_attention"`` mixer is that layer with the
elementwise gate, the paper's best variant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike, Float
from attn_jax.core.declaration import Declaration, Paper, declare
from attn_jax.softmax.api import attention
from attn_jax.softmax.reference import attention_reference
from attn_jax.variants.dense_scores import check_inputs

__all__ = ["gated_attention", "gated_attention_reference", "output_gate"]


def _check_gate(gate_logits, out_shape):
    gate_logits = jnp.asarray(gate_logits)
    V.check_float_array("gate_logits", gate_logits)
    if gate_logits.shape == tuple(out_shape[:3]):
        return gate_logits[..., None]
    if gate_logits.shape != tuple(out_shape):
        raise ValueError(f"gate_logits: expected [B, T, H]={tuple(out_shape[:3])} (headwise) or "
                         f"[B, T, H, Dv]={tuple(out_shape)} (elementwise), got {tuple(gate_logits.shape)}")
    return gate_logits


def output_gate(o: Float[ArrayLike, "B T H Dv"], gate_logits) -> Float[Array, "B T H Dv"]:
    """``o ⊙ σ(gate_logits)`` in ``o``'s dtype; ``gate_logits``: ``[B, T, H]`` (one gate per head)
    or ``[B, T, H, Dv]`` (one per channel)."""
    return o * jax.nn.sigmoid(_check_gate(gate_logits, o.shape)).astype(o.dtype)


def gated_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                    v: Float[ArrayLike, "B S K Dv"], gate_logits, *, mask=None, bias=None,
                    scale: float | None = None, softcap: float | None = None,
                    sinks: Float[ArrayLike, " H"] | None = None, dropout_rate: float = 0.0, dropout_rng=None,
                    impl="auto") -> Float[Array, "B T H Dv"]:
    """Gated attention (module docstring): ``attention(q, k, v, ...) ⊙ σ(gate_logits)``.

    Args:
      q, k, v: ``[B, T, H, Dk]``, ``[B, S, K, Dk]``, ``[B, S, K, Dv]`` (``H % K == 0``).
      gate_logits: ``[B, T, H]`` (headwise) or ``[B, T, H, Dv]`` (elementwise), e.g. ``x W_θ``.
      mask, bias, scale, softcap, sinks, dropout_rate, dropout_rng, impl: as in
        :func:`attn_jax.attention`.

    Returns:
      ``o [B, T, H, Dv]`` in ``q``'s dtype.
    """
    dims = V.check_qkv(q, k, v)
    _check_gate(gate_logits, (dims.B, dims.T, dims.H, dims.Dv))   # before any work
    o = attention(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap, sinks=sinks,
                  dropout_rate=dropout_rate, dropout_rng=dropout_rng, impl=impl)
    return output_gate(o, gate_logits)


def gated_attention_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                              v: Float[ArrayLike, "B S K Dv"], gate_logits, *, mask=None, bias=None,
                              scale: float | None = None, softcap: float | None = None,
                              sinks: Float[ArrayLike, " H"] | None = None) -> Float[Array, "B T H Dv"]:
    """The materialised reference: the exact-attention reference, then the sigmoid gate."""
    dims, mask = check_inputs(q, k, v, mask)
    _check_gate(gate_logits, (dims.B, dims.T, dims.H, dims.Dv))
    o = attention_reference(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap, sinks=sinks)
    return output_gate(o, gate_logits)


DECLARATION = declare(Declaration(
    name="gated_attention", family="variants", title="Gated attention (sigmoid gate on the SDPA output, G1)",
    papers=(Paper("Gated Attention for Large Language Models: Non-linearity, Sparsity, and Attention-Sink-Free",
                  2025, "2505.06708", "Qiu et al."),),
    summary="o = SDPA(q, k, v) ⊙ σ(x W_θ), W_θ: [d, H] (headwise) or [d, H, Dv] (elementwise)",
    op=gated_attention, forms=("auto",), directions=("causal", "bidirectional"),
    layer="attn_jax.nn.variant_attention:gated_attention",
    notes="the op is aj.attention plus an elementwise epilogue (every backend); the layer is "
          "MultiHeadAttention(gate='elementwise' | 'headwise')"))
