"""Typed layer components of the linear-attention mixers: small NNX modules owning their parameters.

Each module here is built from one spec of :mod:`attn_jax.core.recipe` (the data a mechanism
file declares) by :func:`build`; :class:`attn_jax.nn.linear_mixers.LinearAttentionMixer`
composes them in one skeleton.  Parameters are created through initializers given as
constructor arguments (``nnx`` initializers ``init(key, shape, dtype)``), with the defaults of
the papers / fla:

* projections and gate kernels: LeCun truncated normal over the fan-in (:func:`lecun_init`);
* Mamba's ``dt_bias``: ``softplus⁻¹(Δ)``, ``Δ ~ logU(1e-3, 0.1)`` floored at ``1e-4``
  (:func:`dt_bias_init`); ``A_log = log U(1, 16)`` (:func:`a_log_init`);
* Hedgehog's maps: identity weights, zero biases (the paper's initialisation);
* norm scales one, biases zero.

Every parameter carries logical sharding axes ("embed", "heads", "kv_heads", "head_dim").

Components (parameter names in brackets):

* decays (log forget gates ``log_g``): :class:`FixedDecay` (RetNet / Lightning, no parameters),
  :class:`LowRankGate` (GLA: ``[w_gate_a, w_gate_b, b_gate]``), :class:`DeltaGate` (Mamba-2's Δ:
  ``[w_dt, dt_bias, A_log]`` plus the ``D`` skip when it scales the values);
* :class:`WriteStrength` (the delta rule's ``β``: ``[w_beta]``);
* feature maps computed in the layer: :class:`RandomFeatureMap` (Performer: a non-trainable
  :class:`RandomFeatures` buffer ``projection`` and :meth:`~RandomFeatureMap.redraw`),
  :class:`DPFPMap`, :class:`HedgehogMap` (``[hh_wq, hh_bq, hh_wk, hh_bk]`` and
  :meth:`~HedgehogMap.distillation_loss`), :class:`CosformerMap`, :class:`LogNormalMap`;
* the op, one module per rule (no parameters): :class:`GatedOp`, :class:`NormalizedOp`,
  :class:`DeltaOp`, :class:`FlowOp`, :class:`EfficientOp`, :class:`AgentOp`;
* :class:`OutputGate` (``[w_g]``) and :class:`OutputNorm` (``[norm_scale, norm_bias]``);
* the short convolution is :class:`attn_jax.nn.short_conv.ShortConv`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn_jax.core import recipe
from attn_jax.linear.agent import agent_attention
from attn_jax.linear.common import expand_kv_heads
from attn_jax.linear.delta_rule import delta_rule, delta_rule_step, gated_delta_rule
from attn_jax.linear.efficient_attention import efficient_attention
from attn_jax.linear.feature_maps import (dpfp, hedgehog, hedgehog_distillation_loss, orthogonal_random_projection,
                                          performer_features, resolve_feature_map)
from attn_jax.linear.flowformer import flow_attention, flow_attention_step, init_flow_state
from attn_jax.linear.gated import gated_linear_attention, recurrent_step
from attn_jax.linear.gla import gla_log_gates
from attn_jax.linear.linear_attention import cosformer_features, linear_attention
from attn_jax.linear.log_normal import lln_moment_matching
from attn_jax.linear.ssd import ssd_log_decay
from attn_jax.nn import layers
from attn_jax.nn.layers import check_positive_int

__all__ = ["lecun_init", "dt_bias_init", "a_log_init", "eye_init", "float32_draw", "param", "RandomFeatures", "FixedDecay", "LowRankGate",
           "DeltaGate", "WriteStrength", "OutputGate", "OutputNorm", "RandomFeatureMap", "DPFPMap", "HedgehogMap",
           "CosformerMap", "LogNormalMap", "GatedOp", "NormalizedOp", "DeltaOp", "FlowOp", "EfficientOp", "AgentOp",
           "build"]

F32 = jnp.float32


# ----------------------------------------------------------------------------- initializers
def lecun_init(in_axis=0, out_axis=-1):
    """LeCun truncated normal (``variance_scaling(1, "fan_in", "truncated_normal")``) with the
    fan-in counted over ``in_axis`` (an int or a tuple of axes)."""
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


def dt_bias_init(key, shape, dtype=F32):
    """Mamba's ``dt_bias = softplus⁻¹(Δ)`` with ``Δ ~ logU(1e-3, 0.1)`` floored at ``1e-4``."""
    u = jax.random.uniform(key, shape, F32)
    dt = jnp.maximum(jnp.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)), 1e-4)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def a_log_init(key, shape, dtype=F32):
    """Mamba-2's ``A ~ U(1, 16)`` stored as ``log A``."""
    return jnp.log(1.0 + 15.0 * jax.random.uniform(key, shape, F32)).astype(dtype)


