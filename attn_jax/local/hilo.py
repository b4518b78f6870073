"""HiLo attention (LITv2): high-frequency heads attend inside local windows, low-frequency heads
attend to average-pooled keys and values, on 1-, 2- and 3-D token grids.

Paper: Pan, Cai & Zhuang, "Fast Vision Transformers with HiLo Attention", 2022, arXiv:2205.13213.
The ``H`` heads are split in two groups.  The first ``H - lo_heads`` (Hi-Fi) run exact softmax
attention within non-overlapping windows of ``s`` tokens per axis (Swin's unshifted windows,
:func:`attn_jax.local.window_attention`).  The last ``lo_heads`` (Lo-Fi, ``alpha H`` in the
paper) let every query attend to all windows' *average-pooled* keys and values::

    o_x = Σ_w softmax_w(scale q_x · k̄_w) v̄_w,   k̄_w = mean_{y ∈ window w} k_y,   v̄_w likewise

The layer pools the input before its key / value projections; a linear (affine) projection
commutes with the mean, so pooling the projected ``k`` and ``v`` here is the same map.  The
outputs are concatenated Hi-Fi first, as LITv2.  GQA: ``k`` / ``v`` heads are split in the same
proportion (``lo_heads * K / H`` must be an integer).

Forms: ``"reference"`` -- the Hi-Fi heads as dense attention with :func:`window_mask`, the Lo-Fi
heads against keys pooled by an explicit averaging matrix; ``"xla"`` (auto) -- the window
partition of :func:`window_attention` and a reshape-mean pooling into :func:`attn_jax.attention`
(nothing of size ``N^2``).  Deviation: the grid must divide into windows (LITv2 pads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attn_jax.core import masks as M
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.dispatch import Registry, register_explainer
from attn_jax.local.neighborhood import check_grid_inputs
from attn_jax.local.window import window_attention, window_mask
from attn_jax.softmax import attention

__all__ = ["hilo_attention", "hilo_attention_reference", "pool_windows", "HILO"]

HILO = Registry("local.hilo_attention")


@dataclass(frozen=True)
class _Problem:
    spatial: tuple[int, ...]
    window: tuple[int, ...]
    lo_heads: int
    lo_kv_heads: int
    scale: float


def _check(spatial, window, lo_heads, H, K):
    d = len(spatial)
    if M.is_concrete_int(window):
        w = (int(window),) * d
    elif isinstance(window, (tuple, list)) and len(window) == d and all(M.is_concrete_int(x) for x in window):
        w = tuple(int(x) for x in window)
    else:
        raise TypeError(f"window: expected an int or a tuple of {d} ints (one per spatial axis), got {window!r}")
    if any(x < 1 or n % x for n, x in zip(spatial, w)):
        raise ValueError(f"window: expected positive sizes dividing the grid {spatial}, got {w}")
    if not M.is_concrete_int(lo_heads) or not 0 <= lo_heads <= H:
        raise ValueError(f"lo_heads: expected an int in [0, {H}] (the Lo-Fi heads), got {lo_heads!r}")
    if (lo_heads * K) % H:
        raise ValueError(f"lo_heads: expected lo_heads * K / H to be an integer (k/v heads split in the same "
                         f"proportion), got lo_heads={lo_heads}, H={H}, K={K}")
    return w, int(lo_heads), int(lo_heads) * K // H


def _split(p: _Problem, q, k, v):
    hq, hk = q.shape[-2] - p.lo_heads, k.shape[-2] - p.lo_kv_heads
    return (q[..., :hq, :], k[..., :hk, :], v[..., :hk, :]), (q[..., hq:, :], k[..., hk:, :], v[..., hk:, :])


def _pool_matrix(p: _Problem) -> np.ndarray:
    """``float[windows, N]``: row ``w`` averages the raster tokens of window ``w``."""
    N = math.prod(p.spatial)
    coords = np.stack(np.unravel_index(np.arange(N), p.spatial), 1)
    blocks = tuple(n // w for n, w in zip(p.spatial, p.window))
    ids = np.ravel_multi_index(tuple((coords // np.array(p.window)).T), blocks)
    P = np.zeros((N // math.prod(p.window), N))
    P[ids, np.arange(N)] = 1.0 / math.prod(p.window)
    return P


def _reference(p: _Problem, q, k, v):
    B, N, Dv = q.shape[0], math.prod(p.spatial), v.shape[-1]
    flat = lambda x: x.reshape(B, N, *x.shape[-2:])  # noqa: E731
    (qh, kh, vh), (ql, kl, vl) = _split(p, q, k, v)
    outs = []
    if qh.shape[-2]:
        m = M.dense(jnp.asarray(window_mask(p.spatial, p.window))[None, None])
        outs.append(attention(flat(qh), flat(kh), flat(vh), mask=m, scale=p.scale, impl="reference"))
    if p.lo_heads:
        P = jnp.asarray(_pool_matrix(p), jnp.float32)
        pool = lambda x: jnp.einsum("wn,bnkd->bwkd", P, flat(x).astype(jnp.float32)).astype(x.dtype)  # noqa: E731
        outs.append(attention(flat(ql), pool(kl), pool(vl), scale=p.scale, impl="reference"))
    return jnp.concatenate(outs, axis=-2).reshape(*q.shape[:-1], Dv)


def pool_windows(x: Float[ArrayLike, "B *spatial K D"], window: tuple[int, ...], valid=None
                 ) -> tuple[Float[Array, "B W K D"], Float[Array, "B W"]]:
    """Mean of ``x [B, *grid, K, D]`` over each window of ``window`` tokens per axis (float32
    accumulation): ``(pooled [B, windows, K, D], count [B, windows])``.  A grid that does not divide
    into windows is padded at its end; with ``valid`` (``bool [B, *grid]``) only valid tokens are
    averaged (``count`` of them per window; a window without any has a zero mean)."""
    x = jnp.asarray(x)
    d = len(window)
    grid = x.shape[1:1 + d]
    valid = jnp.ones(x.shape[:1 + d], bool) if valid is None else jnp.asarray(valid, bool)
    pad = [(0, -n % w) for n, w in zip(grid, window)]
    xs = jnp.pad(x.astype(jnp.float32) * valid[..., None, None], [(0, 0), *pad, (0, 0), (0, 0)])
    vs = jnp.pad(valid.astype(jnp.float32), [(0, 0), *pad])
    padded = tuple(n + p for n, (_, p) in zip(grid, pad))
    blocks = sum(((n // w, w) for n, w in zip(padded, window)), ())
    axes = tuple(range(2, 2 + 2 * d, 2))
    total = xs.reshape(x.shape[0], *blocks, *x.shape[-2:]).sum(axes)
    count = vs.reshape(x.shape[0], *blocks).sum(axes)
    mean = total / jnp.maximum(count, 1.0)[..., None, None]
    return mean.reshape(x.shape[0], -1, *x.shape[-2:]).astype(x.dtype), count.reshape(x.shape[0], -1)


def _xla(p: _Problem, q, k, v):
    B, N, Dv = q.shape[0], math.prod(p.spatial), v.shape[-1]
    (qh, kh, vh), (ql, kl, vl) = _split(p, q, k, v)
    outs = []
    if qh.shape[-2]:
        outs.append(window_attention(qh, kh, vh, p.window, scale=p.scale))
    if p.lo_heads:
        o = attention(ql.reshape(B, N, *ql.shape[-2:]), pool_windows(kl, p.window)[0], pool_windows(vl, p.window)[0],
                      scale=p.scale)
        outs.append(o.reshape(*ql.shape[:-1], Dv))
    return jnp.concatenate(outs, axis=-2)


def hilo_attention(q: Float[ArrayLike, "B *spatial H Dk"], k: Float[ArrayLike, "B *spatial K Dk"],
                   v: Float[ArrayLike, "B *spatial K Dv"], window, *, lo_heads: int, scale: float | None = None,
                   impl="auto") -> Float[Array, "B *spatial H Dv"]:
    """HiLo attention (module docstring) on a 1-, 2- or 3-D grid.

    Args:
      q, k, v: ``[B, *spatial, H, Dk]``, ``[B, *spatial, K, Dk]``, ``[B, *spatial, K, Dv]`` (GQA).
      window: the window size ``s`` per axis (int or tuple), dividing the grid.
      lo_heads: the number of Lo-Fi heads (the last ones; LITv2: ``int(alpha * H)``), ``0 .. H``.
      scale: logit scale, default ``Dk ** -0.5``.
      impl: ``"auto"`` (= ``"xla"``), ``"xla"``, ``"reference"`` or a sequence.
    Returns:
      ``o [B, *spatial, H, Dv]`` in q's dtype: Hi-Fi heads first, then Lo-Fi.
    """
    spatial = check_grid_inputs(q, k, v, scale)
    H, K = jnp.shape(q)[-2], jnp.shape(k)[-2]
    w, lo, lo_kv = _check(spatial, window, lo_heads, H, K)
    p = _Problem(spatial, w, lo, lo_kv, float(jnp.shape(q)[-1] ** -0.5 if scale is None else scale))
    return HILO.call(impl, p, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))


def hilo_attention_reference(q: Float[ArrayLike, "B *spatial H Dk"], k: Float[ArrayLike, "B *spatial K Dk"],
                             v: Float[ArrayLike, "B *spatial K Dv"], window, *, lo_heads: int,
                             scale: float | None = None) -> Float[Array, "B *spatial H Dv"]:
    """Dense masked attention (Hi-Fi) and attention over matrix-pooled keys (Lo-Fi): the spec."""
    return hilo_attention(q, k, v, window, lo_heads=lo_heads, scale=scale, impl="reference")


def _no_reasons(platform, p) -> list[str]:
    return []


def _explain(q, k, v, window, *, lo_heads, scale=None, impl="auto", platform=None):
    spatial = check_grid_inputs(q, k, v, scale)
    w, lo, lo_kv = _check(spatial, window, lo_heads, q.shape[-2], k.shape[-2])
    return HILO.explain(impl, _Problem(spatial, w, lo, lo_kv, 1.0), platform)


HILO.register("xla", _xla, _no_reasons)
HILO.register("reference", _reference, _no_reasons, auto=False)
register_explainer(hilo_attention, _explain)

# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="hilo", family="local", title="HiLo attention (LITv2: windowed Hi-Fi heads + pooled-key Lo-Fi heads)",
    papers=(Paper("Fast Vision Transformers with HiLo Attention", 2022, "2205.13213", "Pan, Cai & Zhuang"),),
    summary="Hi-Fi heads: softmax inside s-windows; Lo-Fi heads: every query vs the windows' mean-pooled k, v",
    op=hilo_attention, forms=("xla",), directions=("bidirectional",), layer="attn_jax.nn.local_mixers:hilo_mixer",
    notes="grid must divide into windows (LITv2 pads)"))
