"""Short causal depthwise convolution over time (the "short conv" of modern linear-attention layers).

A width-``w`` depthwise 1-D convolution along the sequence, applied to q/k/v (or Mamba's
``x, B, C``) right after their projections, optionally followed by SiLU:

    y_t = act( sum_{i=0}^{w-1} W[i] ⊙ x_{t-(w-1)+i} + b )          (W[w-1] weighs the current token)

as in H3 (Fu et al., 2022, arXiv:2212.14052), Mamba (Gu & Dao, 2023, arXiv:2312.00752; ``w = 4``),
Mamba-2 (arXiv:2405.21060), and fla's ``ShortConvolution`` used by GLA / DeltaNet / Gated
DeltaNet.  ``W: [w, *F]`` (one filter per channel, no channel mixing), default ``w = 4``.

Packed sequences (``segment_ids: int [B, T]``, 0 = padding) follow the convention of
:mod:`attn_jax.linear.common`: padding tokens are *transparent* — they are skipped (the filter
runs over the valid tokens of the row, in order) and output zero — and a token never sees
inputs of an earlier document (the window is zero-filled at a document start).  Equivalently,
the convolution runs over each document alone, compacted.

Decode cache: ``conv_state [B, w-1, *F]`` holds the last ``w - 1`` *valid* inputs of each row
(oldest first; zeros before the start).  ``causal_conv1d(x, W, conv_state=s)`` continues from
``s`` (which belongs to the first document of the row) and returns the new state: the last
``w - 1`` valid inputs of the row's last document (zero-filled), so rows of a ragged,
right-padded prefill each keep their own history.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from attn_jax.linear.common import segment_layout
from attn_jax.nn.layers import check_positive_int, param

__all__ = ["ShortConv", "causal_conv1d", "causal_conv1d_reference", "ACTIVATIONS"]

ACTIVATIONS = (None, "silu")


def _check(x, weight, bias, segment_ids, conv_state, activation):
    if getattr(x, "ndim", 0) < 3:
        raise ValueError(f"x: expected [B, T, *features], got shape {getattr(x, 'shape', None)}")
    B, T, F = x.shape[0], x.shape[1], tuple(x.shape[2:])
    if weight.ndim != 1 + len(F) or tuple(weight.shape[1:]) != F or weight.shape[0] < 1:
        raise ValueError(f"weight: expected shape [w, *features] = [w, {', '.join(map(str, F))}], "
                         f"got {list(weight.shape)}")
    if bias is not None and tuple(bias.shape) != F:
        raise ValueError(f"bias: expected shape {list(F)}, got {list(bias.shape)}")
    if segment_ids is not None:
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids: expected an integer array, got dtype {segment_ids.dtype}")
        if segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids: expected shape [B, T] = {[B, T]}, got {list(segment_ids.shape)}")
    w = weight.shape[0]
    if conv_state is not None and tuple(conv_state.shape) != (B, w - 1, *F):
        raise ValueError(f"conv_state: expected shape [B, w-1, *features] = {[B, w - 1, *F]}, "
                         f"got {list(conv_state.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return B, T, F, w


def _act(y, activation):
    return jax.nn.silu(y) if activation == "silu" else y


def _gather_time(x, idx):
    """``x [B, L, *F]``, ``idx int [B, M]`` -> ``[B, M, *F]``."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


@functools.partial(jax.jit, static_argnames=("activation",))
def causal_conv1d(x, weight, *, bias=None, segment_ids=None, conv_state=None, activation=None):
    """``y, new_conv_state = causal_conv1d(x, weight)`` (see the module docstring).

    ``x: [B, T, *F]``, ``weight: [w, *F]``, ``bias: [*F]`` or None, ``segment_ids: int [B, T]``
    (0 = padding), ``conv_state: [B, w-1, *F]`` or None (zeros).  ``activation``: None or
    ``"silu"``.  Accumulates in float32; ``y`` in x's dtype, ``new_conv_state`` in
    ``conv_state``'s dtype (x's dtype when None).
    """
    B, T, F, w = _check(x, weight, bias, segment_ids, conv_state, activation)
    state_dtype = x.dtype if conv_state is None else conv_state.dtype
    f32 = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    xf = x.astype(f32)
    prev = jnp.zeros((B, w - 1, *F), f32) if conv_state is None else conv_state.astype(f32)
    idx_t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
        xc, docc = xf, jnp.zeros((B, T), jnp.int32)
        valid = jnp.ones((B, T), bool)
        n_valid = jnp.full((B,), T, jnp.int32)
        last_doc = jnp.zeros((B,), jnp.int32)
    else:
        lay = segment_layout(segment_ids, B, T)
        valid = lay.valid
        # compact each row: its valid tokens first, in order (padding is skipped, not convolved)
        order = jnp.argsort(jnp.where(valid, idx_t, T + idx_t), axis=1).astype(jnp.int32)
        n_valid = jnp.sum(valid, axis=1).astype(jnp.int32)
        keep = idx_t < n_valid[:, None]
        xc = _gather_time(xf, order)
        xc = jnp.where(keep.reshape(B, T, *([1] * len(F))), xc, 0.0)
        docc = jnp.where(keep, jnp.take_along_axis(lay.doc, order, axis=1), -1)
        last_doc = lay.doc[:, -1]
    full = jnp.concatenate([prev, xc], axis=1)                                        # [B, w-1+T, *F]
    doc_full = jnp.concatenate([jnp.zeros((B, w - 1), jnp.int32), docc], axis=1)     # the state is doc 0's
    wf = weight.astype(f32)
    y = jnp.zeros((B, T, *F), f32)
    bshape = (B, T) + (1,) * len(F)
    for i in range(w):  # w is small (4): w shifted multiply-adds
        same = (doc_full[:, i:i + T] == docc).reshape(bshape)
        y = y + jnp.where(same, full[:, i:i + T] * wf[i], 0.0)
    if bias is not None:
        y = y + bias.astype(f32)
    y = _act(y, activation)
    if segment_ids is not None:
        rank = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
        y = _gather_time(y, rank)                                                      # back to row order
        y = jnp.where(valid.reshape(bshape), y, 0.0)
    # new state: the last w-1 valid inputs of the row's last document
    sidx = n_valid[:, None] + jnp.arange(w - 1, dtype=jnp.int32)[None, :]             # [B, w-1] into `full`
    new_state = _gather_time(full, sidx)
    same_doc = (jnp.take_along_axis(doc_full, sidx, axis=1) == last_doc[:, None]).reshape((B, w - 1) + (1,) * len(F))
    new_state = jnp.where(same_doc, new_state, 0.0)
    return y.astype(x.dtype), new_state.astype(state_dtype)