def eye_init(key, shape, dtype=F32):
    """The identity on the last two axes, broadcast over the leading ones (Hedgehog's maps)."""
    del key
    return jnp.broadcast_to(jnp.eye(shape[-2], shape[-1], dtype=dtype), shape)


def float32_draw(init):
    """``init`` drawing in float32 and casting to the requested dtype: a bfloat16 layer starts from
    the float32 layer's values, rounded (a draw in bfloat16 would give other values)."""
    return lambda key, shape, dtype=F32: init(key, shape, F32).astype(dtype)


def param(rngs, init, shape, axes, param_dtype=F32) -> nnx.Param:
    """:func:`attn_jax.nn.layers.param` with a float32 draw (:func:`float32_draw`)."""
    return layers.param(rngs, float32_draw(init), shape, axes, param_dtype)


class RandomFeatures(nnx.Variable):
    """A non-trainable buffer (Performer's random projection ``W: [m, Dk]``): not an
    ``nnx.Param``, so optimisers built over ``nnx.Param`` leave it alone (it is redrawn by
    :meth:`RandomFeatureMap.redraw`, never trained)."""


def _w(p, dtype):
    return p[...].astype(dtype)


# ----------------------------------------------------------------------------- decays: (log_g, Δ)
class FixedDecay(nnx.Module):
    """Fixed per-head decays ``λ_h``: ``log_g = log λ`` broadcast to ``[B, T, H]`` (no parameters)."""

    def __init__(self, spec: recipe.FixedDecay, num_heads: int):
        self.decays = tuple(float(a) for a in np.asarray(spec.decays(num_heads), np.float64))

    def __call__(self, x):
        B, T = x.shape[:2]
        return jnp.broadcast_to(jnp.log(jnp.asarray(self.decays, F32)), (B, T, len(self.decays))), None


class LowRankGate(nnx.Module):
    """GLA's gate: ``log_g = log_sigmoid(x W_1 W_2 + b) / τ``, ``[B, T, H, Dk]``."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rank: int = 16, temperature: float = 16.0,
                 dtype=F32, param_dtype=F32, kernel_init=None, bias_init=nnx.initializers.zeros, rngs: nnx.Rngs):
        self.rank, self.temperature, self.dtype = check_positive_int("rank", rank), float(temperature), dtype
        self.w_gate_a = param(rngs, kernel_init or lecun_init(0, 1), (d_model, rank), ("embed", None), param_dtype)
        self.w_gate_b = param(rngs, kernel_init or lecun_init(0, (1, 2)), (rank, num_heads, head_dim),
                              (None, "heads", "head_dim"), param_dtype)
        self.b_gate = param(rngs, bias_init, (num_heads, head_dim), ("heads", "head_dim"), param_dtype)

    def __call__(self, x):
        dt = self.dtype
        logits = jnp.einsum("btr,rhk->bthk", jnp.einsum("btd,dr->btr", x, _w(self.w_gate_a, dt)),
                            _w(self.w_gate_b, dt)) + _w(self.b_gate, dt)
        return gla_log_gates(logits, temperature=self.temperature), None


class DeltaGate(nnx.Module):
    """Mamba-2's decay ``log_g = −exp(A_log) Δ``, ``Δ = softplus(x W_Δ + dt_bias)`` per head;
    with ``scale_values`` the layer writes ``Δ v`` and adds the ``D`` skip (:meth:`skip`)."""

    def __init__(self, d_model: int, num_heads: int, *, scale_values: bool = False, dtype=F32, param_dtype=F32,
                 kernel_init=None, dt_bias_init=dt_bias_init, a_log_init=a_log_init,
                 skip_init=nnx.initializers.ones, rngs: nnx.Rngs):
        self.scale_values, self.dtype = bool(scale_values), dtype
        self.w_dt = param(rngs, kernel_init or lecun_init(0, 1), (d_model, num_heads), ("embed", "heads"),
                          param_dtype)
        self.dt_bias = param(rngs, dt_bias_init, (num_heads,), ("heads",), param_dtype)
        self.A_log = param(rngs, a_log_init, (num_heads,), ("heads",), param_dtype)
        self.D = param(rngs, skip_init, (num_heads,), ("heads",), param_dtype) if scale_values else None

    def __call__(self, x):
        dt_logits = jnp.einsum("btd,dh->bth", x, _w(self.w_dt, self.dtype))
        log_g = ssd_log_decay(dt_logits, self.A_log[...], dt_bias=self.dt_bias[...])
        delta = jax.nn.softplus(dt_logits.astype(F32) + self.dt_bias[...].astype(F32))
        return log_g, delta

    def scale(self, v, delta, num_heads: int):
        """``Δ v`` per query head (the kv heads expanded: Δ is per query head)."""
        return (expand_kv_heads(v, num_heads).astype(F32) * delta[..., None]).astype(v.dtype)

    def skip(self, o, v, num_heads: int):
        """``o + D v`` (Mamba-2's skip), ``v`` the un-scaled values."""
        return o + (self.D[...].astype(F32)[:, None] * expand_kv_heads(v, num_heads)).astype(o.dtype)


class WriteStrength(nnx.Module):
    """The delta rule's ``β = sigmoid(x W_β)``, float32 ``[B, T, H]``."""

    def __init__(self, d_model: int, num_heads: int, *, dtype=F32, param_dtype=F32, kernel_init=None,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.w_beta = param(rngs, kernel_init or lecun_init(0, 1), (d_model, num_heads), ("embed", "heads"),
                            param_dtype)

    def __call__(self, x):
        return jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x, _w(self.w_beta, self.dtype)).astype(F32))


