"""Axial attention on 2-D and 3-D token grids: exact softmax attention along one grid axis.

Paper: Ho, Kalchbrenner, Weissenborn & Salimans, "Axial Attention in Multidimensional
Transformers", 2019, arXiv:1912.12180.  On a grid ``[n_1, ..., n_d]`` attention along axis ``a``
lets token ``x`` see exactly the tokens that agree with it on every other axis::

    o_x = Σ_{y : y_b = x_b for all b != a} softmax_y(scale q_x · k_y) v_y      (causal: y_a <= x_a)

A full axial layer applies it along each axis in turn (rows, then columns, ...); that
composition is model plumbing, this op is one axis.  Cost ``N n_a`` instead of ``N^2``.

Forms: ``"reference"`` masks dense attention over the raster-flattened tokens with
:func:`axial_mask` (the spec; quadratic); ``"xla"`` (auto) moves axis ``a`` next to the heads,
folds the other axes into the batch and calls :func:`attn_jax.attention` (its tiled exact
path, ``causal()`` mask when causal) -- nothing of size ``N^2``.
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

__all__ = ["axial", "axial_reference", "axial_mask", "AxialMask", "AXIAL"]

AXIAL = Registry("local.axial")


@dataclass(frozen=True)
class AxialMask(GridMask):
    """Axial visibility along ``axis`` (non-causal) as a rule-defined grid mask (the mixer's form)."""

    axis: int = 0

    def rule(self, xq, xk, xp):
        same = xq == xk
        return xp.concatenate([same[:self.axis], same[self.axis + 1:]], 0).all(0) if len(self.spatial) > 1 \
            else xp.ones(xp.broadcast_shapes(xq.shape[1:], xk.shape[1:]), bool)


jax.tree_util.register_static(AxialMask)


def _check_axis(axis, causal, ndim: int) -> int:
    if not M.is_concrete_int(axis):
        raise TypeError(f"axis: expected an int (a spatial axis, 0 .. {ndim - 1} or negative), got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis: expected a spatial axis in [{-ndim}, {ndim - 1}] for {ndim} spatial axes, got {axis}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    return axis % ndim


def axial_mask(spatial, axis: int, causal: bool = False) -> Bool[np.ndarray, "N N"]:
    """``bool[N, N]`` (NumPy) over raster-flattened tokens: query ``x`` sees key ``y`` iff they agree on
    every axis but ``axis`` (and ``y[axis] <= x[axis]`` when causal).  Quadratic: references and tests."""
    spatial = tuple(int(n) for n in spatial)
    axis = _check_axis(axis, causal, len(spatial))
    coords = np.stack(np.unravel_index(np.arange(math.prod(spatial)), spatial), 1)
    same = np.ones((len(coords), len(coords)), bool)
    for b in range(len(spatial)):
        if b != axis:
            same &= coords[:, None, b] == coords[None, :, b]
    if causal:
        same &= coords[None, :, axis] <= coords[:, None, axis]
    return same


@dataclass(frozen=True)
class _Problem:
    spatial: tuple[int, ...]
    axis: int
    causal: bool
    scale: float | None


def _reference(p: _Problem, q, k, v):
    return dense_grid_attention(axial_mask(p.spatial, p.axis, p.causal), q, k, v, scale=p.scale)


def _xla(p: _Problem, q, k, v):
    d = len(p.spatial)
    a = 1 + p.axis
    others = [1 + b for b in range(d) if b != p.axis]
    perm = (0, *others, a, d + 1, d + 2)           # [B, *others, n_a, H, D]
    n = p.spatial[p.axis]

    def fold(x):
        x = x.transpose(perm)
        return x.reshape(-1, n, *x.shape[-2:]), x.shape

    (qf, qs), (kf, _), (vf, _) = fold(q), fold(k), fold(v)
    o = attention(qf, kf, vf, mask=M.causal() if p.causal else None, scale=p.scale, impl="xla")
    o = o.reshape(*qs[:-1], v.shape[-1])
    return o.transpose(tuple(int(i) for i in np.argsort(perm)))


def axial(q: Float[ArrayLike, "B *spatial H Dk"], k: Float[ArrayLike, "B *spatial K Dk"],
          v: Float[ArrayLike, "B *spatial K Dv"], axis: int, *, causal: bool = False, scale: float | None = None,
          impl="auto") -> Float[Array, "B *spatial H Dv"]:
    """Axial attention along spatial ``axis`` of a 1-, 2- or 3-D grid (module docstring).

    Args:
      q, k, v: ``[B, *spatial, H, Dk]``, ``[B, *spatial, K, Dk]``, ``[B, *spatial, K, Dv]``,
        ``H % K == 0`` (GQA).
      axis: the spatial axis to attend along (0 = the first spatial axis; negative counts back).
      causal: only keys at or before the query along ``axis``.
      scale: logit scale, default ``Dk ** -0.5``.
      impl: ``"auto"`` (= ``"xla"``), ``"xla"``, ``"reference"`` or a sequence.
    Returns:
      ``o [B, *spatial, H, Dv]`` in q's dtype.
    """
    spatial = check_grid_inputs(q, k, v, scale)
    p = _Problem(spatial, _check_axis(axis, causal, len(spatial)), causal, None if scale is None else float(scale))
    return AXIAL.call(impl, p, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))


def axial_reference(q: Float[ArrayLike, "B *spatial H Dk"], k: Float[ArrayLike, "B *spatial K Dk"],
                    v: Float[ArrayLike, "B *spatial K Dv"], axis: int, *, causal: bool = False,
                    scale: float | None = None) -> Float[Array, "B *spatial H Dv"]:
    """Dense attention with :func:`axial_mask` (the spec; quadratic memory)."""
    return axial(q, k, v, axis, causal=causal, scale=scale, impl="reference")


def _no_reasons(platform, p) -> list[str]:
    return []


def _explain(q, k, v, axis, *, causal=False, scale=None, impl="auto", platform=None):
    spatial = check_grid_inputs(q, k, v, scale)
    return AXIAL.explain(impl, _Problem(spatial, _check_axis(axis, causal, len(spatial)), causal, scale), platform)


AXIAL.register("xla", _xla, _no_reasons)
AXIAL.register("reference", _reference, _no_reasons, auto=False)
register_explainer(axial, _explain)

# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="axial", family="local", title="Axial attention (one grid axis; 2-D / 3-D)",
    layer="attn_jax.nn.local_mixers:axial_mixer",
    papers=(Paper("Axial Attention in Multidimensional Transformers", 2019, "1912.12180", "Ho et al."),),
    summary="o_x = Σ_{y: y_b = x_b, b != a} softmax(scale q_x·k_y) v_y  (causal: y_a <= x_a)",
    op=axial, forms=("xla",), directions=("bidirectional",),
    notes="one axis per call; a layer composes the axes; the op also takes causal=True (the mixer is encoder-only)"))
