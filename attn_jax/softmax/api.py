"""``attn_jax.attention``: validated, dispatched exact softmax attention.

The semantics are those of :mod:`attn_jax.softmax.reference`; every
implementation registered in :data:`ATTENTION` computes the same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.core import checks
from attn_jax.core import layout as L
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.bias import LowRankBias
from attn_jax.core import validation as V
from attn_jax.core.dispatch import Decision, Registry, explain_call, register_explainer
from attn_jax.softmax.problem import AttentionProblem, attention_problem

ATTENTION = Registry("attention")
#: ``o`` or ``(o, lse)``: ``o`` in the dtype of ``q``, ``lse`` float32.
AttentionOutput = Float[Array, "*batch T H Dv"] | tuple[Float[Array, "*batch T H Dv"], Float[Array, "*batch T H"]]


_ATTENTION_KWARGS = ("bias", "mask", "scale", "softcap", "sinks", "dropout_rate", "dropout_rng", "return_lse",
                     "impl")


def attention(q: Float[ArrayLike, "*batch T H Dk"], k: Float[ArrayLike, "*batch S K Dk"],
              v: Float[ArrayLike, "*batch S K Dv"], bias=None, mask=None, *, scale: float | None = None,
              softcap: float | None = None, sinks: Float[ArrayLike, " H"] | None = None, dropout_rate: float = 0.0,
              dropout_rng=None, return_lse: bool = False, impl="auto", **unexpected) -> AttentionOutput:
    """Exact softmax attention.

    Layout: **``[B, T, H, D]``** (sequence on axis 1, heads on axis 2), as ``jax.nn``
    and Flax.  ``bias`` and ``mask`` may be passed positionally in ``jax.nn``'s order
    ``(q, k, v, bias, mask)``; everything else is keyword-only.

    Args:
      q, k, v: ``[B, T, H, Dk]``, ``[B, S, K, Dk]``, ``[B, S, K, Dv]``; ``H % K == 0``
        (GQA/MQA by grouping).  float32, bfloat16 or float16.  Also accepted: rank 3
        ``[T, H, D]`` (no batch axis) and ``[batch..., T, H, D]`` (extra batch axes are
        folded into ``B`` and restored on the output); any array-like (NumPy included).
      bias: additive logits, a float array broadcastable to ``[B, H, T, S]`` (rank 3
        ``[H|1, T|1, S|1]`` or rank 4; ``[batch..., H, T, S]`` for extra batch axes) or
        a structured bias such as ``attn_jax.positional.ALiBi``, or a
        :class:`~attn_jax.core.bias.LowRankBias` (factors folded into q and k: no ``T x S`` bias).
      mask: an :mod:`attn_jax.masks` object (``causal()``, ``sliding_window(...)``,
        ``segments(...)``, combinations with ``&``/``|``; they see the folded ``B``) or
        an array broadcastable to ``[B, H, T, S]`` (rank 3 or 4, each axis its size or
        1), boolean or numeric: nonzero = attend.
      scale: logit scale, default ``Dk ** -0.5``.
      softcap: ``c`` in ``c * tanh(s / c)`` (applied before the bias).
      sinks: learned per-head sink logits ``[H]``, added to the softmax denominator.
      dropout_rate, dropout_rng: attention dropout with an explicit PRNG key.
      return_lse: also return the float32 log-sum-exp ``[B, T, H]``.
      impl: ``"auto"``, ``"reference"``, ``"xla"``, ``"pallas"``, ``"cudnn"`` or a
        sequence tried in order, decided by the lowering platform.

    Returns:
      ``o: [B, T, H, Dv]`` in the dtype of ``q`` (and ``lse: [B, T, H]`` when requested),
      with q's batch axes: ``[T, H, Dv]`` for rank-3 q, ``[batch..., T, H, Dv]`` for extra axes.
    """
    V.check_no_unexpected_kwargs("attention", unexpected, _ATTENTION_KWARGS)
    q, k, v, bias, scale = _fold_low_rank(q, k, v, bias, scale, softcap)
    q, k, v, bias, mask, sinks, layout = L.normalize_call(q, k, v, bias, mask, sinks)
    problem = attention_problem(q, k, v, mask, bias, scale, softcap, sinks, dropout_rate, dropout_rng, return_lse)
    checks.check_attention_inputs(q, k, v, problem.mask)   # NaN where the mask uses it; only under aj.checked
    out = ATTENTION.call(impl, problem, q, k, v, bias, sinks, dropout_rng)
    return jax.tree.map(layout.unfold, out)


def explain(*args, platform: str | None = None, **kwargs) -> Decision:
    """Which implementation an op would use on each platform, and why the others cannot.

    ``aj.explain(q, k, v, **kw)`` explains :func:`attention`; ``aj.explain(op, *args, **kw)``
    explains any op that dispatches through a registry (``decode_attention``,
    ``aj.linear.gla``, ``gated_linear_attention``, ``delta_rule``, ...; see
    :func:`attn_jax.core.dispatch.explainable_ops`).  Arrays may be ``jax.ShapeDtypeStruct``.
    ``platform``: one of ``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"`` (default: all).
    ``str()`` of the result is a report.
    """
    if args and callable(args[0]):
        return explain_call(args[0], *args[1:], platform=platform, **kwargs)
    return _explain_attention(*args, platform=platform, **kwargs)


def _explain_attention(q, k, v, *, mask=None, bias=None, scale=None, softcap=None, sinks=None, dropout_rate=0.0,
                       dropout_rng=None, return_lse=False, impl="auto", platform: str | None = None) -> Decision:
    if dropout_rate > 0 and dropout_rng is None:
        dropout_rng = jax.random.key(0)  # explain never draws; only the presence matters
    q, k, v, bias, scale = _fold_low_rank(q, k, v, bias, scale, softcap)
    q, k, v, bias, mask, sinks, _ = L.normalize_call(q, k, v, bias, mask, sinks)
    problem = attention_problem(q, k, v, mask, bias, scale, softcap, sinks, dropout_rate, dropout_rng, return_lse)
    return ATTENTION.explain(impl, problem, platform)


def _fold_low_rank(q, k, v, bias, scale, softcap):
    """A :class:`~attn_jax.core.bias.LowRankBias` becomes ``r`` extra q/k channels (FlashBias): every
    backend then serves it without a ``T x S`` bias; any other bias passes through."""
    if not isinstance(bias, LowRankBias):
        return q, k, v, bias, scale
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in (q, k, v, bias.u, bias.v)):   # aj.explain on shapes
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        q, k, v = jax.eval_shape(lambda *a: LowRankBias(*a[3:]).fold(*a[:3], scale, softcap)[:3],
                                 q, k, v, bias.u, bias.v)
        return q, k, v, None, scale
    q, k, v, scale = bias.fold(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale, softcap)
    return q, k, v, None, scale


def merge_attention(parts, *, return_lse: bool = False) -> AttentionOutput:
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
register_explainer(attention, _explain_attention)
