"""The validated, static description of one exact-attention call.

:func:`attention_problem` checks the arguments of :func:`attn_jax.attention` at trace time and
returns an :class:`AttentionProblem`; the public entry point and every implementation
(``reference``, ``xla``, ``pallas``, ``cudnn``) import this module, never each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from attn_jax.core import validation as V
from attn_jax.core.bias import StructuredBias, is_query_dependent
from attn_jax.core.masks import Mask, as_mask

__all__ = ["AttentionProblem", "attention_problem"]


@dataclass(frozen=True)
class AttentionProblem:
    """Static description of one attention call; what ``unsupported`` functions inspect."""

    dims: V.AttentionDims
    dtype: Any
    mask: Mask | None
    bias: Any            # None, an array [B|1, H|1, T, S], a StructuredBias or a QueryDependentBias
    scale: float | None
    softcap: float | None
    has_sinks: bool
    dropout_rate: float
    return_lse: bool

    @property
    def bias_kind(self) -> str:
        if self.bias is None:
            return "none"
        if is_query_dependent(self.bias):
            return "query"        # QueryDependentBias: tile_q(q, ...), e.g. relative embeddings
        return "structured" if isinstance(self.bias, StructuredBias) else "dense"


def attention_problem(q, k, v, mask, bias, scale, softcap, sinks, dropout_rate, dropout_rng,
                      return_lse) -> AttentionProblem:
    """Validate the arguments of :func:`attn_jax.attention` at trace time (errors name the
    argument) and return the static problem record every implementation reads."""
    dims = V.check_qkv(q, k, v)
    mask = as_mask(mask)
    if mask is not None:
        mask.check(dims.B, dims.H, dims.T, dims.S)
    if bias is not None and not isinstance(bias, StructuredBias):
        if getattr(bias, "dtype", None) == jnp.bool_:
            raise TypeError("bias: got a boolean array; bias holds additive float logits, boolean masks go to mask=")
        V.check_float_array("bias", bias)
        V.check_broadcastable("bias", bias, (dims.B, dims.H, dims.T, dims.S),
                              "[B|1, H|1, T|1, S|1] (rank 3 [H|1, T|1, S|1] and [batch..., H|1, T|1, S|1] are folded "
                              "to it)")
    if isinstance(bias, StructuredBias) and bias.num_heads not in (None, dims.H):
        raise ValueError(f"bias: structured bias is defined for {bias.num_heads} heads, q has H={dims.H}")
    V.check_positive_scalar("scale", scale)
    V.check_positive_scalar("softcap", softcap)
    V.check_dropout(dropout_rate, dropout_rng)
    V.check_sinks(sinks, dims.H)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    return AttentionProblem(dims, q.dtype, mask, bias, scale, softcap, sinks is not None, float(dropout_rate),
                            return_lse)
