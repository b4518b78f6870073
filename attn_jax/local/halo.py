"""Blocked local self-attention with a halo (HaloNet) on 1-, 2- and 3-D token grids.

Paper: Vaswani, Ramachandran, Srinivas, Parmar, Hechtman & Shlens, "Scaling Local Self-Attention
for Parameter Efficient Visual Backbones", 2021, arXiv:2103.12731.  The grid is cut into
non-overlapping query blocks of ``b`` tokens per axis; every query of a block attends, with exact
softmax, to the keys of the block grown by a halo of ``h`` tokens on each side: on every axis,
query ``x`` sees key ``y`` iff::

    s(x) - h <= y <= s(x) + b - 1 + h,   s(x) = b * (x // b)

so all queries of a block share one window of ``(b + 2 h)`` tokens per axis.  At the grid
borders the window reaches past the grid; HaloNet pads the feature map with zeros there and does
*not* mask the padding (its ablation found the unmasked form more accurate), so the padded
positions are keys and values equal to zero: each adds ``exp(0)`` to the softmax denominator and
nothing to the numerator.  ``padding="zeros"`` (default) is that; ``padding="masked"`` hides them
(every query then sees only real tokens).

Forms (``impl``):

* ``"reference"``: HaloNet's algorithm -- pad k and v with ``h`` zeros per side, gather every
  block's haloed window ``[B, blocks, (b + 2h)^d, K, D]``, dense softmax per block (the padding
  masked for ``padding="masked"``).
* ``"tiled"`` (auto): a :class:`HaloMask` over the flattened tokens on the tile engine
  (:func:`attn_jax.local.grid_mask.tiled_attention`: EMPTY tiles skipped, linear memory); for
  ``padding="zeros"`` the padding's share is merged exactly through the log-sum-exp: per query a
  part with output 0 and ``lse = log(n_pad(x))``, ``n_pad`` the padded positions of its window
  (:func:`attn_jax.merge_attention`).

The grid must divide into blocks (as HaloNet).  HaloNet's relative position embeddings and its
strided (down-sampling) variant are not included.
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
from attn_jax.local.grid_mask import GridMask, dense_grid_mask, tiled_attention
from attn_jax.local.neighborhood import check_grid_inputs
from attn_jax.softmax import attention, merge_attention

__all__ = ["halo_attention", "halo_attention_reference", "HaloMask", "halo_mask", "HALO"]

HALO = Registry("local.halo_attention")
PADDINGS = ("zeros", "masked")


@dataclass(frozen=True)
class HaloMask(GridMask):
    """HaloNet's visibility (module docstring) as a mask over flattened grid tokens."""

    block_size: tuple[int, ...] = ()
    halo: tuple[int, ...] = ()

    def rule(self, xq, xk, xp):
        b = xp.asarray(self.block_size).reshape((-1,) + (1,) * (xq.ndim - 1))
        h = xp.asarray(self.halo).reshape((-1,) + (1,) * (xq.ndim - 1))
        s = (xq // b) * b
        return ((s - h <= xk) & (xk <= s + b - 1 + h)).all(0)


jax.tree_util.register_static(HaloMask)


def _per_axis(name, value, d):
    if M.is_concrete_int(value):
        return (int(value),) * d
    if isinstance(value, (tuple, list)) and len(value) == d and all(M.is_concrete_int(x) for x in value):
        return tuple(int(x) for x in value)
    raise TypeError(f"{name}: expected an int or a tuple of {d} ints (one per spatial axis), got {value!r}")


def _check(spatial, block_size, halo, padding):
    d = len(spatial)
    b, h = _per_axis("block_size", block_size, d), _per_axis("halo", halo, d)
    if any(x < 1 or n % x for n, x in zip(spatial, b)):
        raise ValueError(f"block_size: expected positive sizes dividing the grid {spatial}, got {b}")
    if any(x < 0 for x in h):
        raise ValueError(f"halo: expected sizes >= 0, got {h}")
    if padding not in PADDINGS:
        raise ValueError(f"padding: expected one of {PADDINGS}, got {padding!r}")
    return b, h


def halo_mask(spatial, block_size, halo) -> Bool[np.ndarray, "N N"]:
    """``bool[N, N]`` (NumPy) of HaloNet's visibility over raster-flattened tokens (real tokens
    only; quadratic: references and tests)."""
    spatial = tuple(int(n) for n in spatial)
    b, h = _check(spatial, block_size, halo, "masked")
    return dense_grid_mask(HaloMask(spatial, None, b, h))


@dataclass(frozen=True)
class _Problem:
    spatial: tuple[int, ...]
    block_size: tuple[int, ...]
    halo: tuple[int, ...]
    padding: str
    scale: float


def _window_tables(p: _Problem):
    """Per axis ``int[n // b, b + 2h]``: the haloed window of each block in padded coordinates."""
    return [((np.arange(n // b) * b)[:, None] + np.arange(b + 2 * h)[None, :]).astype(np.int32)
            for n, b, h in zip(p.spatial, p.block_size, p.halo)]


def _blocks(x, p: _Problem, tables, sizes):
    """``[B, *grid', K, D]`` -> ``[B, blocks, prod(sizes), K, D]`` by per-axis index tables."""
    d = len(p.spatial)
    for a in range(d):
        x = jnp.take(x, jnp.asarray(tables[a]), axis=1 + 2 * a)
    B, K, D = x.shape[0], x.shape[-2], x.shape[-1]
    perm = (0, *range(1, 1 + 2 * d, 2), *range(2, 2 + 2 * d, 2), 1 + 2 * d, 2 + 2 * d)
    return x.transpose(perm).reshape(B, -1, math.prod(sizes), K, D)


def _reference(p: _Problem, q, k, v):
    d, B, H = len(p.spatial), q.shape[0], q.shape[-2]
    pad = ((0, 0), *((h, h) for h in p.halo), (0, 0), (0, 0))
    kp, vp = jnp.pad(k, pad), jnp.pad(v, pad)                 # HaloNet's zero padding
    win = _window_tables(p)
    own = [(np.arange(n // b) * b)[:, None] + np.arange(b)[None, :] for n, b in zip(p.spatial, p.block_size)]
    qb = _blocks(q, p, own, p.block_size)                     # [B, nb, b^d, H, Dk]
    kb = _blocks(kp, p, win, [b + 2 * h for b, h in zip(p.block_size, p.halo)])
    vb = _blocks(vp, p, win, [b + 2 * h for b, h in zip(p.block_size, p.halo)])
    nb = qb.shape[1]
    mask = None
    if p.padding == "masked":
        real = np.ones((1, 1), bool)
        for t, n, h in zip(win, p.spatial, p.halo):
            ra = (t >= h) & (t < n + h)                           # [nb_a, w_a]
            real = (real[:, None, :, None] & ra[None, :, None, :]).reshape(real.shape[0] * ra.shape[0], -1)
        mask = M.dense(jnp.asarray(np.tile(real[:, None, None, :], (B, 1, 1, 1))))
    fold = lambda x: x.reshape(B * nb, *x.shape[2:])  # noqa: E731
    o = attention(fold(qb), fold(kb), fold(vb), mask=mask, scale=p.scale, impl="reference")
    o = o.reshape(B, *(n // b for n, b in zip(p.spatial, p.block_size)), *p.block_size, H, -1)
    perm = (0, *sum(((1 + a, 1 + d + a) for a in range(d)), ()), 1 + 2 * d, 2 + 2 * d)
    return o.transpose(perm).reshape(*q.shape[:-1], v.shape[-1])


def padded_keys(p: _Problem) -> np.ndarray:
    """``int[*spatial]``: per query the number of padded (outside the grid) positions of its window."""
    total, real = 1, np.ones((), np.int64)
    for a, (n, b, h) in enumerate(zip(p.spatial, p.block_size, p.halo)):
        s = (np.arange(n) // b) * b
        ra = np.minimum(s + b - 1 + h, n - 1) - np.maximum(s - h, 0) + 1
        real = real[..., None] * ra
        total *= b + 2 * h
    return total - real


def _tiled(p: _Problem, q, k, v):
    mask = HaloMask(p.spatial, None, p.block_size, p.halo)
    zeros = p.padding == "zeros" and bool(padded_keys(p).any())
    out = tiled_attention(mask, q, k, v, scale=p.scale, return_lse=zeros)
    if not zeros:
        return out
    o, lse = out
    n_pad = np.broadcast_to(padded_keys(p)[None, ..., None], lse.shape)
    lse_pad = jnp.asarray(np.where(n_pad > 0, np.log(np.maximum(n_pad, 1)), -np.inf), jnp.float32)
    B, H, N = o.shape[0], o.shape[-2], math.prod(p.spatial)
    flat = lambda x: x.reshape(B, N, H, *x.shape[1 + len(p.spatial) + 1:])  # noqa: E731
    merged = merge_attention([(flat(o), flat(lse)), (jnp.zeros_like(flat(o)), flat(lse_pad))])
    return merged.reshape(o.shape)


def halo_attention(q: Float[ArrayLike, "B *spatial H Dk"], k: Float[ArrayLike, "B *spatial K Dk"],
                   v: Float[ArrayLike, "B *spatial K Dv"], block_size, halo, *, padding: str = "zeros",
                   scale: float | None = None, impl="auto") -> Float[Array, "B *spatial H Dv"]:
    """HaloNet blocked local attention (module docstring) on a 1-, 2- or 3-D grid.

    Args:
      q, k, v: ``[B, *spatial, H, Dk]``, ``[B, *spatial, K, Dk]``, ``[B, *spatial, K, Dv]`` (GQA).
      block_size: query block size per axis (int or tuple), dividing the grid.
      halo: halo per side and axis (int or tuple, >= 0).
      padding: ``"zeros"`` (HaloNet: zero keys/values past the border, attended) or ``"masked"``.
      scale: logit scale, default ``Dk ** -0.5``.
      impl: ``"auto"`` (= ``"tiled"``), ``"tiled"``, ``"reference"`` or a sequence.
    Returns:
      ``o [B, *spatial, H, Dv]`` in q's dtype.
    """
    spatial = check_grid_inputs(q, k, v, scale)
    b, h = _check(spatial, block_size, halo, padding)
    p = _Problem(spatial, b, h, padding, float(jnp.shape(q)[-1] ** -0.5 if scale is None else scale))
    return HALO.call(impl, p, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))


def halo_attention_reference(q: Float[ArrayLike, "B *spatial H Dk"], k: Float[ArrayLike, "B *spatial K Dk"],
                             v: Float[ArrayLike, "B *spatial K Dv"], block_size, halo, *, padding: str = "zeros",
                             scale: float | None = None) -> Float[Array, "B *spatial H Dv"]:
    """HaloNet's padded, blocked algorithm with a dense softmax per block (the spec)."""
    return halo_attention(q, k, v, block_size, halo, padding=padding, scale=scale, impl="reference")


def _no_reasons(platform, p) -> list[str]:
    return []


def _explain(q, k, v, block_size, halo, *, padding="zeros", scale=None, impl="auto", platform=None):
    spatial = check_grid_inputs(q, k, v, scale)
    b, h = _check(spatial, block_size, halo, padding)
    return HALO.explain(impl, _Problem(spatial, b, h, padding, 1.0), platform)


HALO.register("tiled", _tiled, _no_reasons)
HALO.register("reference", _reference, _no_reasons, auto=False)
register_explainer(halo_attention, _explain)

# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="halo", family="local", title="HaloNet blocked local attention with halo (1-, 2-, 3-D)",
    papers=(Paper("Scaling Local Self-Attention for Parameter Efficient Visual Backbones", 2021, "2103.12731",
                  "Vaswani et al."),),
    summary="queries of a b-block attend to the block + an h-token halo; zero padding past the border (unmasked)",
    op=halo_attention, forms=("tiled",), directions=("bidirectional",), layer="attn_jax.nn.local_mixers:halo_mixer",
    notes="no relative position embeddings; padding='masked' hides the border padding"))
