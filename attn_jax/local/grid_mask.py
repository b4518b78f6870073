"""A static mask over the raster-flattened tokens of a grid, defined by a rule on token
coordinates, for the tiled XLA path of exact attention (:func:`attn_jax.softmax.xla.attention_blockwise`).

A subclass writes :meth:`GridMask.rule` once, for NumPy and ``jax.numpy`` (``xp``), on the
coordinates ``[d, ...]`` of query and key tokens.  The base class gives the rest of the
:class:`attn_jax.masks.Mask` protocol: ``materialize`` (through ``predicate``), an exact
``classify`` computed in NumPy at trace time one query block at a time (no ``N x N`` array), and
the token order of a tile engine run (raster, or the blocked order of
:func:`attn_jax.local.neighborhood.token_order`).  :func:`tiled_attention` runs a grid mask
through the tile engine, in the order that makes its tiles compact spatial blocks when the grid
divides into them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.core import masks as M
from attn_jax.core.bias import StructuredBias
from attn_jax.local.neighborhood import from_order, tile_shape, to_order, token_order
from attn_jax.softmax import attention
from attn_jax.softmax.xla import attention_blockwise

__all__ = ["GridMask", "GridRelativeBias", "tiled_attention", "dense_grid_mask"]


@dataclass(frozen=True)
class GridMask(M.Mask):
    """Base of rule-defined grid masks (module docstring).  Fields: ``spatial`` (the grid) and
    ``block`` (None: raster token order; a spatial tile shape: the blocked order)."""

    spatial: tuple[int, ...]
    block: tuple[int, ...] | None = None

    is_static = True

    def rule(self, xq, xk, xp):
        """``bool`` visibility of keys at coordinates ``xk [d, ...]`` to queries at ``xq [d, ...]``."""
        raise NotImplementedError(f"{type(self).__name__} must define rule(xq, xk, xp) (its visibility rule)")

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    def _coords(self, idx, xp):
        return _raster_coords(xp.asarray(token_order(self.spatial, self.block))[idx], self.spatial, xp)  # [d, n]

    def check(self, B, H, T, S):
        if T != self.tokens or S != self.tokens:
            raise ValueError(f"mask: the {type(self).__name__} of grid {self.spatial} needs T = S = {self.tokens}, "
                             f"got T={T}, S={S}")

    def predicate(self, q_idx, k_idx, T, S):
        qi = jnp.clip(jnp.asarray(q_idx), 0, self.tokens - 1)
        kj = jnp.clip(jnp.asarray(k_idx), 0, self.tokens - 1)
        return self.rule(self._coords(qi, jnp)[:, :, None], self._coords(kj, jnp)[:, None, :], jnp)[None, None]

    def classify(self, T, S, bq, bk):
        for name, b in (("bq", bq), ("bk", bk)):
            if not M.is_concrete_int(b) or b <= 0:
                raise ValueError(f"block size {name} must be a positive int, got {b!r}")
        self.check(1, 1, T, S)
        return _classify(self, int(bq), int(bk))[None, None]


@functools.lru_cache(maxsize=64)
def _classify(mask: GridMask, bq: int, bk: int) -> np.ndarray:
    N = mask.tokens
    nq, nk = -(-N // bq), -(-N // bk)
    ck = mask._coords(np.arange(N), np)
    pad = nk * bk - N
    cls = np.empty((nq, nk), np.int8)
    for i in range(nq):
        cq = mask._coords(np.arange(i * bq, min((i + 1) * bq, N)), np)
        vis = mask.rule(cq[:, :, None], ck[:, None, :], np)
        n = vis.shape[0]
        vis_any = np.pad(vis, ((0, 0), (0, pad)), constant_values=False).reshape(n, nk, bk).any(axis=(0, 2))
        vis_all = np.pad(vis, ((0, 0), (0, pad)), constant_values=True).reshape(n, nk, bk).all(axis=(0, 2))
        cls[i] = np.where(~vis_any, M.EMPTY, np.where(vis_all, M.FULL, M.PARTIAL))
    cls.flags.writeable = False
    return cls


def dense_grid_mask(mask: GridMask) -> np.ndarray:
    """``bool[N, N]`` (NumPy) of ``mask`` over raster-flattened tokens (references and tests)."""
    c = replace(mask, block=None)._coords(np.arange(mask.tokens), np)
    return mask.rule(c[:, :, None], c[:, None, :], np)


def dense_grid_attention(mask, q, k, v, *, scale: float | None):
    """Reference attention of grid tokens ``[B, *spatial, H|K, D]`` under the dense visibility
    ``mask`` (``bool[N, N]`` over raster-flattened tokens): the materialised form every local
    reference shares; returns ``[B, *spatial, H, Dv]``."""
    B, N = q.shape[0], int(np.shape(mask)[-1])
    flat = lambda x: x.reshape(B, N, *x.shape[-2:])  # noqa: E731
    m = M.dense(jnp.asarray(mask)[None, None])
    o = attention(flat(q), flat(k), flat(v), mask=m, scale=scale, impl="reference")
    return o.reshape(*q.shape[:-1], v.shape[-1])


def tiled_attention(mask: GridMask, q, k, v, *, scale: float, tile: int = 64, bias=None, return_lse: bool = False):
    """Exact attention of grid tokens ``[B, *spatial, H|K, D]`` under ``mask`` (its ``block`` is
    replaced by the blocked order of ``tile``-token tiles when the grid divides into them) on the
    tile engine; returns ``o [B, *spatial, H, Dv]`` (and ``lse [B, *spatial, H]``)."""
    spatial = mask.spatial
    tile = min(tile, mask.tokens)
    block = tile_shape(spatial, tile) if tile in (16, 32, 64, 128) else None
    mask = replace(mask, block=block)
    qo, ko, vo = (to_order(x, spatial, block) for x in (q, k, v))
    out = attention_blockwise(qo, ko, vo, mask=mask, bias=bias, scale=scale, block_q=tile, block_k=tile,
                              return_lse=return_lse)
    if not return_lse:
        return from_order(out, spatial, block)
    o, lse = out
    return from_order(o, spatial, block), from_order(lse[..., None], spatial, block)[..., 0]


@jax.tree_util.register_pytree_node_class
class GridRelativeBias(StructuredBias):
    """A learned relative position bias over flattened grid tokens (raster order):
    ``bias[h, x, y] = table[h, y_0 - x_0 + r_0, ..., y_{d-1} - x_{d-1} + r_{d-1}]`` (offsets clipped
    to ``[-r_a, r_a]``), ``table: [H, 2 r_0 + 1, ..., 2 r_{d-1} + 1]`` -- Swin's table with ``r = M - 1``.
    A pytree whose leaf is ``table`` (gradients reach it); evaluated per tile."""

    def __init__(self, table, spatial: tuple[int, ...]):
        self.table, self.spatial = table, tuple(spatial)

    @property
    def num_heads(self) -> int:
        return int(jnp.shape(self.table)[0])

    def tree_flatten(self):
        return (self.table,), self.spatial

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], aux)

    def tile(self, q_idx, k_idx, T, S):
        shape = jnp.shape(self.table)[1:]
        n = math.prod(self.spatial)
        cq = _raster_coords(jnp.clip(jnp.asarray(q_idx), 0, n - 1), self.spatial, jnp)
        ck = _raster_coords(jnp.clip(jnp.asarray(k_idx), 0, n - 1), self.spatial, jnp)
        idx = tuple(jnp.clip(ck[a][None, :] - cq[a][:, None] + (m - 1) // 2, 0, m - 1) for a, m in enumerate(shape))
        return jnp.asarray(self.table, jnp.float32)[(slice(None), *idx)][None]


def _raster_coords(idx, spatial, xp):
    out, rest = [], idx
    for n in reversed(spatial):
        out.append(rest % n)
        rest = rest // n
    return xp.stack(out[::-1])
