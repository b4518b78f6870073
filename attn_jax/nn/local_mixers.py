"""Token mixers for local attention on token grids: :class:`MultiHeadAttention` whose attention is
:func:`attn_jax.local.neighborhood` (registry name ``"neighborhood"``).

The sequence ``x [B, T, d]`` is a raster-flattened grid ``grid`` (``T = prod(grid)``; default
``(T,)``: 1-D neighborhood attention over the sequence).  Projections, GQA, qk-norm and the output
gate come from :class:`MultiHeadAttention`; no 1-D positional scheme by default (``positional=
"none"``: a grid model adds 2-D position embeddings, as the ViT does).

Encoder-only (``causal=False``): per-axis causal NA exists in the op, but a decoder cache for
grids does not.  ``segment_ids`` mark right padding on a 1-D grid: row ``b`` is attended as a grid
of its ``sum(segment_ids[b] != 0)`` valid tokens (the op's ``lengths``) and padding outputs are
zero.  Packed documents (several ids in a row) are refused when the ids are concrete; traced ids
are read as that padding marker (only the count of nonzero ids is used).

In the ViT: ``ViTConfig(mixer_pattern="neighborhood", pooling="mean", mixer_kwargs={"neighborhood":
{"grid": config.grid, "kernel_size": 3}})`` (``pooling="cls"`` prepends a token, so ``T`` is
not a grid).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn_jax import local
from attn_jax.core import masks
from attn_jax.nn.attention import MultiHeadAttention
from attn_jax.nn.layers import param

__all__ = ["NeighborhoodFn", "neighborhood_mixer"]

FEATURES = frozenset({"mha", "gqa", "dk_ne_dv", "bidirectional"})


def _check_padding_only(ids) -> None:
    """Refuse packed rows (concrete ids): each row must be one document then padding."""
    try:
        a = np.asarray(ids)
    except jax.errors.TracerArrayConversionError:
        return
    nz = a != 0
    prefix = np.cumsum(~nz, axis=1) == 0          # True up to the first padding token
    first = np.where(nz.any(1), a[np.arange(a.shape[0]), np.argmax(nz, axis=1)], 0)
    if ((nz != prefix) | (nz & (a != first[:, None]))).any():
        raise ValueError("segment_ids: the neighborhood mixer takes right padding only (one document per row, "
                         "then zeros); packed documents are not supported")


class NeighborhoodFn(nnx.Module):
    """The ``attention_fn`` of the mixer: ``q, k, v [B, T, H|K, D]`` -> NA on the grid; with
    ``rel_pos_bias`` it owns NAT's relative position bias table ``[H, *(2 kernel_size - 1)]``
    (init truncated normal, std 0.02, as NAT)."""

    def __init__(self, grid, kernel_size, *, num_heads: int, dilation=1, stride=1, rel_pos_bias: bool = False,
                 rngs: nnx.Rngs | None = None, param_dtype=jnp.float32, impl="auto"):
        self.grid = None if grid is None else tuple(int(n) for n in grid)
        self.kernel_size, self.dilation, self.stride, self.impl = kernel_size, dilation, stride, impl
        ndim = 1 if grid is None else len(grid)
        ks = (kernel_size,) * ndim if masks.is_concrete_int(kernel_size) else tuple(kernel_size)
        if len(ks) != ndim:
            raise ValueError(f"kernel_size: expected an int or {ndim} values (one per grid axis), got {kernel_size!r}")
        self.rpb = (param(rngs, nnx.initializers.truncated_normal(0.02), (num_heads, *(2 * k - 1 for k in ks)),
                          ("heads",) + (None,) * ndim, param_dtype) if rel_pos_bias else None)

    def __call__(self, q, k, v, *, mask, scale, x):
        B, T = q.shape[:2]
        grid = (T,) if self.grid is None else self.grid
        if math.prod(grid) != T:
            raise ValueError(f"x: the neighborhood mixer's grid {grid} has {math.prod(grid)} tokens, got T={T}")
        lengths = None
        if mask is not None:
            if not isinstance(mask, masks.Segments) or mask.kv_ids is not None:
                raise ValueError(f"segment_ids: the neighborhood mixer takes only right-padding segment ids, "
                                 f"got mask {mask!r}")
            if len(grid) != 1:
                raise ValueError(f"segment_ids: padding is supported on 1-D grids only, got grid {grid}")
            _check_padding_only(mask.q_ids)
            lengths = jnp.sum(mask.q_ids != 0, axis=1).astype(jnp.int32)
        g = lambda a: a.reshape(B, *grid, *a.shape[2:])  # noqa: E731
        o = local.neighborhood(g(q), g(k), g(v), self.kernel_size, dilation=self.dilation, stride=self.stride,
                               scale=scale, lengths=lengths, rpb=None if self.rpb is None else self.rpb[...],
                               impl=self.impl)
        return o.reshape(B, T, *o.shape[-2:])


def neighborhood_mixer(d_model: int, num_heads: int, *, rngs: nnx.Rngs, grid=None, kernel_size=7, dilation=1,
                       stride=1, rel_pos_bias: bool = False, causal: bool = True, positional: str = "none",
                       impl="auto", **kwargs) -> MultiHeadAttention:
    """Neighborhood-attention mixer on a token grid (module docstring); build with ``causal=False``.

    Args:
      grid: the spatial shape of the raster-flattened tokens (1 to 3 axes); None = ``(T,)``.
      kernel_size, dilation, stride: as :func:`attn_jax.local.neighborhood` (ints or per-axis tuples).
      rel_pos_bias: learn NAT's relative position bias (``rpb`` of the op), one table per head.
      causal: must be False (an encoder mixer); the default True raises, naming the mixer.
      positional, impl, kwargs: as :class:`MultiHeadAttention` (``impl`` goes to the NA op).
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    if causal:
        raise ValueError("causal: the 'neighborhood' mixer is non-causal only (an encoder mixer for token grids); "
                         "build it with causal=False")
    if grid is not None:
        if not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3 or not all(
                masks.is_concrete_int(n) and n > 0 for n in grid):
            raise ValueError(f"grid: expected a tuple of 1 to 3 positive ints (the token grid), got {grid!r}")
        local.neighborhood_spec(tuple(grid), kernel_size, dilation, stride)   # the NA arguments against the grid
    fn = NeighborhoodFn(grid, kernel_size, num_heads=num_heads, dilation=dilation, stride=stride,
                        rel_pos_bias=rel_pos_bias, rngs=rngs, param_dtype=kwargs.get("param_dtype", jnp.float32),
                        impl=impl)
    return MultiHeadAttention(d_model, num_heads, causal=False, positional=positional, attention_fn=fn, rngs=rngs,
                              **kwargs)


neighborhood_mixer.SUPPORTED_FEATURES = FEATURES
