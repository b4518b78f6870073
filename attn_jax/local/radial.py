"""Radial attention: a static spatiotemporal mask for video token grids ``[frames, height, width]``
whose spatial window shrinks exponentially with temporal distance.

Paper: Li, Li, Cai, Xi, Yang, Lin, Zhang, Yang, Hu, Peng, Agrawala, Stoica, Keutzer & Han,
"Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation", 2025,
arXiv:2506.19852.  Tokens are ``(i, k)``: frame ``i`` and ``k``, the raster index of the token
inside its frame of ``s = height * width`` tokens.  With the temporal distance ``d = |i - j|`` and
its band ``r = floor(log2(max(d, 1)))``, query ``(i, k)`` sees key ``(j, l)`` iff::

    (2^r <= s  and  |k - l| + 1 <= s / 2^r)          # spatial band, halved per temporal band
    or (k == l  and  d mod ceil(2^r / s) == 0)        # far frames: the same position, every few frames

so frames 0-1 apart see whole frames, each doubling of the temporal distance halves the spatial
window, and once it would be below one token only the same spatial position of every
``ceil(2^r / s)``-th frame is kept: ``O(n log n)`` visible pairs.  This is our reading of the
paper's mask definition (Section 4), checked against the element-level rule of its official
code (``mit-han-lab/radial-attention``, ``radial_attn/attn_mask.py``), which differs in what
the paper calls implementation detail: it rounds ``s`` up to a power of two, coarsens the
pattern to 128 x 128 blocks (windows floored at one block), makes frame 0 an attention sink and
keeps a denser band for some models.  ``sink=True`` adds the sink (every query sees all of frame
0); the block coarsening is not reproduced (the tile engine skips empty tiles of the exact mask).

Forms: ``"reference"`` -- dense attention with :func:`radial_mask`; ``"tiled"`` (auto) -- a
:class:`RadialMask` on the tile engine (:func:`attn_jax.local.grid_mask.tiled_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from attn_jax.core.array_types import ArrayLike
from attn_jax.core.dispatch import Registry, register_explainer
from attn_jax.local.grid_mask import GridMask, dense_grid_attention, dense_grid_mask, tiled_attention
from attn_jax.local.neighborhood import check_grid_inputs

__all__ = ["radial_attention", "radial_attention_reference", "RadialMask", "radial_mask", "RADIAL"]

RADIAL = Registry("local.radial_attention")


def _floor_log2(d, xp):
    """``floor(log2(max(d, 1)))`` exactly for integers (no float log)."""
    d = xp.maximum(d, 1)
    r = xp.zeros_like(d)
    for bit in (16, 8, 4, 2, 1):             # binary search over 31-bit ints
        big = d >= (1 << bit)
        r = r + xp.where(big, bit, 0)
        d = xp.where(big, d >> bit, d)
    return r


@dataclass(frozen=True)
class RadialMask(GridMask):
    """Radial attention's mask (module docstring) over a ``[frames, height, width]`` grid."""

    sink: bool = False

    def rule(self, xq, xk, xp):
        s = self.spatial[1] * self.spatial[2]
        i, j = xq[0], xk[0]
        kq, kk = xq[1] * self.spatial[2] + xq[2], xk[1] * self.spatial[2] + xk[2]
        d = xp.abs(i - j)
        r = _floor_log2(d, xp)
        p = xp.left_shift(xp.ones_like(r), r)                     # 2^r
        band = (p <= s) & ((xp.abs(kq - kk) + 1) * p <= s)
        every = (p + s - 1) // s                                  # ceil(2^r / s)
        diag = (kq == kk) & (d % every == 0)
        vis = band | diag
        return (vis | (j == 0)) if self.sink else vis


jax.tree_util.register_static(RadialMask)


def _check_spatial(spatial):
    if len(spatial) != 3:
        raise ValueError(f"q: expected a video grid [B, frames, height, width, H, D] (3 spatial axes), got "
                         f"{len(spatial)} spatial axes {spatial}")


def radial_mask(spatial, *, sink: bool = False) -> Bool[np.ndarray, "N N"]:
    """``bool[N, N]`` (NumPy) of radial attention over raster-flattened ``[frames, height, width]``
    tokens (quadratic: references and tests)."""
    spatial = tuple(int(n) for n in spatial)
    _check_spatial(spatial)
    return dense_grid_mask(RadialMask(spatial, None, bool(sink)))


@dataclass(frozen=True)
class _Problem:
    spatial: tuple[int, ...]
    sink: bool
    scale: float


def _reference(p: _Problem, q, k, v):
    return dense_grid_attention(radial_mask(p.spatial, sink=p.sink), q, k, v, scale=p.scale)


def _tiled(p: _Problem, q, k, v):
    return tiled_attention(RadialMask(p.spatial, None, p.sink), q, k, v, scale=p.scale)


def radial_attention(q: Float[ArrayLike, "B F Hh Ww H Dk"], k: Float[ArrayLike, "B F Hh Ww K Dk"],
                     v: Float[ArrayLike, "B F Hh Ww K Dv"], *, sink: bool = False, scale: float | None = None,
                     impl="auto") -> Float[Array, "B F Hh Ww H Dv"]:
    """Radial attention (module docstring) over a video token grid.

    Args:
      q, k, v: ``[B, frames, height, width, H|K, D]`` (GQA).
      sink: every query also sees all of frame 0 (the official code's attention sink).
      scale: logit scale, default ``Dk ** -0.5``.
      impl: ``"auto"`` (= ``"tiled"``), ``"tiled"``, ``"reference"`` or a sequence.
    Returns:
      ``o [B, frames, height, width, H, Dv]`` in q's dtype.
    """
    spatial = check_grid_inputs(q, k, v, scale)
    _check_spatial(spatial)
    if not isinstance(sink, bool):
        raise TypeError(f"sink: expected a bool, got {sink!r}")
    p = _Problem(spatial, sink, float(jnp.shape(q)[-1] ** -0.5 if scale is None else scale))
    return RADIAL.call(impl, p, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))


def radial_attention_reference(q: Float[ArrayLike, "B F Hh Ww H Dk"], k: Float[ArrayLike, "B F Hh Ww K Dk"],
                               v: Float[ArrayLike, "B F Hh Ww K Dv"], *, sink: bool = False,
                               scale: float | None = None) -> Float[Array, "B F Hh Ww H Dv"]:
    """Dense attention with :func:`radial_mask` (the spec; quadratic memory)."""
    return radial_attention(q, k, v, sink=sink, scale=scale, impl="reference")


def _no_reasons(platform, p) -> list[str]:
    return []


def _explain(q, k, v, *, sink=False, scale=None, impl="auto", platform=None):
    spatial = check_grid_inputs(q, k, v, scale)
    _check_spatial(spatial)
    return RADIAL.explain(impl, _Problem(spatial, bool(sink), 1.0), platform)


RADIAL.register("tiled", _tiled, _no_reasons)
RADIAL.register("reference", _reference, _no_reasons, auto=False)
register_explainer(radial_attention, _explain)

# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="radial", family="local", title="Radial attention (static spatiotemporal energy-decay mask, video grids)",
    papers=(Paper("Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation", 2025,
                  "2506.19852", "Li et al."),),
    summary=("key (j, l) visible to (i, k) iff |k-l|+1 <= s/2^r (r = floor log2 |i-j|), "
             "or k = l on every ceil(2^r/s)-th frame"),
    op=radial_attention, forms=("tiled",), directions=("bidirectional",),
    notes="element-level mask (the official code coarsens it to 128-token blocks); optional frame-0 sink"))
