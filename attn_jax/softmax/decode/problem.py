"""The validated, static description of a decode call (what the DECODE / PAGED registries inspect)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from attn_jax.core import masks
from attn_jax.core import validation as V
from attn_jax.core.bias import StructuredBias

__all__ = ["DecodeProblem", "decode_problem", "resolve_method"]


@dataclass(frozen=True)
class DecodeProblem:
    """Static description of a :func:`decode_attention` call (what ``unsupported`` inspects)."""

    dims: V.AttentionDims
    dtype: Any
    num_splits: int | None
    window: int | None
    mask: masks.Mask | None
    bias_kind: str              # "none" | "dense" | "structured"
    scale: float | None
    softcap: float | None
    has_sinks: bool
    dropout_rate: float
    return_lse: bool
    attention_impl: Any         # passed to attn_jax.attention as its impl
    causal: bool = True


def _bias_kind(bias) -> str:
    return "none" if bias is None else ("structured" if isinstance(bias, StructuredBias) else "dense")


def _check_window(window):
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window: expected an int >= 0 (keys p - window .. p are visible), got {window!r}")
    return window


def _check_splits(num_splits, S):
    if num_splits is None:
        return None
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits: expected an int >= 1, got {num_splits!r}")
    return num_splits


def decode_problem(q, k, v, lengths, offset, *, num_splits, window, mask, bias, scale, softcap, sinks, dropout_rate,
                   dropout_rng, return_lse, attention_impl, causal=True):
    """Validate a decode call at trace time; returns ``(DecodeProblem, lengths int32[B], offset int32[B])``."""
    dims = V.check_qkv(q, k, v)
    lengths = V.int_rows("lengths", lengths, dims.B)
    offset = lengths - dims.T if offset is None else V.int_rows("offset", offset, dims.B)
    mask = masks.as_mask(mask)
    if mask is not None:
        mask.check(dims.B, dims.H, dims.T, dims.S)
    V.check_dropout(dropout_rate, dropout_rng)
    V.check_sinks(sinks, dims.H)
    if bias is not None and not isinstance(bias, StructuredBias):
        V.check_float_array("bias", bias)
        V.check_broadcastable("bias", bias, (dims.B, dims.H, dims.T, dims.S), "[B|1, H|1, T, S]")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    p = DecodeProblem(dims, q.dtype, _check_splits(num_splits, dims.S), _check_window(window), mask, _bias_kind(bias),
                      scale, softcap, sinks is not None, float(dropout_rate), return_lse, attention_impl,
                      bool(causal))
    return p, lengths, offset


def resolve_method(fn: str, impl, method):
    """``impl`` chooses the decode strategy; ``method=`` is its deprecated old name."""
    if method is None:
        return impl
    if impl != "auto":
        raise ValueError(f"{fn}: got both impl={impl!r} and the deprecated method={method!r}; pass impl= only "
                         "(the implementation of attn_jax.attention inside it is attention_impl=)")
    warnings.warn(f"{fn}(method=...) is deprecated: pass impl= (and attention_impl= for the attention "
                  "implementation inside it)", DeprecationWarning, stacklevel=3)
    return method
