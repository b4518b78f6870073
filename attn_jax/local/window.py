"""Swin window attention and shifted-window attention on 1-, 2- and 3-D token grids.

Paper: Liu, Lin, Cao, Hu, Wei, Zhang, Lin & Guo, "Swin Transformer: Hierarchical Vision
Transformer using Shifted Windows", 2021, arXiv:2103.14030.  The grid is cut into
non-overlapping windows of ``M_a`` tokens per axis and exact softmax attention runs inside each
window.  The shifted variant (every other Swin block) moves the partition by ``s_a`` tokens
(``0 < s_a < M_a``, the paper uses ``M // 2``): Swin computes it as a cyclic shift of the grid by
``-s``, window attention with a mask that keeps apart the tokens that the shift wrapped around
from the far border, and the inverse shift.  Without the cyclic shift the same pattern is a
partition whose windows start at ``s - M, s, s + M, ...`` (clipped to the grid: border windows
of ``s`` and ``M - s`` tokens); query ``x`` sees key ``y`` iff on every axis::

    (x_a + M_a - s_a) // M_a == (y_a + M_a - s_a) // M_a

``"reference"`` is dense attention with that mask (:func:`window_mask`) over the raster-flattened
tokens; ``"xla"`` (auto) is Swin's algorithm -- roll, partition into ``[B * windows, prod(M), H,
D]``, :func:`attn_jax.attention` with the region mask when shifted, un-partition, roll back -- so
the two forms are different computations of one pattern.  The grid must divide into windows.
Swin's relative position bias is not included (see :mod:`attn_jax.local.neighborhood` for NAT's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from attn_jax.core import masks as M
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.dispatch import Registry, register_explainer
from attn_jax.local.grid_mask import GridMask, dense_grid_attention
from attn_jax.local.neighborhood import check_grid_inputs
from attn_jax.softmax import attention

__all__ = ["window_attention", "window_attention_reference", "window_mask", "WindowMask", "WINDOW_ATTENTION"]

WINDOW_ATTENTION = Registry("local.window_attention")


def _per_axis(name, value, d):
    if M.is_concrete_int(value):
        return (int(value),) * d
    if isinstance(value, (tuple, list)) and len(value) == d and all(M.is_concrete_int(x) for x in value):
        return tuple(int(x) for x in value)
    raise TypeError(f"{name}: expected an int or a tuple of {d} ints (one per spatial axis), got {value!r}")


def _check(spatial, window, shift):
    d = len(spatial)
    w, s = _per_axis("window", window, d), _per_axis("shift", shift, d)
    for a in range(d):
        if w[a] < 1 or spatial[a] % w[a]:
            raise ValueError(f"window: expected positive sizes dividing the grid {spatial}, got {w}")
        if not 0 <= s[a] < w[a]:
            raise ValueError(f"shift: expected 0 <= shift < window on every axis, got shift {s} for window {w}")
    return w, s


def window_mask(spatial, window, shift=0) -> Bool[np.ndarray, "N N"]:
    """``bool[N, N]`` (NumPy) of (shifted) window attention over raster-flattened tokens (module
    docstring).  Quadratic: references and tests."""
    spatial = tuple(int(n) for n in spatial)
    w, s = _check(spatial, window, shift)
    coords = np.stack(np.unravel_index(np.arange(math.prod(spatial)), spatial), 1)
    ids = (coords + np.array(w) - np.array(s)) // np.array(w)          # [N, d] window id per axis
    return (ids[:, None, :] == ids[None, :, :]).all(-1)


@dataclass(frozen=True)
class WindowMask(GridMask):
    """(Shifted-)window visibility as a rule-defined grid mask (the tile engine's form; the mixer's).
    The rule holds on any grid: windows that the grid does not fill are cut at its end."""

    window: tuple[int, ...] = ()
    shift: tuple[int, ...] = ()

    def rule(self, xq, xk, xp):
        w = xp.asarray(self.window).reshape((-1,) + (1,) * (xq.ndim - 1))
        s = xp.asarray(self.shift).reshape((-1,) + (1,) * (xq.ndim - 1))
        return ((xq + w - s) // w == (xk + w - s) // w).all(0)


jax.tree_util.register_static(WindowMask)


@dataclass(frozen=True)
class _Problem:
    spatial: tuple[int, ...]
    window: tuple[int, ...]
    shift: tuple[int, ...]
    scale: float | None


def _reference(p: _Problem, q, k, v):
    return dense_grid_attention(window_mask(p.spatial, p.window, p.shift), q, k, v, scale=p.scale)


def _region_mask(p: _Problem) -> np.ndarray:
    """``bool[windows, prod(M), prod(M)]``: Swin's mask on the cyclically shifted grid (tokens of a
    window that came from different regions -- wrapped around or not -- do not see each other)."""
    d = len(p.spatial)
    regions = np.zeros(p.spatial, np.int64)
    for a in range(d):
        n, w, s = p.spatial[a], p.window[a], p.shift[a]
        r = np.zeros(n, np.int64)
        if s:
            r[n - w:n - s], r[n - s:] = 1, 2       # Swin's slices (0, -M), (-M, -s), (-s, None)
        regions = regions * 3 + r.reshape([n if b == a else 1 for b in range(d)])
    win = _partition(regions[None, ..., None, None], p)[..., 0, 0]    # [windows, prod(M)]
    return win[:, :, None] == win[:, None, :]


def _partition(x, p: _Problem):
    """``[B, *grid, H, D] -> [B * windows, prod(M), H, D]``."""
    d = len(p.spatial)
    B, H, D = x.shape[0], x.shape[-2], x.shape[-1]
    shape = (B, *sum(((n // w, w) for n, w in zip(p.spatial, p.window)), ()), H, D)
    perm = (0, *range(1, 1 + 2 * d, 2), *range(2, 2 + 2 * d, 2), 1 + 2 * d, 2 + 2 * d)
    return x.reshape(shape).transpose(perm).reshape(-1, math.prod(p.window), H, D)


def _unpartition(x, p: _Problem, B: int):
    d = len(p.spatial)
    H, D = x.shape[-2], x.shape[-1]
    x = x.reshape(B, *(n // w for n, w in zip(p.spatial, p.window)), *p.window, H, D)
    perm = (0, *sum(((1 + a, 1 + d + a) for a in range(d)), ()), 1 + 2 * d, 2 + 2 * d)
    return x.transpose(perm).reshape(B, *p.spatial, H, D)


def _xla(p: _Problem, q, k, v):
    B, d = q.shape[0], len(p.spatial)
    axes = tuple(range(1, 1 + d))
    shifted = any(p.shift)
    roll = (lambda x, sign: jnp.roll(x, tuple(sign * s for s in p.shift), axes)) if shifted else (lambda x, sign: x)
    qw, kw, vw = (_partition(roll(x, -1), p) for x in (q, k, v))
    mask = None
    if shifted:
        region = _region_mask(p)                                         # [windows, Mt, Mt]
        mask = M.dense(jnp.asarray(np.tile(region, (B, 1, 1)))[:, None])
    o = attention(qw, kw, vw, mask=mask, scale=p.scale, impl="xla")
    return roll(_unpartition(o, p, B), 1)


def window_attention(q: Float[ArrayLike, "B *spatial H Dk"], k: Float[ArrayLike, "B *spatial K Dk"],
                     v: Float[ArrayLike, "B *spatial K Dv"], window, *, shift=0, scale: float | None = None,
                     impl="auto") -> Float[Array, "B *spatial H Dv"]:
    """Swin (shifted-)window attention on a 1-, 2- or 3-D grid (module docstring).

    Args:
      q, k, v: ``[B, *spatial, H, Dk]``, ``[B, *spatial, K, Dk]``, ``[B, *spatial, K, Dv]`` (GQA).
      window: window size per axis (int or tuple), dividing the grid.
      shift: the shifted-window offset per axis, ``0 <= shift < window`` (Swin: ``window // 2``).
      scale: logit scale, default ``Dk ** -0.5``.
      impl: ``"auto"`` (= ``"xla"``), ``"xla"``, ``"reference"`` or a sequence.
    Returns:
      ``o [B, *spatial, H, Dv]`` in q's dtype.
    """
    spatial = check_grid_inputs(q, k, v, scale)
    w, s = _check(spatial, window, shift)
    p = _Problem(spatial, w, s, None if scale is None else float(scale))
    return WINDOW_ATTENTION.call(impl, p, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))


def window_attention_reference(q: Float[ArrayLike, "B *spatial H Dk"], k: Float[ArrayLike, "B *spatial K Dk"],
                               v: Float[ArrayLike, "B *spatial K Dv"], window, *, shift=0,
                               scale: float | None = None) -> Float[Array, "B *spatial H Dv"]:
    """Dense attention with :func:`window_mask` (the spec; quadratic memory)."""
    return window_attention(q, k, v, window, shift=shift, scale=scale, impl="reference")


def _no_reasons(platform, p) -> list[str]:
    return []


def _explain(q, k, v, window, *, shift=0, scale=None, impl="auto", platform=None):
    spatial = check_grid_inputs(q, k, v, scale)
    w, s = _check(spatial, window, shift)
    return WINDOW_ATTENTION.explain(impl, _Problem(spatial, w, s, scale), platform)


WINDOW_ATTENTION.register("xla", _xla, _no_reasons)
WINDOW_ATTENTION.register("reference", _reference, _no_reasons, auto=False)
register_explainer(window_attention, _explain)

# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="swin", family="local", title="Swin (shifted-)window attention (1-, 2-, 3-D)",
    papers=(Paper("Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", 2021, "2103.14030",
                  "Liu et al."),),
    summary="softmax attention inside M-token windows; shifted: the partition moved by s (cyclic shift + region mask)",
    op=window_attention, forms=("xla",), directions=("bidirectional",),
    layer="attn_jax.nn.local_mixers:swin_mixer",
    notes="the op has no relative position bias; the mixer learns Swin's table (per-tile bias on the mask form)"))