@functools.partial(jax.jit, static_argnames=("activation",))
def causal_conv1d_reference(x, weight, *, bias=None, segment_ids=None, conv_state=None, activation=None):
    """The spec: a token-by-token scan over a buffer of the last ``w - 1`` valid inputs."""
    B, T, F, w = _check(x, weight, bias, segment_ids, conv_state, activation)
    state_dtype = x.dtype if conv_state is None else conv_state.dtype
    f32 = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    lay = segment_layout(segment_ids, B, T)
    buf0 = jnp.zeros((B, w - 1, *F), f32) if conv_state is None else conv_state.astype(f32)
    bias_f = 0.0 if bias is None else bias.astype(f32)
    expand = lambda m: m.reshape((B,) + (1,) * (x.ndim - 1))  # noqa: E731

    def step(buf, xs):
        x_t, valid_t, reset_t = xs
        buf = jnp.where(expand(reset_t), 0.0, buf)
        window = jnp.concatenate([buf, x_t[:, None]], axis=1)                        # [B, w, *F]
        y_t = _act(jnp.sum(window * weight.astype(f32), axis=1) + bias_f, activation)
        y_t = jnp.where(valid_t.reshape((B,) + (1,) * len(F)), y_t, 0.0)
        buf = jnp.where(expand(valid_t), window[:, 1:], buf)
        return buf, y_t

    tm = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731
    buf, y = lax.scan(step, buf0, (tm(x.astype(f32)), tm(lay.valid), tm(lay.reset)))
    return jnp.moveaxis(y, 0, 1).astype(x.dtype), buf.astype(state_dtype)


class ShortConv(nnx.Module):
    """Causal depthwise convolution over time with optional SiLU (see the module docstring).

    Args:
      features: channel shape ``F`` (an int or a tuple, e.g. ``(heads, head_dim)``).
      kernel_size: width ``w`` (default 4).
      activation: ``"silu"`` (default, as Mamba / fla) or None.
      use_bias: learned per-channel bias (Mamba: yes; fla's q/k/v convs: no — the default).
      axes: logical sharding names of ``F`` (default ``("embed",)`` for an int ``features``).
      dtype: compute dtype (None: the input's); param_dtype: storage dtype.
      kernel_init: ``init(key, shape, dtype)`` of the kernel (default below).

    Parameters: ``kernel [w, *F]`` (axes ``(None, *axes)``), initialised like PyTorch's
    ``Conv1d`` (uniform in ``±1/sqrt(w)``, fan-in of a depthwise filter), ``bias [*F]``.
    """

    def __init__(self, features: int | Sequence[int], kernel_size: int = 4, *, activation: str | None = "silu",
                 use_bias: bool = False, axes: Sequence[str | None] | None = None, dtype=None,
                 param_dtype=jnp.float32, kernel_init=None, rngs: nnx.Rngs):
        F = (features,) if isinstance(features, int) else tuple(features)
        for f in F:
            check_positive_int("features", f)
        self.features = F
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        axes = (("embed",) if len(F) == 1 else (None,) * len(F)) if axes is None else tuple(axes)
        if len(axes) != len(F):
            raise ValueError(f"axes: expected {len(F)} logical names for features {F}, got {axes}")
        self.dtype = dtype
        if kernel_init is None:
            lim = kernel_size ** -0.5
            kernel_init = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -lim, lim)  # noqa: E731
        self.kernel = param(rngs, kernel_init, (kernel_size, *F), (None, *axes), param_dtype)
        self.bias = param(None, nnx.initializers.zeros, F, axes, param_dtype) if use_bias else None

    def init_state(self, batch: int, dtype=jnp.float32):
        """Zero conv state ``[batch, w-1, *F]``."""
        return jnp.zeros((batch, self.kernel_size - 1, *self.features), dtype)

    def __call__(self, x, *, segment_ids=None, conv_state=None):
        """``(y [B, T, *F], new_conv_state [B, w-1, *F])``."""
        dt = self.dtype or x.dtype
        return causal_conv1d(x.astype(dt), self.kernel[...].astype(dt),
                             bias=None if self.bias is None else self.bias[...].astype(dt),
                             segment_ids=segment_ids, conv_state=conv_state, activation=self.activation)
