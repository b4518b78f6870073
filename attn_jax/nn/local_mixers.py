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
from attn_jax.local.grid_mask import GridRelativeBias
from attn_jax.nn.attention import MultiHeadAttention
from attn_jax.nn.layers import param
from attn_jax.softmax import attention
from attn_jax.softmax.xla import attention_blockwise

__all__ = ["NeighborhoodFn", "neighborhood_mixer", "GridMaskFn", "HiLoFn", "swin_mixer", "axial_mixer", "halo_mixer",
           "hilo_mixer"]

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


# ----------------------------------------------------------------------------- mask-based grid mixers
# 'swin', 'axial', 'halo', 'hilo': the op's pattern as a rule-defined grid mask
# (attn_jax.local.GridMask) on the tile engine, combined with the padding mask of the segment ids, so
# a right-padded row equals the row alone and a 1-D sequence of any length is served (windows /
# blocks that the sequence does not fill are cut at its end; HaloNet's border padding is masked).


def _padding_mask(mask, grid):
    """The right-padding segment mask (or None); refuses packed rows and padding on n-D grids."""
    if mask is None:
        return None
    if not isinstance(mask, masks.Segments) or mask.kv_ids is not None:
        raise ValueError(f"segment_ids: the local grid mixers take only right-padding segment ids, got mask {mask!r}")
    if len(grid) != 1:
        raise ValueError(f"segment_ids: padding is supported on 1-D grids only, got grid {grid}")
    _check_padding_only(mask.q_ids)
    return mask


def _grid_of(grid, T):
    g = (T,) if grid is None else grid
    if math.prod(g) != T:
        raise ValueError(f"x: the mixer's grid {g} has {math.prod(g)} tokens, got T={T}")
    return g


def _per_axis(name, value, ndim):
    v = (value,) * ndim if masks.is_concrete_int(value) else tuple(value)
    if len(v) != ndim or not all(masks.is_concrete_int(x) for x in v):
        raise ValueError(f"{name}: expected an int or {ndim} ints (one per grid axis), got {value!r}")
    return tuple(int(x) for x in v)


class GridMaskFn(nnx.Module):
    """``attention_fn`` of the mask-based grid mixers: exact attention of ``q, k, v [B, T, H|K, D]``
    under ``make_mask(grid)`` (a :class:`attn_jax.local.GridMask`) & the padding mask, on the tile
    engine; with ``rel_pos`` a learned relative position bias table ``[H, *(2 r + 1)]``
    (:class:`attn_jax.local.grid_mask.GridRelativeBias`, init truncated normal std 0.02 as Swin)."""

    def __init__(self, grid, make_mask, *, num_heads: int, rel_pos=None, rngs: nnx.Rngs | None = None,
                 param_dtype=jnp.float32, tile: int = 64):
        self.grid = None if grid is None else tuple(int(n) for n in grid)
        self.make_mask, self.tile = make_mask, tile
        self.table = (param(rngs, nnx.initializers.truncated_normal(0.02), (num_heads, *(2 * r + 1 for r in rel_pos)),
                            ("heads",) + (None,) * len(rel_pos), param_dtype) if rel_pos is not None else None)

    def __call__(self, q, k, v, *, mask, scale, x):
        B, T = q.shape[:2]
        grid = _grid_of(self.grid, T)
        pad = _padding_mask(mask, grid)
        m = self.make_mask(grid)
        m = m if pad is None else m & pad
        bias = None if self.table is None else GridRelativeBias(self.table[...], grid)
        bs = min(self.tile, T)
        return attention_blockwise(q, k, v, mask=m, bias=bias, scale=scale, block_q=bs, block_k=bs)


class HiLoFn(nnx.Module):
    """``attention_fn`` of the 'hilo' mixer: the first ``H - lo_heads`` heads under the window mask,
    the last ``lo_heads`` against the window-pooled k, v (valid tokens only; empty windows hidden)."""

    def __init__(self, grid, window, lo_heads: int, *, tile: int = 64):
        self.grid = None if grid is None else tuple(int(n) for n in grid)
        self.window, self.lo_heads, self.tile = window, lo_heads, tile

    def __call__(self, q, k, v, *, mask, scale, x):
        B, T, H = q.shape[:3]
        K = k.shape[2]
        grid = _grid_of(self.grid, T)
        pad = _padding_mask(mask, grid)
        window = _per_axis("window", self.window, len(grid))
        lo, lo_kv = self.lo_heads, self.lo_heads * K // H
        outs = []
        if lo < H:
            m = local.WindowMask(grid, None, window, (0,) * len(grid))
            bs = min(self.tile, T)
            outs.append(attention_blockwise(q[:, :, :H - lo], k[:, :, :K - lo_kv], v[:, :, :K - lo_kv],
                                            mask=m if pad is None else m & pad, scale=scale, block_q=bs, block_k=bs))
        if lo:
            valid = jnp.ones((B, T), bool) if pad is None else pad.q_ids != 0
            g = lambda a: a.reshape(B, *grid, *a.shape[2:])  # noqa: E731
            kp, count = local.pool_windows(g(k[:, :, K - lo_kv:]), window, valid.reshape(B, *grid))
            vp, _ = local.pool_windows(g(v[:, :, K - lo_kv:]), window, valid.reshape(B, *grid))
            lm = masks.segments(valid.astype(jnp.int32), (count > 0).astype(jnp.int32))
            outs.append(attention(q[:, :, H - lo:], kp, vp, mask=lm, scale=scale))
        return jnp.concatenate(outs, axis=2)