# ----------------------------------------------------------------------------- output
class OutputGate(nnx.Module):
    """``g = act(x W_g)``, float32 ``[B, T, H, Dv]`` (``activation``: ``"swish"`` or ``"linear"``)."""

    def __init__(self, d_model: int, num_heads: int, value_head_dim: int, *, activation: str = "swish", dtype=F32,
                 param_dtype=F32, kernel_init=None, rngs: nnx.Rngs):
        recipe.OutputGate(activation)  # validates
        self.activation, self.dtype = activation, dtype
        self.w_g = param(rngs, kernel_init or lecun_init(0, (1, 2)), (d_model, num_heads, value_head_dim),
                         ("embed", "heads", "head_dim"), param_dtype)

    def __call__(self, x):
        g = jnp.einsum("btd,dhv->bthv", x, _w(self.w_g, self.dtype)).astype(F32)
        return jax.nn.silu(g) if self.activation == "swish" else g


class OutputNorm(nnx.Module):
    """Output normalisation of float32 ``o [B, T, H, Dv]`` combined with the gate ``g`` (or None):
    ``norm(o) ⊙ g``, or ``norm(o ⊙ g)`` when ``gated`` (see :class:`attn_jax.core.recipe.OutputNorm`)."""

    def __init__(self, num_heads: int, value_head_dim: int, *, kind: str, gated: bool = False, eps: float = 1e-5,
                 param_dtype=F32, scale_init=nnx.initializers.ones, bias_init=nnx.initializers.zeros):
        recipe.OutputNorm(kind, gated)  # validates
        self.kind, self.gated, self.eps = kind, bool(gated), float(eps)
        H, Dv = num_heads, value_head_dim
        scale_shape = {"group": (H, Dv), "rms_all": (H, Dv), "rms_head": (Dv,)}.get(kind)
        self.norm_scale = None if scale_shape is None else param(None, scale_init, scale_shape,
                                                                 ("heads", "head_dim")[-len(scale_shape):],
                                                                 param_dtype)
        self.norm_bias = param(None, bias_init, (H, Dv), ("heads", "head_dim"), param_dtype) if kind == "group" \
            else None

    def __call__(self, o, g=None):
        if self.gated and g is not None:
            o, g = o * g, None
        if self.kind == "group":
            mu = jnp.mean(o, -1, keepdims=True)
            var = jnp.mean(jnp.square(o - mu), -1, keepdims=True)
            o = (o - mu) * jax.lax.rsqrt(var + self.eps)
        else:
            axes = -1 if self.kind == "rms_head" else (-2, -1)
            o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=axes, keepdims=True) + self.eps)
        if self.norm_scale is not None:
            o = o * self.norm_scale[...].astype(F32)
        if self.norm_bias is not None:
            o = o + self.norm_bias[...].astype(F32)
        return o if g is None else o * g


