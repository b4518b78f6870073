"""Neighborhood attention (NA) on 1-, 2- and 3-D token grids: dilation, stride, per-axis causal.

Papers: Hassani, Walton, Li, Li & Shi, "Neighborhood Attention Transformer", 2022,
arXiv:2204.07143 (NA); Hassani & Shi, "Dilated Neighborhood Attention Transformer", 2022,
arXiv:2209.15001 (dilation); Hassani et al., "Faster Neighborhood Attention", 2024,
arXiv:2403.04690 (causal NA, the GEMM / fused forms); "Generalized Neighborhood Attention", 2025,
arXiv:2504.16922 (stride).  Query ``x`` of a grid ``[n_1, ..., n_d]`` attends, with exact softmax,
to the keys of its window ``N(x)``, a product of per-axis windows::

    o_x = Σ_{y ∈ N(x)} softmax_y(scale q_x · k_y) v_y,   N(x) = W_1(x_1) × ... × W_d(x_d)

The per-axis window rule is NATTEN's, checked against the source of SHI-Labs/NATTEN (the mask of
its Flex backend, ``src/natten/backends/flex.py``, and the argument checks of
``src/natten/utils/checks.py``; notes in ``shared/reference/anchors.md``).  On an axis of length
``n`` with kernel ``k``, dilation ``δ`` and stride ``s``:

* dilation: the axis splits into ``δ`` interleaved groups (residues ``r = x mod δ``); a query only
  sees keys of its own group, and everything below is in group coordinates ``i = x // δ``
  on a group of length ``n_r = ceil((n - r) / δ)``;
* stride: queries ``i`` with the same ``i // s`` share the window of their group *leader*;
* non-causal: the leader is the centre-most member, ``min((i // s) s + s // 2, n_r - 1)``; with
  ``left = k // 2``, ``right = k // 2 + k % 2 - 1`` (even ``k``: one fewer on the right) the
  window centre is ``clamp(leader, left, n_r - 1 - right)`` and the window is
  ``[centre - left, centre + right]``: at borders the window is *shifted*, never truncated, so
  every query sees exactly ``k`` keys per axis (``prod(k)`` in all);
* causal: the leader is the last member, ``min((i // s) s + s - 1, n_r - 1)``, and key ``j`` is
  visible iff ``j <= i`` and ``leader - j < k`` (near the start a query sees fewer than ``k``).

Constraints, as NATTEN: ``k * δ <= n`` per axis (so ``n_r >= k``), ``1 <= s <= k``.  Even kernels
are allowed with and without causal masking (NATTEN's causal rule does not need a centre).
Deviation from NATTEN: kernel size 1 is accepted (NATTEN asks for >= 2); it is well defined.

Forms (``impl``):

* ``"reference"``: :func:`neighborhood_mask` (``bool[N, N]`` over raster-flattened tokens) and
  a dense softmax -- the spec the tests trust (quadratic memory).
* ``"tiled"`` (auto): a :class:`NeighborhoodMask` on the flattened tokens through the tiled XLA
  path of exact attention (:func:`attn_jax.softmax.xla.attention_blockwise`), whose tile
  schedule skips the EMPTY tiles (classification computed exactly in NumPy at trace time) and
  whose custom VJP keeps memory linear.  Tokens may be reordered so that a tile is a compact
  spatial block (e.g. 4 x 8 or 8 x 8 tokens in 2-D) and put back afterwards; :func:`tiled_order`
  picks the order and tile size from the exact tile counts and a fitted per-tile cost.  It is
  also the route to the flash / Pallas kernels (block lists + in-tile predicate).
* ``"gather"``: per axis a NumPy table of the ``k`` key indices of every position (``[n, k]``,
  plus validity for causal); keys and values are gathered axis by axis into
  ``[B, N, prod(k), K, D]`` and the softmax runs over ``prod(k)`` keys per query.  FLOPs at the
  sparsity bound, but the gathered copies are ``prod(k)`` times the size of k and v and the
  contraction is a batch of tiny matrix-vector products; autodiff's backward scatter-adds.  It
  serves per-row ``lengths`` (1-D right padding), which the tiled form does not.

Which wins (``python -m benchmarks.local``, shared 2-core CPU, B=1, H=4, D=32, fwd+bwd; see
``results/bench/local.json`` for the 64 x 64 numbers): the tiled form, everywhere measured.  On
64 x 64 tokens the gather form is slower than *dense* attention (k=7: ~1x dense wall time at
31x dense's temporary memory; k=13: 0.3-0.4x), on 32 x 32 it is 0.5-2x dense, and only on
16 x 16 with k=3 is it within 1.4x of the tiled form.  The tiled form computes whole tiles around
each window (``work_over_needed`` in the JSON: 5.2x the needed pairs for k=7, 2.9x for k=13) and
pays a fixed cost per tile, so it stays well short of the FLOP-sparsity bound ``N / prod(k)`` on
CPU (7.7x / 5.7x dense by CPU time against bounds of 83.6x / 24.2x).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from attn_jax.core import masks as M
from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.bias import StructuredBias
from attn_jax.core.dispatch import Registry, register_explainer
from attn_jax.softmax import attention, merge_attention
from attn_jax.softmax.xla import attention_blockwise

__all__ = ["neighborhood", "neighborhood_reference", "neighborhood_mask", "NeighborhoodSpec", "NeighborhoodMask",
           "neighborhood_spec", "axis_windows", "tile_shape", "token_order", "tiled_order", "window_rule",
           "NeighborhoodBias", "rpb_index", "check_grid_inputs", "to_order", "from_order", "NEIGHBORHOOD"]

NEIGHBORHOOD = Registry("local.neighborhood")


# ----------------------------------------------------------------------------- the window rule


def window_rule(x, n, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = False, xp=np):
    """NATTEN's window rule on one axis (module docstring) for positions ``x`` of an axis of
    length ``n`` (``n`` may be an array broadcasting with ``x``: per-row lengths).

    Returns ``(r, g, lo, hi)``: each position's dilation group ``r = x mod dilation``, its group
    coordinate ``g = x // dilation`` and the inclusive bounds ``[lo, hi]`` of its window in group
    coordinates (key ``y`` is visible iff ``y mod dilation == r`` and ``lo <= y // dilation <=
    hi``).  Written once for NumPy (static tables) and ``jax.numpy`` (traced lengths).  When the
    group is shorter than the kernel (only with per-row lengths) the window is the whole group.
    """
    r = x % dilation
    i = x // dilation
    n_r = (n - r + dilation - 1) // dilation
    if causal:
        leader = xp.minimum((i // stride) * stride + stride - 1, n_r - 1)
        return r, i, xp.maximum(leader - kernel + 1, 0), i
    left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
    leader = xp.minimum((i // stride) * stride + stride // 2, n_r - 1)
    centre = xp.minimum(xp.maximum(leader, left), n_r - 1 - right)
    return r, i, xp.maximum(centre - left, 0), xp.minimum(centre + right, n_r - 1)


@functools.lru_cache(maxsize=256)
def axis_windows(n: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = False):
    """:func:`window_rule` on a whole axis as NumPy tables.

    Returns ``(keys int32[n, kernel], valid bool[n, kernel], lo int32[n], hi int32[n])``: the
    key indices (original coordinates) of every query's window, whether each is visible
    (always true without causal masking), and the inclusive window bounds in *group*
    coordinates (``x // dilation``) used by the predicate.  Arguments are assumed validated.
    """
    x = np.arange(n)
    r, i, lo, hi = window_rule(x, n, kernel, dilation, stride, causal)
    start = hi - kernel + 1 if causal else lo        # causal windows end at the query
    kg = start[:, None] + np.arange(kernel)[None, :]
    valid = (kg >= lo[:, None]) & (kg <= hi[:, None])
    keys = np.where(valid, kg * dilation + r[:, None], x[:, None])   # invalid slots: the query (masked anyway)
    keys, lo, hi = keys.astype(np.int32), lo.astype(np.int32), hi.astype(np.int32)
    for a in (keys, valid, lo, hi):
        a.flags.writeable = False
    return keys, valid, lo, hi


@dataclass(frozen=True)
class NeighborhoodSpec:
    """Validated static configuration: per-axis tuples of the grid and the NA parameters."""

    spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    causal: tuple[bool, ...]

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    @property
    def window(self) -> int:
        return math.prod(self.kernel_size)

    def axis(self, a: int):
        """:func:`axis_windows` of axis ``a``."""
        return axis_windows(self.spatial[a], self.kernel_size[a], self.dilation[a], self.stride[a], self.causal[a])


def _per_axis(name: str, value, d: int, *, kind=int) -> tuple:
    if kind is bool:
        ok = lambda x: isinstance(x, (bool, np.bool_))  # noqa: E731
        what = "a bool"
    else:
        ok = M.is_concrete_int
        what = "an int"
    if ok(value):
        return (kind(value),) * d
    if isinstance(value, (tuple, list)) and all(ok(x) for x in value):
        if len(value) != d:
            raise ValueError(f"{name}: expected {what} or a tuple of {d} (one per spatial axis), "
                             f"got {tuple(value)} of length {len(value)}")
        return tuple(kind(x) for x in value)
    raise TypeError(f"{name}: expected {what} or a tuple of {d} (one per spatial axis), got {value!r}")


def neighborhood_spec(spatial, kernel_size, dilation=1, stride=1, causal=False) -> NeighborhoodSpec:
    """Validate NA parameters for a grid ``spatial`` (1 to 3 axes); ints broadcast to every axis."""
    spatial = tuple(int(n) for n in spatial)
    d = len(spatial)
    if not 1 <= d <= 3:
        raise ValueError(f"q: expected 1, 2 or 3 spatial axes ([B, *spatial, H, D], rank 4 to 6), got {d} "
                         f"spatial axes {spatial}")
    ks = _per_axis("kernel_size", kernel_size, d)
    dil = _per_axis("dilation", dilation, d)
    st = _per_axis("stride", stride, d)
    ca = _per_axis("causal", causal, d, kind=bool)
    for a in range(d):
        if ks[a] < 1:
            raise ValueError(f"kernel_size: expected >= 1 on every axis, got {ks}")
        if dil[a] < 1:
            raise ValueError(f"dilation: expected >= 1 on every axis, got {dil}")
        if st[a] < 1:
            raise ValueError(f"stride: expected >= 1 on every axis, got {st}")
        if ks[a] > spatial[a]:
            raise ValueError(f"kernel_size: expected <= the grid size on every axis, got kernel_size {ks} "
                             f"for spatial shape {spatial} (axis {a}: {ks[a]} > {spatial[a]})")
        if ks[a] * dil[a] > spatial[a]:
            raise ValueError(f"dilation: expected kernel_size * dilation <= the grid size on every axis, got "
                             f"kernel_size {ks} * dilation {dil} for spatial shape {spatial} "
                             f"(axis {a}: {ks[a] * dil[a]} > {spatial[a]})")
        if st[a] > ks[a]:
            raise ValueError(f"stride: expected <= kernel_size on every axis, got stride {st} with kernel_size {ks}")
    return NeighborhoodSpec(spatial, ks, dil, st, ca)


def _axis_mask(spec: NeighborhoodSpec, a: int) -> np.ndarray:
    keys, valid, _, _ = spec.axis(a)
    n = spec.spatial[a]
    m = np.zeros((n, n), bool)
    rows = np.broadcast_to(np.arange(n)[:, None], keys.shape)
    m[rows[valid], keys[valid]] = True
    return m


def neighborhood_mask(spatial, kernel_size, dilation=1, stride=1, causal=False) -> Bool[np.ndarray, "N N"]:
    """The NA visibility ``bool[N, N]`` (NumPy) over raster-flattened tokens, ``N = prod(spatial)``.

    Entry ``[x, y]`` says whether query ``x`` sees key ``y`` (the product of the per-axis windows of
    :func:`axis_windows`).  Quadratic: for references and tests.
    """
    spec = neighborhood_spec(spatial, kernel_size, dilation, stride, causal)
    m = np.ones((1, 1), bool)
    for a in range(spec.ndim):
        ma = _axis_mask(spec, a)
        n = ma.shape[0]
        m = (m[:, None, :, None] & ma[None, :, None, :]).reshape(m.shape[0] * n, m.shape[1] * n)
    return m


# ----------------------------------------------------------------------------- validation


def check_grid_inputs(q, k, v, scale) -> tuple[int, ...]:
    """Validate ``q [B, *spatial, H, Dk]``, ``k [B, *spatial, K, Dk]``, ``v [B, *spatial, K, Dv]`` (1 to 3
    spatial axes, GQA, one float dtype) and ``scale``; returns ``spatial``.  Errors name the argument."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        V.check_float_array(name, x)
    qs, ks, vs = jnp.shape(q), jnp.shape(k), jnp.shape(v)
    if not 4 <= len(qs) <= 6:
        raise ValueError(f"q: expected rank 4, 5 or 6 [B, *spatial, H, D] (1-, 2- or 3-D grid), got rank {len(qs)} "
                         f"with shape {V.shape_str(q)}")
    for name, s in (("k", ks), ("v", vs)):
        if len(s) != len(qs):
            raise ValueError(f"{name}: expected rank {len(qs)} like q ([B, *spatial, K, D]), got shape {s}")
        if s[:-2] != qs[:-2]:
            raise ValueError(f"{name}: expected batch and grid {qs[:-2]} like q, got shape {s}")
    H, K = qs[-2], ks[-2]
    if vs[-2] != K:
        raise ValueError(f"v: expected {K} heads like k, got shape {vs}")
    if K < 1 or H % K:
        raise ValueError(f"k: expected a head count dividing q's {H} heads (GQA), got {K} (shape {ks})")
    if ks[-1] != qs[-1]:
        raise ValueError(f"k: expected head_dim {qs[-1]} like q, got shape {ks}")
    if jnp.result_type(q) != jnp.result_type(k) or jnp.result_type(q) != jnp.result_type(v):
        raise TypeError(f"k, v: expected q's dtype {jnp.result_type(q)}, got {jnp.result_type(k)} and "
                        f"{jnp.result_type(v)}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    return tuple(qs[1:-2])


def _validate(q, k, v, kernel_size, dilation, stride, causal, scale):
    return neighborhood_spec(check_grid_inputs(q, k, v, scale), kernel_size, dilation, stride, causal)


@dataclass(frozen=True)
class _Problem:
    spec: NeighborhoodSpec
    scale: float
    has_lengths: bool = False
    has_rpb: bool = False
    return_lse: bool = False    # forms return (o, lse [B, *spatial, H]) for the merge with extra keys


# ----------------------------------------------------------------------------- reference


def _group(q, K):
    """``[B, N, H, D] -> [B, N, K, G, D]`` (query heads grouped by their key/value head)."""
    B, N, H, D = q.shape
    return q.reshape(B, N, K, H // K, D)


def _softmax_out(s, v_of, dtype, return_lse=False):
    """Safe softmax over the last axis of fp32 logits (-inf = hidden); ``v_of(p)`` contracts.
    With ``return_lse`` also the log-sum-exp over the last axis (``-inf`` where nothing is visible)."""
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))   # exact: the shift cancels
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    # no -inf enters exp (XLA:CPU's fast-compile exp gave NaN gradients there)
    visible = jnp.isfinite(s)
    e = jnp.where(visible, jnp.exp(jnp.where(visible, s - m, 0.0)), 0.0)
    l = e.sum(axis=-1, keepdims=True)
    p = e / jnp.where(l > 0, l, 1.0)
    if not return_lse:
        return v_of(p).astype(dtype)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
    return v_of(p).astype(dtype), lse


def _lengths_mask(spec: NeighborhoodSpec, lengths):
    """``bool[B, N, N]`` of a 1-D grid whose row ``b`` has ``lengths[b]`` valid tokens."""
    x = jnp.arange(spec.tokens)
    n = lengths[:, None]
    d = spec.dilation[0]
    r, _, lo, hi = window_rule(x[None, :], n, spec.kernel_size[0], d, spec.stride[0], spec.causal[0], xp=jnp)
    g_k = (x // d)[None, None, :]
    vis = ((x % d)[None, None, :] == r[..., None]) & (lo[..., None] <= g_k) & (g_k <= hi[..., None])
    valid = x[None, :] < n
    return vis & valid[:, :, None] & valid[:, None, :]


def _reference(p: _Problem, q, k, v, lengths=None, rpb=None):
    spec = p.spec
    B, H, Dv, K = q.shape[0], q.shape[-2], v.shape[-1], k.shape[-2]
    N = spec.tokens
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    qf = _group(q.reshape(B, N, H, -1), K)
    kf, vf = k.reshape(B, N, K, -1), v.reshape(B, N, K, Dv)
    if lengths is None:
        mask = jnp.asarray(neighborhood_mask(spec.spatial, spec.kernel_size, spec.dilation, spec.stride, spec.causal))
    else:
        mask = _lengths_mask(spec, lengths)[:, None, None]
    s = jnp.einsum("bnkgd,bmkd->bkgnm", qf, kf, preferred_element_type=acc) * p.scale
    if rpb is not None:
        s = s + NeighborhoodBias(rpb, spec).materialize(N, N).reshape(1, K, H // K, N, N).astype(acc)
    s = jnp.where(mask, s, -jnp.inf)
    out = _softmax_out(s, lambda pr: jnp.einsum("bkgnm,bmkd->bnkgd", pr, vf.astype(acc)), q.dtype, p.return_lse)
    if not p.return_lse:
        return out.reshape(q.shape[:-1] + (Dv,))
    o, lse = out                                           # lse [B, K, G, N]
    return o.reshape(q.shape[:-1] + (Dv,)), jnp.moveaxis(lse.reshape(B, H, N), 1, 2).reshape(q.shape[:-1])


def neighborhood_reference(q: Float[ArrayLike, "B *spatial H Dk"], k: Float[ArrayLike, "B *spatial K Dk"],
                           v: Float[ArrayLike, "B *spatial K Dv"], kernel_size, *, dilation=1, stride=1,
                           causal=False, scale: float | None = None,
                           lengths: Int[ArrayLike, " B"] | None = None,
                           rpb: Float[ArrayLike, "H *table"] | None = None) -> Float[Array, "B *spatial H Dv"]:
    """Materialised NA: :func:`neighborhood_mask` and a dense softmax (the spec; quadratic memory)."""
    return neighborhood(q, k, v, kernel_size, dilation=dilation, stride=stride, causal=causal, scale=scale,
                        lengths=lengths, rpb=rpb, impl="reference")


# ----------------------------------------------------------------------------- gather form


@functools.lru_cache(maxsize=64)
def _gather_tables(spec: NeighborhoodSpec):
    """Per axis the key table ``[n, k]``; the joint validity ``bool[N, W]`` (None if all valid)."""
    keys = tuple(spec.axis(a)[0] for a in range(spec.ndim))
    if not any(spec.causal):
        return keys, None
    valid = np.ones((1, 1), bool)
    for a in range(spec.ndim):
        va = spec.axis(a)[1]
        n, kk = va.shape
        valid = (valid[:, None, :, None] & va[None, :, None, :]).reshape(valid.shape[0] * n, valid.shape[1] * kk)
    return keys, valid


def _gather_windows(x, spec: NeighborhoodSpec, keys):
    """``[B, *grid, K, D] -> [B, N, W, K, D]``: every query's window, gathered axis by axis."""
    d = spec.ndim
    for a in range(d):
        # after a axes: [B, n_0, k_0, ..., n_{a-1}, k_{a-1}, n_a, ..., K, D]; axis a sits at 1 + 2a
        x = jnp.take(x, jnp.asarray(keys[a]), axis=1 + 2 * a)
    B, Kh, D = x.shape[0], x.shape[-2], x.shape[-1]
    perm = (0, *range(1, 1 + 2 * d, 2), *range(2, 2 + 2 * d, 2), 1 + 2 * d, 2 + 2 * d)
    return x.transpose(perm).reshape(B, spec.tokens, spec.window, Kh, D)


def _gather_rows(x, spec: NeighborhoodSpec, lengths):
    """1-D grid with per-row lengths: ``[B, N, K, D] -> [B, N, k, K, D]`` windows and ``bool[B, N, k]``."""
    kernel, d = spec.kernel_size[0], spec.dilation[0]
    pos = jnp.arange(spec.tokens)
    n = lengths[:, None]
    r, _, lo, hi = window_rule(pos[None, :], n, kernel, d, spec.stride[0], spec.causal[0], xp=jnp)
    start = hi - kernel + 1 if spec.causal[0] else lo
    kg = start[..., None] + jnp.arange(kernel)
    valid = (kg >= lo[..., None]) & (kg <= hi[..., None]) & (pos[None, :] < n)[..., None]
    keys = jnp.where(valid, kg * d + r[..., None], 0)
    B, N = x.shape[0], spec.tokens
    win = jnp.take_along_axis(x, keys.reshape(B, N * kernel)[:, :, None, None], axis=1)
    return win.reshape(B, N, kernel, *x.shape[2:]), valid, rpb_index(spec, 0, (pos // d)[None, :, None], kg, jnp)


@functools.lru_cache(maxsize=64)
def _gather_rpb_index(spec: NeighborhoodSpec):
    """Per axis the bias-table index of every (query, window slot): ``int32[N, W]`` each."""
    out = []
    for a in range(spec.ndim):
        keys = spec.axis(a)[0]
        n = spec.spatial[a]
        ia = rpb_index(spec, a, (np.arange(n) // spec.dilation[a])[:, None], keys // spec.dilation[a])
        # broadcast the axis table [n_a, k_a] to the joint [N, W] (raster queries, window slots)
        shape_q = [1] * spec.ndim
        shape_q[a] = n
        shape_w = [1] * spec.ndim
        shape_w[a] = spec.kernel_size[a]
        full = ia.reshape(*shape_q, *shape_w)
        out.append(np.broadcast_to(full, (*spec.spatial, *spec.kernel_size)).reshape(spec.tokens, spec.window))
    return tuple(out)


def _gather(p: _Problem, q, k, v, lengths=None, rpb=None):
    spec = p.spec
    B, H, Dv, K = q.shape[0], q.shape[-2], v.shape[-1], k.shape[-2]
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    qf = _group(q.reshape(B, spec.tokens, H, -1), K)
    if lengths is None:
        keys, valid = _gather_tables(spec)
        kw = _gather_windows(k, spec, keys)                 # [B, N, W, K, Dk]
        vw = _gather_windows(v, spec, keys)                 # [B, N, W, K, Dv]
        valid = None if valid is None else jnp.asarray(valid)[None]
        bias_idx = None if rpb is None else tuple(jnp.asarray(i)[None] for i in _gather_rpb_index(spec))
    else:
        kw, valid, idx0 = _gather_rows(k, spec, lengths)
        vw, _, _ = _gather_rows(v, spec, lengths)
        bias_idx = (idx0,)
    s = jnp.einsum("bnkgd,bnwkd->bnkgw", qf, kw, preferred_element_type=acc) * p.scale
    if rpb is not None:
        bias = jnp.asarray(rpb, acc)[(slice(None), *bias_idx)]          # [H, B|1, N, W]
        s = s + jnp.moveaxis(bias, 0, 2).reshape(bias.shape[1], spec.tokens, K, H // K, -1)
    if valid is not None:
        s = jnp.where(valid[:, :, None, None, :], s, -jnp.inf)
    out = _softmax_out(s, lambda pr: jnp.einsum("bnkgw,bnwkd->bnkgd", pr.astype(vw.dtype), vw,
                                                preferred_element_type=acc), q.dtype, p.return_lse)
    if not p.return_lse:
        return out.reshape(q.shape[:-1] + (Dv,))
    o, lse = out                                           # lse [B, N, K, G]
    return o.reshape(q.shape[:-1] + (Dv,)), lse.reshape(q.shape[:-1])


# ----------------------------------------------------------------------------- relative position bias


def rpb_index(spec: NeighborhoodSpec, a: int, g_q, g_k, xp=np):
    """Index into axis ``a`` of the bias table for query / key group coordinates (NAT's RPB:
    ``g_k - g_q + kernel - 1``, in ``[0, 2 kernel - 2]`` for visible pairs; clipped for others)."""
    k = spec.kernel_size[a]
    return xp.clip(g_k - g_q + k - 1, 0, 2 * k - 2)


@jax.tree_util.register_pytree_node_class
class NeighborhoodBias(StructuredBias):
    """NAT's relative position bias as a :class:`~attn_jax.core.bias.StructuredBias` over the
    flattened tokens (order of ``block`` as :class:`NeighborhoodMask`): ``bias[h, x, y] =
    table[h, rpb_index(axis 0), ..., rpb_index(axis d-1)]``, ``table: [H, 2 k_1 - 1, ..., 2 k_d - 1]``
    (a pytree whose leaf is ``table``: gradients reach it).  Relative offsets are in dilation-group
    coordinates (DiNAT)."""

    def __init__(self, table, spec: NeighborhoodSpec, block=None):
        self.table, self.spec, self.block = table, spec, block

    @property
    def num_heads(self) -> int:
        return int(jnp.shape(self.table)[0])

    def tree_flatten(self):
        return (self.table,), (self.spec, self.block)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    def tile(self, q_idx, k_idx, T, S):
        tab = jnp.asarray(_coordinate_tables(self.spec, self.block))
        qi = jnp.clip(jnp.asarray(q_idx), 0, self.spec.tokens - 1)
        kj = jnp.clip(jnp.asarray(k_idx), 0, self.spec.tokens - 1)
        idx = tuple(rpb_index(self.spec, a, tab[a, 1, qi][:, None], tab[a, 1, kj][None, :], jnp)
                    for a in range(self.spec.ndim))
        return jnp.asarray(self.table, jnp.float32)[(slice(None), *idx)][None]


def _check_rpb(rpb, spec: NeighborhoodSpec, H: int):
    if rpb is None:
        return None
    V.check_float_array("rpb", rpb)
    want = (H, *(2 * k - 1 for k in spec.kernel_size))
    if tuple(jnp.shape(rpb)) != want:
        raise ValueError(f"rpb: expected the relative position bias table [H, *(2 * kernel_size - 1)] = {list(want)}, "
                         f"got {list(jnp.shape(rpb))}")
    return jnp.asarray(rpb)


# ----------------------------------------------------------------------------- tiled form (mask)

#: Candidate tiles of the tiled form: tokens per tile -> the spatial block of a tile per grid rank
#: (used when the grid divides into it; raster order is always a candidate).
TILE_SHAPES = {
    16: {2: (4, 4), 3: (2, 2, 4)},
    32: {2: (4, 8), 3: (2, 4, 4)},
    64: {2: (8, 8), 3: (4, 4, 4)},
    128: {2: (8, 16), 3: (4, 4, 8)},
}

#: Fixed cost of visiting one tile in units of one (query, key) pair times one unit of width
#: ``B * H * (Dk + Dv) / 2``.  Fitted on the shared 2-core CPU (64 x 64 grid, B=1, H=4, D=32,
#: fwd+bwd CPU time, kernels 7 and 13, the candidates of :data:`TILE_SHAPES`): ~26 us per tile
#: against ~0.32 ns per pair and width unit, i.e. a tile costs as much as ~80k pair-units.
TILE_OVERHEAD = 81920


def tile_shape(spatial: tuple[int, ...], tokens: int = 64) -> tuple[int, ...] | None:
    """The spatial block of a ``tokens``-token tile for a grid ``spatial``, or None (raster order)
    for 1-D grids and grids that do not divide into it (:data:`TILE_SHAPES`)."""
    t = TILE_SHAPES[tokens].get(len(spatial))
    if t is None or any(n % b for n, b in zip(spatial, t)):
        return None
    return t


@functools.lru_cache(maxsize=64)
def token_order(spatial: tuple[int, ...], block: tuple[int, ...] | None) -> np.ndarray:
    """``int32[N]``: the raster index of the token at each position of the (blocked) order."""
    N = math.prod(spatial)
    raster = np.arange(N).reshape(spatial)
    if block is None:
        return raster.reshape(N).astype(np.int32)
    d = len(spatial)
    shape = sum(((n // b, b) for n, b in zip(spatial, block)), ())
    perm = (*range(0, 2 * d, 2), *range(1, 2 * d, 2))
    out = raster.reshape(shape).transpose(perm).reshape(N).astype(np.int32)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=64)
def _coordinate_tables(spec: NeighborhoodSpec, block):
    """Per position of the order: per axis (residue, group coordinate, window lo, window hi)."""
    order = token_order(spec.spatial, block)
    coords = np.unravel_index(order, spec.spatial)
    out = []
    for a in range(spec.ndim):
        x = coords[a]
        _, _, lo, hi = spec.axis(a)
        out.append(np.stack([x % spec.dilation[a], x // spec.dilation[a], lo[x], hi[x]]).astype(np.int32))
    return np.stack(out)   # [d, 4, N]


def _visible_np(spec, tables, qi, kj):
    vis = np.ones((len(qi), len(kj)), bool)
    for a in range(spec.ndim):
        r, g, lo, hi = tables[a]
        vis &= (r[qi][:, None] == r[kj][None, :]) & (lo[qi][:, None] <= g[kj][None, :]) & (
            g[kj][None, :] <= hi[qi][:, None])
    return vis


@functools.lru_cache(maxsize=64)
def _classify(spec: NeighborhoodSpec, block, bq: int, bk: int) -> np.ndarray:
    """Exact ``int8[nq, nk]`` tile labels in the order of ``block``, one query block at a time."""
    tables = _coordinate_tables(spec, block)
    N = spec.tokens
    nq, nk = -(-N // bq), -(-N // bk)
    cls = np.empty((nq, nk), np.int8)
    kj = np.arange(N)
    pad = nk * bk - N
    for i in range(nq):
        qi = np.arange(i * bq, min((i + 1) * bq, N))
        vis = _visible_np(spec, tables, qi, kj)
        vis_any = np.pad(vis, ((0, 0), (0, pad)), constant_values=False).reshape(len(qi), nk, bk).any(axis=(0, 2))
        vis_all = np.pad(vis, ((0, 0), (0, pad)), constant_values=True).reshape(len(qi), nk, bk).all(axis=(0, 2))
        cls[i] = np.where(~vis_any, M.EMPTY, np.where(vis_all, M.FULL, M.PARTIAL))
    cls.flags.writeable = False
    return cls


@dataclass(frozen=True)
class NeighborhoodMask(M.Mask):
    """NA as an :mod:`attn_jax.masks` mask over flattened tokens (self-attention, ``T = S = N``).

    Tokens are in raster order, or in blocked order when ``block`` is a spatial tile shape (the
    order of :func:`tile_shape`: tiles of ``prod(block)`` tokens are compact spatial blocks).
    ``classify`` is exact (computed in NumPy at trace time, one query block at a time: no
    ``N x N`` array); ``predicate`` evaluates the per-axis window bounds on traced indices.
    """

    spec: NeighborhoodSpec
    block: tuple[int, ...] | None = None

    is_static = True

    def check(self, B, H, T, S):
        N = self.spec.tokens
        if T != N or S != N:
            raise ValueError(f"mask: the neighborhood mask of grid {self.spec.spatial} needs T = S = {N}, "
                             f"got T={T}, S={S}")

    def predicate(self, q_idx, k_idx, T, S):
        tab = jnp.asarray(_coordinate_tables(self.spec, self.block))
        qi = jnp.clip(jnp.asarray(q_idx), 0, self.spec.tokens - 1)
        kj = jnp.clip(jnp.asarray(k_idx), 0, self.spec.tokens - 1)
        tq, tk = tab[:, :, qi], tab[:, :, kj]          # [d, 4, tq], [d, 4, tk]
        vis = ((tq[:, 0, :, None] == tk[:, 0, None, :]) & (tq[:, 2, :, None] <= tk[:, 1, None, :])
               & (tk[:, 1, None, :] <= tq[:, 3, :, None])).all(axis=0)
        return vis[None, None]

    def classify(self, T, S, bq, bk):
        for name, b in (("bq", bq), ("bk", bk)):
            if not M.is_concrete_int(b) or b <= 0:
                raise ValueError(f"block size {name} must be a positive int, got {b!r}")
        self.check(1, 1, T, S)
        return _classify(self.spec, self.block, int(bq), int(bk))[None, None]

    def __repr__(self):
        s = self.spec
        return (f"neighborhood(spatial={s.spatial}, kernel_size={s.kernel_size}, dilation={s.dilation}, "
                f"stride={s.stride}, causal={s.causal}, block={self.block})")


jax.tree_util.register_static(NeighborhoodMask)


def to_order(x, spatial, block):
    """``[B, *grid, H, D] -> [B, N, H, D]`` in the blocked order (raster when ``block`` is None)."""
    B, H, D = x.shape[0], x.shape[-2], x.shape[-1]
    d = len(spatial)
    if block is None:
        return x.reshape(B, math.prod(spatial), H, D)
    shape = (B, *sum(((n // b, b) for n, b in zip(spatial, block)), ()), H, D)
    perm = (0, *range(1, 1 + 2 * d, 2), *range(2, 2 + 2 * d, 2), 1 + 2 * d, 2 + 2 * d)
    return x.reshape(shape).transpose(perm).reshape(B, math.prod(spatial), H, D)


def from_order(x, spatial, block):
    """Inverse of :func:`to_order`."""
    B, H, D = x.shape[0], x.shape[-2], x.shape[-1]
    d = len(spatial)
    if block is None:
        return x.reshape(B, *spatial, H, D)
    blocks = tuple(n // b for n, b in zip(spatial, block))
    x = x.reshape(B, *blocks, *block, H, D)
    perm = (0, *sum(((1 + a, 1 + d + a) for a in range(d)), ()), 1 + 2 * d, 2 + 2 * d)
    return x.transpose(perm).reshape(B, *spatial, H, D)


def tiled_order(spec: NeighborhoodSpec, width: float = 128.0) -> tuple[tuple[int, ...] | None, int]:
    """``(block, tile tokens)`` of the tiled form: the token order (a spatial block, or None for
    raster) and tile size minimising ``tiles visited * (TILE_OVERHEAD + tokens^2 * width)``, with
    ``width = B * H * (Dk + Dv) / 2`` and the exact tile labels (NumPy, cached) of every candidate
    of :data:`TILE_SHAPES`.

    No single order wins (64 x 64 tokens, 64-token tiles: raster rows visit 448 tiles for
    ``k = 7`` against 484 for 8 x 8 blocks, but 832 against 484 for ``k = 13``), and small tiles
    waste fewer pairs but pay the loop's per-tile cost more often.  Trace-time cost: one
    ``N x N`` visibility sweep per candidate (a second or so at ``N = 4096``, once per shape).
    """
    best = None
    for bs in TILE_SHAPES:
        if bs > spec.tokens:
            continue
        for block in dict.fromkeys((None, tile_shape(spec.spatial, bs))):
            n = int((_classify(spec, block, bs, bs) != M.EMPTY).sum())
            cost = n * (TILE_OVERHEAD + bs * bs * width)
            if best is None or cost < best[0]:
                best = (cost, block, bs)
    if best is None:   # fewer tokens than the smallest tile: one tile
        return None, spec.tokens
    return best[1], best[2]


def _tiled(p: _Problem, q, k, v, lengths=None, rpb=None):
    spec = p.spec
    width = q.shape[0] * q.shape[-2] * (q.shape[-1] + v.shape[-1]) / 2
    block, bs = tiled_order(spec, width)
    mask = NeighborhoodMask(spec, block)
    qo, ko, vo = (to_order(x, spec.spatial, block) for x in (q, k, v))
    bias = None if rpb is None else NeighborhoodBias(rpb, spec, block)
    out = attention_blockwise(qo, ko, vo, mask=mask, bias=bias, scale=p.scale, block_q=bs, block_k=bs,
                              return_lse=p.return_lse)
    if not p.return_lse:
        return from_order(out, spec.spatial, block)
    o, lse = out
    return from_order(o, spec.spatial, block), from_order(lse[..., None], spec.spatial, block)[..., 0]


# ----------------------------------------------------------------------------- public op


def _no_reasons(platform, p) -> list[str]:
    return []


def _tiled_reasons(platform, p) -> list[str]:
    return ["lengths (per-row valid lengths) is not supported by the tiled form"] if p.has_lengths else []


def _check_lengths(lengths, spec: NeighborhoodSpec, B: int):
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"lengths: expected an integer array [B], got dtype {lengths.dtype}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths: expected shape [B] = [{B}], got {tuple(lengths.shape)}")
    if spec.ndim != 1:
        raise ValueError(f"lengths: per-row valid lengths are supported on 1-D grids only, got spatial shape "
                         f"{spec.spatial}")
    return lengths.astype(jnp.int32)


def neighborhood(q: Float[ArrayLike, "B *spatial H Dk"], k: Float[ArrayLike, "B *spatial K Dk"],
                 v: Float[ArrayLike, "B *spatial K Dv"], kernel_size, *, dilation=1, stride=1, causal=False,
                 scale: float | None = None, lengths: Int[ArrayLike, " B"] | None = None,
                 rpb: Float[ArrayLike, "H *table"] | None = None,
                 extra_k: Float[ArrayLike, "B M K Dk"] | None = None,
                 extra_v: Float[ArrayLike, "B M K Dv"] | None = None,
                 impl="auto") -> Float[Array, "B *spatial H Dv"]:
    """Neighborhood attention (module docstring) on a 1-, 2- or 3-D token grid.

    Args:
      q, k, v: ``[B, *spatial, H, Dk]``, ``[B, *spatial, K, Dk]``, ``[B, *spatial, K, Dv]`` with
        1 to 3 spatial axes and ``H % K == 0`` (GQA by grouping).
      kernel_size: window size per axis (an int for every axis, or a tuple), ``<= n`` per axis.
      dilation: per-axis dilation (``kernel_size * dilation <= n``).
      stride: per-axis stride (``<= kernel_size``): groups of ``stride`` queries share a window.
      causal: per-axis causal masking (a bool or a tuple of bools).
      scale: logit scale, default ``Dk ** -0.5``.
      lengths: 1-D grids only: ``int[B]`` valid tokens per row (right padding).  Row ``b`` is
        attended as a grid of ``lengths[b]`` tokens (windows shifted at its own end); padding
        tokens are never seen and get zero output.  A row shorter than ``kernel_size *
        dilation`` sees all its tokens (of its dilation group).  Not served by ``"tiled"``.
      extra_k, extra_v: ``[B, M, K, Dk]`` / ``[B, M, K, Dv]`` additional keys / values that every
        query also attends to (NATTEN's "additional KV", e.g. global or register tokens; no
        relative position bias on them): one softmax over the window and the ``M`` extras,
        computed as the NA output and :func:`attn_jax.attention` over the extras merged through
        their log-sum-exps (:func:`attn_jax.merge_attention`).  Not with ``lengths``.
      impl: ``"auto"`` (``"tiled"``, or ``"gather"`` with ``lengths``), ``"tiled"``, ``"gather"``,
        ``"reference"`` or a sequence tried in order.

    Returns:
      ``o [B, *spatial, H, Dv]`` in q's dtype (float32 accumulation).
    """
    spec = _validate(q, k, v, kernel_size, dilation, stride, causal, scale)
    lengths = _check_lengths(lengths, spec, jnp.shape(q)[0])
    rpb = _check_rpb(rpb, spec, jnp.shape(q)[-2])
    extras = _check_extras(extra_k, extra_v, q, k, v, lengths)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    p = _Problem(spec, float(jnp.shape(q)[-1] ** -0.5 if scale is None else scale), lengths is not None,
                 rpb is not None, extras is not None)
    if extras is None:
        return NEIGHBORHOOD.call(impl, p, q, k, v, lengths, rpb)
    o, lse = NEIGHBORHOOD.call(impl, p, q, k, v, lengths, rpb)
    B, H, N = q.shape[0], q.shape[-2], spec.tokens
    flat = o.reshape(B, N, H, o.shape[-1])
    o_x, lse_x = attention(q.reshape(B, N, H, q.shape[-1]), *extras, scale=p.scale, return_lse=True,
                           impl="reference" if impl == "reference" else "auto")
    return merge_attention([(flat, lse.reshape(B, N, H)), (o_x, lse_x)]).reshape(o.shape)


def _check_extras(extra_k, extra_v, q, k, v, lengths):
    """Validate the additional keys / values (``extra_k [B, M, K, Dk]``, ``extra_v [B, M, K, Dv]``)."""
    if extra_k is None and extra_v is None:
        return None
    if extra_k is None or extra_v is None:
        raise ValueError(f"extra_k, extra_v: expected both or neither, got extra_k "
                         f"{'None' if extra_k is None else 'an array'} and extra_v "
                         f"{'None' if extra_v is None else 'an array'}")
    if lengths is not None:
        raise ValueError("extra_k: additional keys are not supported together with lengths (per-row padding)")
    B, K, Dk, Dv = jnp.shape(q)[0], jnp.shape(k)[-2], jnp.shape(q)[-1], jnp.shape(v)[-1]
    for name, x, D in (("extra_k", extra_k, Dk), ("extra_v", extra_v, Dv)):
        V.check_float_array(name, x)
        s = tuple(jnp.shape(x))
        if len(s) != 4 or s[0] != B or s[2] != K or s[3] != D or s[1] < 1:
            raise ValueError(f"{name}: expected [B, M, K, D] = [{B}, M >= 1, {K}, {D}], got {list(s)}")
        if jnp.result_type(x) != jnp.result_type(q):
            raise TypeError(f"{name}: expected q's dtype {jnp.result_type(q)}, got {jnp.result_type(x)}")
    if jnp.shape(extra_k)[1] != jnp.shape(extra_v)[1]:
        raise ValueError(f"extra_v: expected {jnp.shape(extra_k)[1]} tokens like extra_k, got shape "
                         f"{list(jnp.shape(extra_v))}")
    return jnp.asarray(extra_k), jnp.asarray(extra_v)


def _explain(q, k, v, kernel_size, *, dilation=1, stride=1, causal=False, scale=None, lengths=None, rpb=None,
             extra_k=None, extra_v=None, impl="auto", platform=None):
    spec = _validate(q, k, v, kernel_size, dilation, stride, causal, scale)
    lengths = _check_lengths(lengths, spec, q.shape[0]) if not isinstance(lengths, jax.ShapeDtypeStruct) else lengths
    return NEIGHBORHOOD.explain(impl, _Problem(spec, 1.0, lengths is not None), platform)


# Registration order is the "auto" order: the tiled form wins on CPU at every shape measured
# (module docstring); the gather form serves what it cannot (per-row lengths).
NEIGHBORHOOD.register("tiled", _tiled, _tiled_reasons)
NEIGHBORHOOD.register("gather", _gather, _no_reasons)
NEIGHBORHOOD.register("reference", _reference, _no_reasons, auto=False)
register_explainer(neighborhood, _explain)

# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="neighborhood", family="local", title="Neighborhood attention (NA / DiNA; 1-, 2-, 3-D)",
    papers=(Paper("Neighborhood Attention Transformer", 2022, "2204.07143", "Hassani et al."),
            Paper("Dilated Neighborhood Attention Transformer", 2022, "2209.15001", "Hassani & Shi"),
            Paper("Faster Neighborhood Attention", 2024, "2403.04690", "Hassani et al.")),
    summary="o_x = Σ_{y ∈ N(x)} softmax(scale q_x·k_y) v_y, N(x) = NATTEN's shifted per-axis windows",
    op=neighborhood, forms=("tiled", "gather"), directions=("bidirectional",),
    layer="attn_jax.nn.local_mixers:neighborhood_mixer",
    notes="the op also has per-axis causal masking; the mixer is encoder-only (no grid decode cache)"))