def _encoder_only(name, causal):
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    if causal:
        raise ValueError(f"causal: the '{name}' mixer is non-causal only (an encoder mixer for token grids); "
                         f"build it with causal=False")


def _check_grid(grid):
    if grid is not None and (not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3 or not all(
            masks.is_concrete_int(n) and n > 0 for n in grid)):
        raise ValueError(f"grid: expected a tuple of 1 to 3 positive ints (the token grid), got {grid!r}")


def swin_mixer(d_model: int, num_heads: int, *, rngs: nnx.Rngs, grid=None, window=7, shift=0,
               rel_pos_bias: bool = True, causal: bool = True, positional: str = "none",
               **kwargs) -> MultiHeadAttention:
    """Swin (shifted-)window attention mixer (:func:`attn_jax.local.window_attention`'s pattern) with
    Swin's learned relative position bias table ``[H, 2M - 1, ...]``; build with ``causal=False``.

    Args:
      grid: the token grid (1 to 3 axes); None = ``(T,)``.
      window: ``M`` per axis; shift: the shifted-window offset (``0 <= shift < window``; Swin
        alternates 0 and ``M // 2`` between blocks: give each layer its own).
      rel_pos_bias: learn Swin's relative position bias.
    """
    _encoder_only("swin", causal)
    _check_grid(grid)
    ndim = 1 if grid is None else len(grid)
    w, s = _per_axis("window", window, ndim), _per_axis("shift", shift, ndim)
    if any(not 0 <= b < a for a, b in zip(w, s)) or min(w) < 1:
        raise ValueError(f"shift: expected 0 <= shift < window on every axis, got shift {s} for window {w}")
    fn = GridMaskFn(grid, lambda g: local.WindowMask(g, None, w, s), num_heads=num_heads,
                    rel_pos=tuple(x - 1 for x in w) if rel_pos_bias else None, rngs=rngs,
                    param_dtype=kwargs.get("param_dtype", jnp.float32))
    return MultiHeadAttention(d_model, num_heads, causal=False, positional=positional, attention_fn=fn, rngs=rngs,
                              **kwargs)


def axial_mixer(d_model: int, num_heads: int, *, rngs: nnx.Rngs, grid=None, axis: int = -1, causal: bool = True,
                positional: str = "none", **kwargs) -> MultiHeadAttention:
    """Axial attention mixer along one grid ``axis`` (:func:`attn_jax.local.axial`'s pattern; a full
    axial model alternates axes between layers); on a 1-D grid it is full attention."""
    _encoder_only("axial", causal)
    _check_grid(grid)
    ndim = 1 if grid is None else len(grid)
    if not masks.is_concrete_int(axis) or not -ndim <= axis < ndim:
        raise ValueError(f"axis: expected an int in [-{ndim}, {ndim}), got {axis!r}")
    a = int(axis) % ndim
    fn = GridMaskFn(grid, lambda g: local.AxialMask(g, None, a), num_heads=num_heads)
    return MultiHeadAttention(d_model, num_heads, causal=False, positional=positional, attention_fn=fn, rngs=rngs,
                              **kwargs)


def halo_mixer(d_model: int, num_heads: int, *, rngs: nnx.Rngs, grid=None, block_size=8, halo=3,
               causal: bool = True, positional: str = "none", **kwargs) -> MultiHeadAttention:
    """HaloNet blocked local attention mixer (:func:`attn_jax.local.halo_attention`'s pattern, border
    padding masked: ``padding="masked"``); HaloNet's defaults ``b = 8``, ``h = 3``."""
    _encoder_only("halo", causal)
    _check_grid(grid)
    ndim = 1 if grid is None else len(grid)
    b, h = _per_axis("block_size", block_size, ndim), _per_axis("halo", halo, ndim)
    if min(b) < 1 or min(h) < 0:
        raise ValueError(f"block_size, halo: expected block sizes >= 1 and halos >= 0, got {b} and {h}")
    fn = GridMaskFn(grid, lambda g: local.HaloMask(g, None, b, h), num_heads=num_heads)
    return MultiHeadAttention(d_model, num_heads, causal=False, positional=positional, attention_fn=fn, rngs=rngs,
                              **kwargs)


def hilo_mixer(d_model: int, num_heads: int, *, rngs: nnx.Rngs, grid=None, window=2, alpha: float = 0.5,
               causal: bool = True, positional: str = "none", num_kv_heads: int | None = None,
               **kwargs) -> MultiHeadAttention:
    """HiLo attention mixer (:func:`attn_jax.local.hilo_attention`): ``lo_heads = int(alpha H)`` Lo-Fi
    heads attend to window-pooled keys / values, the rest attend inside windows (LITv2's ``s = 2``)."""
    _encoder_only("hilo", causal)
    _check_grid(grid)
    ndim = 1 if grid is None else len(grid)
    w = _per_axis("window", window, ndim)
    if min(w) < 1:
        raise ValueError(f"window: expected sizes >= 1, got {w}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a fraction in [0, 1], got {alpha!r}")
    lo = int(alpha * num_heads)
    K = num_heads if num_kv_heads is None else num_kv_heads
    if (lo * K) % num_heads:
        raise ValueError(f"alpha: int(alpha * num_heads) = {lo} Lo-Fi heads do not split the {K} k/v heads in "
                         f"proportion (lo * K / H must be an integer)")
    return MultiHeadAttention(d_model, num_heads, causal=False, positional=positional,
                              attention_fn=HiLoFn(grid, w, lo), rngs=rngs, num_kv_heads=num_kv_heads, **kwargs)


for _f in (swin_mixer, axial_mixer, halo_mixer, hilo_mixer):
    _f.SUPPORTED_FEATURES = FEATURES