# ----------------------------------------------------------------------------- feature maps: (φ(q), φ(k), v)
class RandomFeatureMap(nnx.Module):
    """Performer FAVOR+: ``φ(x) = exp(W x − |x|²/2) / √m`` on ``x = q Dk^{-1/4}``, ``k Dk^{-1/4}``,
    one projection ``W: [m, Dk]`` shared by the heads, a non-trainable :class:`RandomFeatures`
    buffer.  Query features are shifted by their per-token max (cancels in the ratio)."""

    uses_positions = False

    def __init__(self, head_dim: int, num_features: int, *, rngs: nnx.Rngs):
        self.head_dim, self.dim = head_dim, num_features
        self.projection = RandomFeatures(orthogonal_random_projection(rngs.params(), num_features, head_dim),
                                         out_sharding=(None, "head_dim"), eager_sharding=False)

    def redraw(self, key) -> None:
        """Draw a new random projection (the paper's feature redrawing)."""
        m, Dk = self.projection[...].shape
        self.projection[...] = orthogonal_random_projection(key, m, Dk)

    def __call__(self, q, k, v, positions=None):
        s = self.head_dim ** -0.25
        w = jax.lax.stop_gradient(self.projection[...].astype(F32))
        xq = q * s
        zq = jnp.einsum("bthd,md->bthm", xq, w) - 0.5 * jnp.sum(xq * xq, -1, keepdims=True)
        fq = jnp.exp(zq - jax.lax.stop_gradient(jnp.max(zq, -1, keepdims=True))) / math.sqrt(w.shape[0])
        return fq, performer_features(k * s, w), v


class DPFPMap(nnx.Module):
    """DPFP-ν on q and k (``D' = 2 Dk ν``)."""

    uses_positions = False

    def __init__(self, head_dim: int, nu: int = 1):
        if nu > 2 * head_dim - 1:
            raise ValueError(f"nu: at most 2 * head_dim - 1 = {2 * head_dim - 1}, got {nu}")
        self.nu, self.dim = nu, 2 * head_dim * nu

    def __call__(self, q, k, v, positions=None):
        return dpfp(q, nu=self.nu), dpfp(k, nu=self.nu), v


class HedgehogMap(nnx.Module):
    """Hedgehog's learned per-head maps ``φ(x) = [softmax(x W + b), softmax(−(x W + b))]`` (``D' = 2F``);
    keys are mapped per query head (GQA: k and v expanded first)."""

    uses_positions = False

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, *, param_dtype=F32, kernel_init=eye_init,
                 bias_init=nnx.initializers.zeros, rngs: nnx.Rngs):
        H, Dk, F = num_heads, head_dim, feature_dim
        self.num_heads, self.dim = H, 2 * F
        self.hh_wq = param(rngs, kernel_init, (H, Dk, F), ("heads", "head_dim", None), param_dtype)
        self.hh_bq = param(rngs, bias_init, (H, F), ("heads", None), param_dtype)
        self.hh_wk = param(rngs, kernel_init, (H, Dk, F), ("heads", "head_dim", None), param_dtype)
        self.hh_bk = param(rngs, bias_init, (H, F), ("heads", None), param_dtype)

    def __call__(self, q, k, v, positions=None):
        k, v = expand_kv_heads(k, self.num_heads), expand_kv_heads(v, self.num_heads)
        return (hedgehog(q, self.hh_wq[...], self.hh_bq[...]), hedgehog(k, self.hh_wk[...], self.hh_bk[...]), v)

    def distillation_loss(self, q, k, *, causal: bool, segment_ids=None):
        """:func:`~attn_jax.linear.feature_maps.hedgehog_distillation_loss` of this layer's maps."""
        return hedgehog_distillation_loss(q, k, self.hh_wq[...], self.hh_wk[...], self.hh_bq[...], self.hh_bk[...],
                                          causal=causal, segment_ids=segment_ids)


class CosformerMap(nnx.Module):
    """cosFormer: ``[relu(x) cos(πt/2M), relu(x) sin(πt/2M)]`` with ``t = clip(positions, 0, M − 1)``."""

    uses_positions = True

    def __init__(self, head_dim: int, max_len: int = 2048):
        self.max_len, self.dim = max_len, 2 * head_dim

    def _features(self, x, positions):
        return cosformer_features(x.astype(F32), jnp.clip(positions, 0, self.max_len - 1), self.max_len)

    def __call__(self, q, k, v, positions=None):
        return self._features(q, positions), self._features(k, positions), v


def _rms_normalise(x, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps)


