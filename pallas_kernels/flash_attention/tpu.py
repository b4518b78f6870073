"""TPU (Mosaic) flash-attention kernels: forward, dQ, and dK/dV (FlashAttention-2, arXiv:2307.08691).

The recurrences are in :mod:`pallas_kernels.flash_attention`.  TPU specifics:

* Grids are ``(B, H, nq, nk_max)`` (forward, dQ) and ``(B, K, nk, G * nq_max)`` (dK/dV); the last
  axis is the sequential reduction over the tile's block list, held in VMEM scratch.
* The block lists are scalar-prefetched (``PrefetchScalarGridSpec``) into SMEM and read by the
  BlockSpec index maps, so only non-empty tiles are fetched; unused list slots repeat the last
  index (no new DMA) and the body is skipped with ``pl.when``.
* The dK/dV reduction axis enumerates ``(g, list slot)`` pairs, so the G query heads that share a
  key/value head accumulate into the same dK/dV block (GQA without repeating K/V).
* Row statistics (lse, D, per-row dslope) are ``[B, H, T, 1]`` arrays with ``(bq, 1)`` blocks;
  segment ids are ``[B, T, 1]`` / ``[B, 1, S]`` so their tiles broadcast without relayout.
* ``dbias`` tiles are written by the dQ kernel into a zero-initialised aliased buffer, so tiles
  that are never visited stay zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.call_cache import PallasCallCache
from pallas_kernels.flash_attention import (Config, tile_dropout, tile_grads, tile_logits, tile_operands,
                                            tile_visible)

_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_TN = (((0,), (0,)), ((), ()))   # a.T @ b


def _smem():
    return pl.BlockSpec(memory_space=pltpu.SMEM)


def _compiler_params(c: Config):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


_CACHE = PallasCallCache()


def _call(c: Config, kernel, *, name: str, args, **kw):
    """``pallas_call(kernel, **kw)(*args)`` through the shared callable cache."""
    return _CACHE(c, kernel, name=name, args=args, interpret=c.interpret, compiler_params=_compiler_params(c), **kw)


def _bsel(c: Config, b):
    return b if c.lists_batched else 0


def _bias_bh(c: Config, b, h):
    return (b if c.bias_batched else 0), (h if c.bias_headed else 0)


class _Refs:
    """Named access to the optional operands of a kernel."""

    def __init__(self, names, refs):
        self.__dict__.update(dict(zip(names, refs)))


def _tile_inputs(c: Config, r, b, qb, kb, h):
    """Loads shared by all kernels: bias, ALiBi slope, visibility and dropout multiplier of the tile."""
    bq, bk = c.block_q, c.block_k
    i = qb * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    j = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    bias = r.bias[...] if c.has_bias else None
    slope = r.slopes[h] if c.has_alibi else None
    if c.has_segments:
        vis = tile_visible(c, i, j, r.q_seg[...], r.kv_seg[...])
    else:
        vis = tile_visible(c, i, j)
    z = tile_dropout(c, r.seed[0], r.seed[1], b, h, i, j) if c.dropout_rate else None
    return i, j, bias, slope, vis, z


def _optional_specs(c: Config, bias_map, qseg_map, kvseg_map):
    names, specs = [], []
    if c.has_bias:
        names.append("bias")
        specs.append(pl.BlockSpec((None, None, c.block_q, c.block_k), bias_map))
    if c.has_segments:
        names += ["q_seg", "kv_seg"]
        specs += [pl.BlockSpec((None, c.block_q, 1), qseg_map), pl.BlockSpec((None, 1, c.block_k), kvseg_map)]
    if c.has_alibi:
        names.append("slopes")
        specs.append(_smem())
    if c.dropout_rate:
        names.append("seed")
        specs.append(_smem())
    return names, specs


def _optional_args(c: Config, bias, slopes, q_seg, kv_seg, seed):
    args = []
    if c.has_bias:
        args.append(bias)
    if c.has_segments:
        args += [q_seg[:, :, None], kv_seg[:, None, :]]
    if c.has_alibi:
        args.append(slopes)
    if c.dropout_rate:
        args.append(seed)
    return args


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(kv_idx, kv_cnt, *refs, c: Config, names):
    n_in = len(names)
    r = _Refs(names, refs[:n_in])
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[n_in:]
    b, h, qb, t = (pl.program_id(a) for a in range(4))
    row = _bsel(c, b) * c.nq + qb
    kb = kv_idx[row * c.nk_max + t]

    @pl.when(t == 0)
    def _init():
        if c.has_sinks:
            sink = r.sinks[h]
            m_sc[...] = jnp.full(m_sc.shape, sink, jnp.float32)
            l_sc[...] = jnp.ones(l_sc.shape, jnp.float32)
        else:
            m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(t < kv_cnt[row])
    def _step():
        i, j, bias, slope, vis, z = _tile_inputs(c, r, b, qb, kb, h)
        q, k, v = tile_operands(c, vis, r.q[...], r.k[...], r.v[...])
        s, _ = tile_logits(c, q, k, i, j, bias, slope)
        s = jnp.where(vis, s, -jnp.inf)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        pz = p if z is None else p * z
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(pz.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(t == c.nk_max - 1)
    def _finish():
        l = l_sc[...]
        has_mass = l > 0
        l_safe = jnp.where(has_mass, l, 1.0)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        m = m_sc[...]
        lse_ref[...] = jnp.where(has_mass, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(l_safe), -jnp.inf)


def forward(c: Config, q, k, v, bias, slopes, sinks, q_seg, kv_seg, lists, seed):
    kv_idx, kv_cnt = lists[0].reshape(-1), lists[1].reshape(-1)
    bq, bk, G = c.block_q, c.block_k, c.G

    def kb_of(b, qb, t, kv_idx):
        return kv_idx[(_bsel(c, b) * c.nq + qb) * c.nk_max + t]

    names = ["q", "k", "v"]
    specs = [
        pl.BlockSpec((None, None, bq, c.Dk), lambda b, h, qb, t, ki, kc: (b, h, qb, 0)),
        pl.BlockSpec((None, None, bk, c.Dk), lambda b, h, qb, t, ki, kc: (b, lax.div(h, G), kb_of(b, qb, t, ki), 0)),
        pl.BlockSpec((None, None, bk, c.Dv), lambda b, h, qb, t, ki, kc: (b, lax.div(h, G), kb_of(b, qb, t, ki), 0)),
    ]
    on, os_ = _optional_specs(
        c, lambda b, h, qb, t, ki, kc: (*_bias_bh(c, b, h), qb, kb_of(b, qb, t, ki)),
        lambda b, h, qb, t, ki, kc: (b, qb, 0),
        lambda b, h, qb, t, ki, kc: (b, 0, kb_of(b, qb, t, ki)))
    names += on
    specs += os_
    args = [q, k, v, *_optional_args(c, bias, slopes, q_seg, kv_seg, seed)]
    if c.has_sinks:
        names.append("sinks")
        specs.append(_smem())
        args.append(sinks.astype(jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(c.B, c.H, c.nq, c.nk_max), in_specs=specs,
        out_specs=[pl.BlockSpec((None, None, bq, c.Dv), lambda b, h, qb, t, ki, kc: (b, h, qb, 0)),
                   pl.BlockSpec((None, None, bq, 1), lambda b, h, qb, t, ki, kc: (b, h, qb, 0))],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, c.Dv), jnp.float32)])
    o, lse = _call(c, functools.partial(_fwd_kernel, c=c, names=tuple(names)), grid_spec=grid_spec,
                   out_shape=[jax.ShapeDtypeStruct((c.B, c.H, c.Tp, c.Dv), q.dtype),
                              jax.ShapeDtypeStruct((c.B, c.H, c.Tp, 1), jnp.float32)],
                   name="flash_attention_fwd", args=(kv_idx, kv_cnt, *args))
    return o, lse[..., 0]


# ----------------------------------------------------------------------------- dQ (+ dbias, dslope)


def _dq_kernel(kv_idx, kv_cnt, *refs, c: Config, names):
    n_in = len(names)
    r = _Refs(names, refs[:n_in])
    outs = list(refs[n_in:])
    dq_ref = outs.pop(0)
    dbias_ref = outs.pop(0) if c.has_bias else None
    dsl_ref = outs.pop(0) if c.has_alibi else None
    dq_sc = outs.pop(0)
    dsl_sc = outs.pop(0) if c.has_alibi else None
    b, h, qb, t = (pl.program_id(a) for a in range(4))
    row = _bsel(c, b) * c.nq + qb
    kb = kv_idx[row * c.nk_max + t]
    cnt = kv_cnt[row]

    @pl.when(t == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
        if dsl_sc is not None:
            dsl_sc[...] = jnp.zeros(dsl_sc.shape, jnp.float32)

    if dbias_ref is not None:
        @pl.when((cnt == 0) & (t == 0))
        def _zero_unvisited():  # the block index of an empty row is written back: make it zero
            dbias_ref[...] = jnp.zeros(dbias_ref.shape, dbias_ref.dtype)

    @pl.when(t < cnt)
    def _step():
        i, j, bias, slope, vis, z = _tile_inputs(c, r, b, qb, kb, h)
        q, k, v = tile_operands(c, vis, r.q[...], r.k[...], r.v[...])
        s, th = tile_logits(c, q, k, i, j, bias, slope)
        _, ds, ds_raw = tile_grads(c, s, th, vis, r.lse[...], r.delta[...], r.do[...], v, z)
        dq_sc[...] += jnp.dot(ds_raw.astype(k.dtype), k, preferred_element_type=jnp.float32)
        if dbias_ref is not None:
            dbias_ref[...] = ds.astype(dbias_ref.dtype)
        if dsl_sc is not None:
            dist = jnp.abs(i + c.alibi_offset - j).astype(jnp.float32)
            dsl_sc[...] += -(ds * dist).sum(axis=1, keepdims=True)

    @pl.when(t == c.nk_max - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)
        if dsl_ref is not None:
            dsl_ref[...] = dsl_sc[...]


def backward_dq(c: Config, q, k, v, bias, slopes, q_seg, kv_seg, lists, seed, do, lse, delta):
    kv_idx, kv_cnt = lists[0].reshape(-1), lists[1].reshape(-1)
    bq, bk, G = c.block_q, c.block_k, c.G

    def kb_of(b, qb, t, kv_idx):
        return kv_idx[(_bsel(c, b) * c.nq + qb) * c.nk_max + t]

    row_map = lambda b, h, qb, t, ki, kc: (b, h, qb, 0)
    kv_map = lambda b, h, qb, t, ki, kc: (b, lax.div(h, G), kb_of(b, qb, t, ki), 0)
    names = ["q", "k", "v", "do", "lse", "delta"]
    specs = [pl.BlockSpec((None, None, bq, c.Dk), row_map), pl.BlockSpec((None, None, bk, c.Dk), kv_map),
             pl.BlockSpec((None, None, bk, c.Dv), kv_map), pl.BlockSpec((None, None, bq, c.Dv), row_map),
             pl.BlockSpec((None, None, bq, 1), row_map), pl.BlockSpec((None, None, bq, 1), row_map)]
    tile_map = lambda b, h, qb, t, ki, kc: (b, h, qb, kb_of(b, qb, t, ki))
    on, os_ = _optional_specs(
        c, lambda b, h, qb, t, ki, kc: (*_bias_bh(c, b, h), qb, kb_of(b, qb, t, ki)),
        lambda b, h, qb, t, ki, kc: (b, qb, 0),
        lambda b, h, qb, t, ki, kc: (b, 0, kb_of(b, qb, t, ki)))
    names += on
    specs += os_
    args = [q, k, v, do, lse[..., None], delta[..., None], *_optional_args(c, bias, slopes, q_seg, kv_seg, seed)]
    out_specs = [pl.BlockSpec((None, None, bq, c.Dk), row_map)]
    out_shape = [jax.ShapeDtypeStruct((c.B, c.H, c.Tp, c.Dk), jnp.float32)]
    scratch = [pltpu.VMEM((bq, c.Dk), jnp.float32)]
    aliases = {}
    if c.has_bias:
        out_specs.append(pl.BlockSpec((None, None, bq, bk), tile_map))
        out_shape.append(jax.ShapeDtypeStruct((c.B, c.H, c.Tp, c.Sp), jnp.float32))
        names.append("dbias_init")
        specs.append(pl.BlockSpec(memory_space=pl.ANY))
        aliases[2 + len(args)] = 1  # operand index counts the two prefetched lists
        args.append(jnp.zeros((c.B, c.H, c.Tp, c.Sp), jnp.float32))
    if c.has_alibi:
        out_specs.append(pl.BlockSpec((None, None, bq, 1), row_map))
        out_shape.append(jax.ShapeDtypeStruct((c.B, c.H, c.Tp, 1), jnp.float32))
        scratch.append(pltpu.VMEM((bq, 1), jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=(c.B, c.H, c.nq, c.nk_max),
                                             in_specs=specs, out_specs=out_specs, scratch_shapes=scratch)
    outs = _call(c, functools.partial(_dq_kernel, c=c, names=tuple(names)), grid_spec=grid_spec,
                 out_shape=out_shape, input_output_aliases=aliases, name="flash_attention_dq",
                 args=(kv_idx, kv_cnt, *args))
    outs = list(outs)
    dq = outs.pop(0)
    dbias = outs.pop(0) if c.has_bias else None
    dslope_rows = outs.pop(0)[..., 0] if c.has_alibi else None
    return dq, dbias, dslope_rows


# ----------------------------------------------------------------------------- dK, dV


def _dkdv_kernel(q_idx, q_cnt, *refs, c: Config, names):
    n_in = len(names)
    r = _Refs(names, refs[:n_in])
    dk_ref, dv_ref, dk_sc, dv_sc = refs[n_in:]
    b, kh, kb, t = (pl.program_id(a) for a in range(4))
    g, slot = lax.div(t, c.nq_max), lax.rem(t, c.nq_max)
    h = kh * c.G + g
    row = _bsel(c, b) * c.nk + kb
    qb = q_idx[row * c.nq_max + slot]

    @pl.when(t == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(slot < q_cnt[row])
    def _step():
        i, j, bias, slope, vis, z = _tile_inputs(c, r, b, qb, kb, h)
        q, k, v = tile_operands(c, vis, r.q[...], r.k[...], r.v[...])
        do = r.do[...]
        s, th = tile_logits(c, q, k, i, j, bias, slope)
        p, _, ds_raw = tile_grads(c, s, th, vis, r.lse[...], r.delta[...], do, v, z)
        dv_sc[...] += lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
        dk_sc[...] += lax.dot_general(ds_raw.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)

    @pl.when(t == c.G * c.nq_max - 1)
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward_dkdv(c: Config, q, k, v, bias, slopes, q_seg, kv_seg, lists, seed, do, lse, delta):
    q_idx, q_cnt = lists[2].reshape(-1), lists[3].reshape(-1)
    bq, bk, G, nqm = c.block_q, c.block_k, c.G, c.nq_max

    def qb_of(b, kb, t, q_idx):
        return q_idx[(_bsel(c, b) * c.nk + kb) * nqm + lax.rem(t, nqm)]

    row_map = lambda b, kh, kb, t, qi, qc: (b, kh * G + lax.div(t, nqm), qb_of(b, kb, t, qi), 0)
    kv_map = lambda b, kh, kb, t, qi, qc: (b, kh, kb, 0)
    names = ["q", "k", "v", "do", "lse", "delta"]
    specs = [pl.BlockSpec((None, None, bq, c.Dk), row_map), pl.BlockSpec((None, None, bk, c.Dk), kv_map),
             pl.BlockSpec((None, None, bk, c.Dv), kv_map), pl.BlockSpec((None, None, bq, c.Dv), row_map),
             pl.BlockSpec((None, None, bq, 1), row_map), pl.BlockSpec((None, None, bq, 1), row_map)]
    on, os_ = _optional_specs(
        c, lambda b, kh, kb, t, qi, qc: (*_bias_bh(c, b, kh * G + lax.div(t, nqm)), qb_of(b, kb, t, qi), kb),
        lambda b, kh, kb, t, qi, qc: (b, qb_of(b, kb, t, qi), 0),
        lambda b, kh, kb, t, qi, qc: (b, 0, kb))
    names += on
    specs += os_
    args = [q, k, v, do, lse[..., None], delta[..., None], *_optional_args(c, bias, slopes, q_seg, kv_seg, seed)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(c.B, c.K, c.nk, G * nqm), in_specs=specs,
        out_specs=[pl.BlockSpec((None, None, bk, c.Dk), kv_map), pl.BlockSpec((None, None, bk, c.Dv), kv_map)],
        scratch_shapes=[pltpu.VMEM((bk, c.Dk), jnp.float32), pltpu.VMEM((bk, c.Dv), jnp.float32)])
    dk, dv = _call(c, functools.partial(_dkdv_kernel, c=c, names=tuple(names)), grid_spec=grid_spec,
                   out_shape=[jax.ShapeDtypeStruct((c.B, c.K, c.Sp, c.Dk), jnp.float32),
                              jax.ShapeDtypeStruct((c.B, c.K, c.Sp, c.Dv), jnp.float32)],
                   name="flash_attention_dkdv", args=(q_idx, q_cnt, *args))
    return dk, dv
