"""``attn_jax.attention``: validated, dispatched exact softmax attention.

The semantics are those of :mod:`attn_jax.softmax.reference`; every
implementation registered in :data:`ATTENTION` computes the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.core import validation as V
from attn_jax.core.bias import StructuredBias
from attn_jax.core.dispatch import Decision, Registry
from attn_jax.core.masks import Mask, as_mask

ATTENTION = Registry("attention")


@dataclass(frozen=True)
class AttentionProblem:
    """Static description of one attention call; what ``unsupported`` functions inspect."""

    dims: V.AttentionDims
    dtype: Any
    mask: Mask | None
    bias: Any            # None, an array [B|1, H|1, T, S] or a StructuredBias
    scale: float | None
    softcap: float | None
    has_sinks: bool
    dropout_rate: float
    return_lse: bool

    @property
    def bias_kind(self) -> str:
        if self.bias is None:
            return "none"
        return "structured" if isinstance(self.bias, StructuredBias) else "dense"


def _validate(q, k, v, mask, bias, scale, softcap, sinks, dropout_rate, dropout_rng, return_lse) -> AttentionProblem:
    dims = V.check_qkv(q, k, v)
    mask = as_mask(mask)
    if mask is not None:
        mask.check(dims.B, dims.H, dims.T, dims.S)
    if bias is not None and not isinstance(bias, StructuredBias):
        V.check_float_array("bias", bias)
        V.check_broadcastable("bias", bias, (dims.B, dims.H, dims.T, dims.S), "[B|1, H|1, T, S]")
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


def attention(q: Float[Array, "B T H Dk"], k: Float[Array, "B S K Dk"], v: Float[Array, "B S K Dv"], *,
              mask=None, bias=None, scale: float | None = None, softcap: float | None = None,
              sinks: Float[Array, "H"] | None = None, dropout_rate: float = 0.0, dropout_rng=None,
              return_lse: bool = False, impl="auto"):
    """Exact softmax attention.

    Args:
      q, k, v: ``[B, T, H, Dk]``, ``[B, S, K, Dk]``, ``[B, S, K, Dv]``; ``H % K == 0``
        (GQA/MQA by grouping).  float32, bfloat16 or float16.
      mask: an :mod:`attn_jax.masks` object (``causal()``, ``sliding_window(...)``,
        ``segments(...)``, combinations with ``&``/``|``) or a boolean array
        ``[B|1, H|1, T, S]``; True = attend.
      bias: additive logits, a float array broadcastable to ``[B, H, T, S]`` or a
        structured bias such as ``attn_jax.positional.ALiBi``.
      scale: logit scale, default ``Dk ** -0.5``.
      softcap: ``c`` in ``c * tanh(s / c)`` (applied before the bias).
      sinks: learned per-head sink logits ``[H]``, added to the softmax denominator.
      dropout_rate, dropout_rng: attention dropout with an explicit PRNG key.
      return_lse: also return the float32 log-sum-exp ``[B, T, H]``.
      impl: ``"auto"``, ``"reference"``, ``"xla"``, ``"pallas"``, ``"cudnn"`` or a
        sequence tried in order, decided by the lowering platform.

    Returns:
      ``o: [B, T, H, Dv]`` in the dtype of ``q`` (and ``lse`` when requested).
    """
    problem = _validate(q, k, v, mask, bias, scale, softcap, sinks, dropout_rate, dropout_rng, return_lse)
    bias_arr = bias if (bias is None or isinstance(bias, StructuredBias)) else jnp.asarray(bias)

    return ATTENTION.call(impl, problem, q, k, v, bias_arr, sinks, dropout_rng)


def explain(q, k, v, *, mask=None, bias=None, scale=None, softcap=None, sinks=None, dropout_rate=0.0,
            dropout_rng=None, return_lse=False, impl="auto", platform: str | None = None) -> Decision:
    """Which implementation ``attention`` would use on each platform, and why the others cannot.

    ``q, k, v`` may be arrays or ``jax.ShapeDtypeStruct``.  ``str()`` of the result is a report.
    """
    if dropout_rate > 0 and dropout_rng is None:
        dropout_rng = jax.random.key(0)  # explain never draws; only the presence matters
    problem = _validate(q, k, v, mask, bias, scale, softcap, sinks, dropout_rate, dropout_rng, return_lse)
    return ATTENTION.explain(impl, problem, platform)


def merge_attention(parts, *, return_lse: bool = False):
    """Exactly combine attentions over disjoint key sets from their outputs and LSEs.

    ``parts``: a sequence of ``(o [B, T, H, Dv], lse [B, T, H])``.  A part whose lse
    is ``-inf`` (no visible key) contributes nothing; if all are, the output is zero.
    """
    if len(parts) == 0:
        raise ValueError("parts: expected at least one (o, lse) pair, got none")
    os_, lses = zip(*parts)
    for i, (o, lse) in enumerate(parts):
        if o.shape[:3] != os_[0].shape[:3] or o.shape != os_[0].shape:
            raise ValueError(f"parts[{i}][0]: expected shape {os_[0].shape}, got {o.shape}")
        if lse.shape != o.shape[:3]:
            raise ValueError(f"parts[{i}][1]: expected lse shape {o.shape[:3]} ([B, T, H]), got {lse.shape}")
    lse = jnp.stack([l.astype(jnp.float32) for l in lses])                   # [P, B, T, H]
    m = jax.lax.stop_gradient(jnp.max(lse, axis=0))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m)                                                      # 0 for -inf parts
    total = w.sum(axis=0)
    safe = jnp.where(total > 0, total, 1.0)
    o = sum(wi[..., None] * oi.astype(jnp.float32) for wi, oi in zip(w / safe, os_)).astype(os_[0].dtype)
    if not return_lse:
        return o
    return o, jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)


# ----------------------------------------------------------------------------- registration
# Registration order is the "auto" priority order.
from attn_jax.softmax import cudnn as _cudnn  # noqa: E402
from attn_jax.softmax import dense as _dense  # noqa: E402
from attn_jax.softmax import pallas as _pallas  # noqa: E402
from attn_jax.softmax import xla as _xla  # noqa: E402
from attn_jax.softmax.reference import attention_reference as _attention_reference  # noqa: E402


def _reference_impl(p: AttentionProblem, q, k, v, bias, sinks, dropout_rng):
    return _attention_reference(q, k, v, mask=p.mask, bias=bias, scale=p.scale, softcap=p.softcap, sinks=sinks,
                                dropout_rate=p.dropout_rate, dropout_rng=dropout_rng, return_lse=p.return_lse)


def _reference_unsupported(platform, p):
    return []


ATTENTION.register("pallas", _pallas.attention_pallas, _pallas.unsupported)
ATTENTION.register("cudnn", _cudnn.attention_cudnn, _cudnn.unsupported)
# One dense block on CPU while B*H*T*S is within a fixed budget (bounded memory), else tiled.
ATTENTION.register("dense", _dense.attention_dense_impl, _dense.unsupported)
ATTENTION.register("xla", _xla.attention_xla, _xla.unsupported)
# The reference materialises T x S: never chosen by "auto", only when asked for by name.
ATTENTION.register("reference", _reference_impl, _reference_unsupported, auto=False)