class LogNormalMap(nnx.Module):
    """LLN on RMS-normalised q, k with the unit-variance moment match ``(α, β) = lln_moment_matching(1, 1)``:
    ``φ_q = exp(α q̂ − max)`` (the shift cancels in the ratio), ``φ_k = exp(β k̂)``."""

    uses_positions = False

    def __init__(self, head_dim: int):
        with jax.ensure_compile_time_eval():  # concrete even when the layer is built under a trace
            self.alpha, self.beta = (float(a) for a in lln_moment_matching(1.0, 1.0))
        self.dim = head_dim

    def __call__(self, q, k, v, positions=None):
        zq = self.alpha * _rms_normalise(q)
        fq = jnp.exp(zq - jax.lax.stop_gradient(jnp.max(zq, -1, keepdims=True)))
        return fq, jnp.exp(self.beta * _rms_normalise(k)), v


# ----------------------------------------------------------------------------- ops: (o, new_state)
class _Op(nnx.Module):
    """An op with the layer's static settings; ``state`` None = no cache (full forward)."""

    def __init__(self, name: str, *, scale: float, causal: bool, impl, chunk_size: int):
        self.name, self.scale, self.causal, self.impl, self.chunk_size = name, scale, causal, impl, chunk_size

    def init_state(self, batch: int, H: int, Dk: int, Dv: int):
        return jnp.zeros((batch, H, Dk, Dv), F32)

    def _kw(self, state, segment_ids, decode):
        return dict(scale=self.scale, initial_state=state, return_final_state=state is not None,
                    segment_ids=segment_ids, impl="recurrent" if decode else self.impl, chunk_size=self.chunk_size,
                    causal=self.causal)


def _masked_step(o_t, s, state, segment_ids):
    """A padding step neither writes nor decays, and outputs zero."""
    if segment_ids is not None:
        valid = segment_ids[:, 0] != 0
        s = jax.tree.map(lambda new, old: jnp.where(valid.reshape((-1,) + (1,) * (old.ndim - 1)), new, old), s, state)
        o_t = jnp.where(valid[:, None, None], o_t, 0.0)
    return o_t[:, None], s


class GatedOp(_Op):
    """:func:`~attn_jax.linear.gated.gated_linear_attention` (decode: :func:`~attn_jax.linear.gated.recurrent_step`)."""

    def __call__(self, q, k, v, log_g, beta, state, segment_ids, decode):
        if decode:
            g_t = None if log_g is None else log_g[:, 0]
            o_t, s = recurrent_step(q[:, 0], k[:, 0], v[:, 0], g_t, state, scale=self.scale)
            return _masked_step(o_t, s, state, segment_ids)
        return gated_linear_attention(q, k, v, log_g, mechanism=self.name, **self._kw(state, segment_ids, decode))


class DeltaOp(_Op):
    """The (gated) delta rule (decode: :func:`~attn_jax.linear.delta_rule.delta_rule_step`)."""

    def __call__(self, q, k, v, log_g, beta, state, segment_ids, decode):
        if decode:
            g_t = None if log_g is None else log_g[:, 0]
            o_t, s = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], state, log_g_t=g_t, scale=self.scale)
            return _masked_step(o_t, s, state, segment_ids)
        kw = self._kw(state, segment_ids, decode)
        if log_g is None:
            return delta_rule(q, k, v, beta, **kw)
        return gated_delta_rule(q, k, v, beta, log_g, **kw)


class NormalizedOp(_Op):
    """Normalised :func:`~attn_jax.linear.linear_attention.linear_attention` with feature map
    ``feature_map`` (decode: ``impl="recurrent"``, i.e. ``recurrent_step`` on ``[v, 1]``); the
    state ``[B, H, D', Dv + 1]`` carries the normaliser column."""

    def __init__(self, name: str, *, feature_map: str = "identity", **kw):
        super().__init__(name, **kw)
        self.feature_map = feature_map

    def feature_dim(self, head_dim: int) -> int:
        return jax.eval_shape(resolve_feature_map(self.feature_map),
                              jax.ShapeDtypeStruct((1, head_dim), F32)).shape[-1]

    def init_state(self, batch: int, H: int, Dk: int, Dv: int):
        return jnp.zeros((batch, H, Dk, Dv + 1), F32)

    def __call__(self, q, k, v, log_g, beta, state, segment_ids, decode):
        return linear_attention(q, k, v, feature_map=self.feature_map, **self._kw(state, segment_ids, decode))


