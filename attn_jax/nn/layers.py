"""Building blocks around the mixers: normalisation, feed-forward networks, embeddings.

* RMSNorm — "Root Mean Square Layer Normalization", Zhang & Sennrich, 2019,
  arXiv:1910.07467:  ``y = x / sqrt(mean(x^2) + eps) * g``  (no centring, no bias).
* LayerNorm — Ba, Kiros & Hinton, 2016, arXiv:1607.06450:
  ``y = (x - mean(x)) / sqrt(var(x) + eps) * g + b``.
* SwiGLU — "GLU Variants Improve Transformer", Shazeer, 2020, arXiv:2002.05202:
  ``FFN(x) = (Swish(x W_gate) * (x W_up)) W_down`` (no biases, as in the paper).
* GELU MLP — the Transformer FFN of Vaswani et al., 2017, arXiv:1706.03762 with the GELU of
  Hendrycks & Gimpel, 2016, arXiv:1606.08415:  ``FFN(x) = GELU(x W_1 + b_1) W_2 + b_2``.
* Token embedding with an optional tied read-out ``logits = h E^T`` (Press & Wolf, 2017,
  arXiv:1608.05859).

Every parameter is an ``nnx.Param`` carrying logical sharding axes (``out_sharding``
metadata, read by ``nnx.get_partition_spec``) — "embed", "mlp", "vocab", "heads",
"kv_heads", "head_dim" — so a sharding rule table (``nnx.logical_to_mesh`` over a mesh) can map them onto devices.
Parameters are stored in ``param_dtype`` (float32 by default); arithmetic runs in
``dtype`` (the compute dtype, e.g. bfloat16); statistics of norms are float32.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["param", "RMSNorm", "LayerNorm", "SwiGLU", "GeluMLP", "Embed", "make_norm", "make_mlp",
           "check_positive_int"]

default_kernel_init = nnx.initializers.lecun_normal()
default_embed_init = nnx.initializers.normal(stddev=0.02)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def default_head_dim(d_model: int, num_heads: int, head_dim: int | None) -> int | None:
    """Check ``d_model`` and ``num_heads`` (positive ints); ``head_dim`` if given (its own checks
    are the caller's), else ``d_model / num_heads``, which must divide."""
    check_positive_int("d_model", d_model)
    check_positive_int("num_heads", num_heads)
    if head_dim is not None:
        return head_dim
    if d_model % num_heads:
        raise ValueError(f"num_heads: {num_heads} heads do not divide d_model={d_model} (or pass head_dim explicitly)")
    return d_model // num_heads


def check_segment_ids(segment_ids, B: int, T: int, name: str = "segment_ids"):
    """``segment_ids`` as int32 ``[B, T]`` (None stays None); errors name ``name``."""
    if segment_ids is None:
        return None
    segment_ids = jnp.asarray(segment_ids)
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer array [B, T], got dtype {segment_ids.dtype}")
    if segment_ids.shape != (B, T):
        raise ValueError(f"{name}: expected shape [B, T]=({B}, {T}), got {segment_ids.shape}")
    return segment_ids.astype(jnp.int32)


def check_mixer_input(x, d_model: int, segment_ids=None):
    """The token-mixer protocol's input checks: ``x [B, T, d_model]`` and ``segment_ids [B, T]``;
    returns ``(B, T, segment_ids as int32 or None)``."""
    if getattr(x, "ndim", None) != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x: expected [B, T, d_model={d_model}], got shape {getattr(x, 'shape', None)}")
    B, T, _ = x.shape
    return B, T, check_segment_ids(segment_ids, B, T)


def param(rngs: nnx.Rngs | None, init, shape: Sequence[int], axes: Sequence[str | None], param_dtype=jnp.float32,
          *, in_axis=None, out_axis=None) -> nnx.Param:
    """An ``nnx.Param`` of ``shape`` drawn from ``init`` with logical sharding ``axes``.

    ``in_axis``/``out_axis`` are passed to variance-scaling initialisers so fan-in and
    fan-out are counted over the right dimensions of multi-axis kernels such as
    ``[d_model, heads, head_dim]``.
    """
    shape = tuple(int(s) for s in shape)
    if len(axes) != len(shape):
        raise ValueError(f"axes: expected {len(shape)} logical axis names for shape {shape}, got {tuple(axes)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    if in_axis is not None or out_axis is not None:
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                 in_axis=-2 if in_axis is None else in_axis,
                                                 out_axis=-1 if out_axis is None else out_axis)
    value = init(key, shape, param_dtype)
    # Logical names only: a mesh is applied later through sharding rules (no eager placement).
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x^2, -1) + eps) * scale`` over the last axis (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str | None = "embed", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.dim = check_positive_int("dim", dim)
        self.eps = float(eps)
        self.dtype = dtype
        self.scale = param(None, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(dtype)


class LayerNorm(nnx.Module):
    """``y = (x - mean) / sqrt(var + eps) * scale + bias`` over the last axis (Ba et al. 2016)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.dim = check_positive_int("dim", dim)
        self.eps = float(eps)
        self.dtype = dtype
        self.scale = param(None, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
        self.bias = param(None, nnx.initializers.zeros, (dim,), ("embed",), param_dtype) if use_bias else None

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


def make_norm(kind: str, dim: int, *, eps: float = 1e-6, dtype=None, param_dtype=jnp.float32, field: str = "norm"):
    if kind == "rms":
        return RMSNorm(dim, eps=eps, dtype=dtype, param_dtype=param_dtype)
    if kind == "layer":
        return LayerNorm(dim, eps=eps, dtype=dtype, param_dtype=param_dtype)
    raise ValueError(f"{field}: expected 'rms' or 'layer', got {kind!r}")


class SwiGLU(nnx.Module):
    """``(silu(x W_gate) * (x W_up)) W_down`` (Shazeer 2020); no biases."""

    def __init__(self, d_model: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_positive_int("d_model", d_model)
        check_positive_int("hidden", hidden)
        self.dtype = dtype
        self.w_gate = param(rngs, default_kernel_init, (d_model, hidden), ("embed", "mlp"), param_dtype)
        self.w_up = param(rngs, default_kernel_init, (d_model, hidden), ("embed", "mlp"), param_dtype)
        self.w_down = param(rngs, default_kernel_init, (hidden, d_model), ("mlp", "embed"), param_dtype)

    def __call__(self, x):
        x = x.astype(self.dtype)
        g = x @ self.w_gate[...].astype(self.dtype)
        u = x @ self.w_up[...].astype(self.dtype)
        return (jax.nn.silu(g) * u) @ self.w_down[...].astype(self.dtype)


class GeluMLP(nnx.Module):
    """``GELU(x W_1 + b_1) W_2 + b_2`` (Vaswani et al. 2017 with GELU, tanh approximation off)."""

    def __init__(self, d_model: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_positive_int("d_model", d_model)
        check_positive_int("hidden", hidden)
        self.dtype = dtype
        self.w_1 = param(rngs, default_kernel_init, (d_model, hidden), ("embed", "mlp"), param_dtype)
        self.b_1 = param(None, nnx.initializers.zeros, (hidden,), ("mlp",), param_dtype)
        self.w_2 = param(rngs, default_kernel_init, (hidden, d_model), ("mlp", "embed"), param_dtype)
        self.b_2 = param(None, nnx.initializers.zeros, (d_model,), ("embed",), param_dtype)

    def __call__(self, x):
        dt = self.dtype
        h = jax.nn.gelu(x.astype(dt) @ self.w_1[...].astype(dt) + self.b_1[...].astype(dt), approximate=False)
        return h @ self.w_2[...].astype(dt) + self.b_2[...].astype(dt)


def make_mlp(kind: str, d_model: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
             rngs: nnx.Rngs, field: str = "mlp"):
    if kind == "swiglu":
        return SwiGLU(d_model, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if kind == "gelu":
        return GeluMLP(d_model, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    raise ValueError(f"{field}: expected 'swiglu' or 'gelu', got {kind!r}")


class Embed(nnx.Module):
    """Token embedding ``E: [vocab, d_model]``; ``attend(h) = h E^T`` is the tied read-out."""

    def __init__(self, vocab_size: int, d_model: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.d_model = check_positive_int("d_model", d_model)
        self.dtype = dtype
        self.embedding = param(rngs, default_embed_init, (vocab_size, d_model), ("vocab", "embed"), param_dtype)

    def __call__(self, tokens):
        tokens = jnp.asarray(tokens)
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens: expected an integer array, got dtype {tokens.dtype}")
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, h):
        return h.astype(self.dtype) @ self.embedding[...].astype(self.dtype).T


def mixer_positions(positions, B: int, T: int, cache) -> jax.Array:
    """The absolute positions ``[B|1, T]`` (int) of a mixer call (:mod:`attn_jax.nn.protocol`):
    ``arange(T)`` without ``positions``, offset by ``cache.lengths`` with a cache; given
    ``positions`` ``[T]``, ``[1, T]`` or ``[B, T]`` are checked (integer dtype, shape)."""
    if positions is None:
        base = jnp.arange(T, dtype=jnp.int32)[None, :]
        return base if cache is None else cache.lengths[:, None] + base
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions: expected an integer array, got dtype {positions.dtype}")
    if positions.shape not in ((T,), (B, T), (1, T)):
        raise ValueError(f"positions: expected shape [T]=({T},) or [B, T]=({B}, {T}), got {positions.shape}")
    return positions if positions.ndim == 2 else positions[None, :]