class FlowOp(_Op):
    """Flowformer: the full op, a prefill from ``state`` or (decode) one :func:`flow_attention_step`."""

    def init_state(self, batch: int, H: int, Dk: int, Dv: int):
        return init_flow_state(batch, H, Dk, Dv)

    def __call__(self, q, k, v, log_g, beta, state, segment_ids, decode):
        if decode:
            o_t, s = flow_attention_step(q[:, 0], k[:, 0], v[:, 0], state)
            return _masked_step(o_t, s, state, segment_ids)
        return flow_attention(q, k, v, causal=self.causal, segment_ids=segment_ids, initial_state=state,
                              return_final_state=state is not None, impl=self.impl, chunk_size=self.chunk_size)


class EfficientOp(_Op):
    """Efficient Attention (non-causal only, no state)."""

    def __call__(self, q, k, v, log_g, beta, state, segment_ids, decode):
        return efficient_attention(q, k, v, causal=False, segment_ids=segment_ids, impl=self.impl), None


class AgentOp(_Op):
    """Agent attention (non-causal only, no state): ``num_agents`` agents per document, at most
    ``max_segments`` documents per packed row."""

    def __init__(self, name: str, *, num_agents: int = 16, max_segments: int = 8, **kw):
        super().__init__(name, **kw)
        self.num_agents, self.max_segments = num_agents, max_segments

    def __call__(self, q, k, v, log_g, beta, state, segment_ids, decode):
        return agent_attention(q, k, v, num_agents=self.num_agents, scale=self.scale, segment_ids=segment_ids,
                               max_segments=self.max_segments if segment_ids is not None else None,
                               impl=self.impl), None


# ----------------------------------------------------------------------------- specs -> modules
def build(spec, *, name: str, d_model: int, num_heads: int, head_dim: int, value_head_dim: int, options: dict,
          op_settings: dict, eps: float, dtype, param_dtype, inits: dict, rngs: nnx.Rngs):
    """The module of one component ``spec`` (:mod:`attn_jax.core.recipe`); ``options`` are the
    spec's constructor options (e.g. ``num_features``), already checked; ``inits`` the
    user's initializer overrides (keyword -> initializer) for this component."""
    d, H, Dk, Dv = d_model, num_heads, head_dim, value_head_dim
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if isinstance(spec, recipe.FixedDecay):
        return FixedDecay(spec, H)
    if isinstance(spec, recipe.LowRankGate):
        return LowRankGate(d, H, Dk, rank=spec.rank, temperature=spec.temperature, **common, **inits)
    if isinstance(spec, recipe.DeltaGate):
        return DeltaGate(d, H, scale_values=spec.scale_values, **common, **inits)
    if isinstance(spec, recipe.WriteStrength):
        return WriteStrength(d, H, **common, **inits)
    if isinstance(spec, recipe.OutputGate):
        return OutputGate(d, H, Dv, activation=spec.activation, **common, **inits)
    if isinstance(spec, recipe.OutputNorm):
        return OutputNorm(H, Dv, kind=spec.kind, gated=spec.gated, eps=eps, param_dtype=param_dtype, **inits)
    if isinstance(spec, recipe.RandomFeatureMap):
        return RandomFeatureMap(Dk, options.get("num_features") or 2 * Dk, rngs=rngs)
    if isinstance(spec, recipe.DPFPMap):
        return DPFPMap(Dk, options.get("nu", spec.nu))
    if isinstance(spec, recipe.HedgehogMap):
        return HedgehogMap(H, Dk, options.get("feature_dim") or Dk, param_dtype=param_dtype, rngs=rngs, **inits)
    if isinstance(spec, recipe.CosformerMap):
        return CosformerMap(Dk, options.get("max_len", spec.max_len))
    if isinstance(spec, recipe.LogNormalMap):
        return LogNormalMap(Dk)
    if isinstance(spec, recipe.GatedRule):
        return GatedOp(name, **op_settings)
    if isinstance(spec, recipe.NormalizedRule):
        return NormalizedOp(name, feature_map=spec.feature_map, **op_settings)
    if isinstance(spec, recipe.DeltaRule):
        return DeltaOp(name, **op_settings)
    if isinstance(spec, recipe.FlowRule):
        return FlowOp(name, **op_settings)
    if isinstance(spec, recipe.EfficientRule):
        return EfficientOp(name, **op_settings)
    if isinstance(spec, recipe.AgentRule):
        return AgentOp(name, num_agents=options.get("num_agents", spec.num_agents),
                       max_segments=options.get("max_segments", spec.max_segments), **op_settings)
    raise TypeError(f"spec: no component for {type(spec).__name__}")
