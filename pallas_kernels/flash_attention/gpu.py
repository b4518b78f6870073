"""GPU (Triton backend of Pallas) flash-attention kernels (FlashAttention-2, arXiv:2307.08691).

The recurrences are in :mod:`pallas_kernels.flash_attention`.  GPU specifics:

* One program per ``(b, h, query block)`` (forward, dQ) or ``(b, kv head, key block)`` (dK/dV);
  the reduction runs as an in-kernel ``fori_loop`` whose trip count is the block list's count,
  so empty tiles cost no iterations.  K/V (or Q/dO for dK/dV) are addressed with ``pl.ds``.
* dK/dV loops over the G query heads of its key/value head and over their query blocks, so the
  group accumulates in registers (GQA without repeating K/V).
* The Triton backend is selected explicitly with ``plgpu.CompilerParams(num_warps, num_stages)``
  (a bare ``pallas_call`` would lower through Mosaic GPU).  The backend is deprecated in newer
  JAX; only this file needs to change to move to Mosaic GPU.
* ``dbias`` tiles are stored by the dQ program into a zero-initialised aliased buffer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.call_cache import PallasCallCache
from pallas_kernels.flash_attention import (Config, tile_dropout, tile_grads, tile_logits, tile_operands,
                                            tile_visible)

_TN = (((0,), (0,)), ((), ()))   # a.T @ b


_CACHE = PallasCallCache()


def _call(c: Config, kernel, *, name: str, args, **kw):
    """``pallas_call(kernel, **kw)(*args)`` through the shared callable cache."""
    params = plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages)
    return _CACHE(c, kernel, name=name, args=args, interpret=c.interpret, compiler_params=params, **kw)


def _full(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _bsel(c: Config, b):
    return b if c.lists_batched else 0


class _Refs:
    def __init__(self, names, refs):
        self.__dict__.update(dict(zip(names, refs)))


def _ij(c: Config, qb, kb):
    i = qb * c.block_q + lax.broadcasted_iota(jnp.int32, (c.block_q, c.block_k), 0)
    j = kb * c.block_k + lax.broadcasted_iota(jnp.int32, (c.block_q, c.block_k), 1)
    return i, j


def _z(c: Config, r, b, h, i, j):
    return tile_dropout(c, r.seed[0], r.seed[1], b, h, i, j) if c.dropout_rate else None


def _vis(c: Config, i, j, q_seg, kv_seg):
    if c.has_segments:
        return tile_visible(c, i, j, q_seg[:, None], kv_seg[None, :])
    return tile_visible(c, i, j)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, c: Config, names):
    r = _Refs(names, refs[:len(names)])
    o_ref, lse_ref = refs[len(names):]
    b, h, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bs = _bsel(c, b)
    bk = c.block_k
    q = r.q[...]
    q_seg = r.q_seg[...] if c.has_segments else None
    slope = r.slopes[h] if c.has_alibi else None
    if c.has_sinks:
        m0 = jnp.full((c.block_q,), r.sinks[h], jnp.float32)
        l0 = jnp.ones((c.block_q,), jnp.float32)
    else:
        m0 = jnp.full((c.block_q,), -jnp.inf, jnp.float32)
        l0 = jnp.zeros((c.block_q,), jnp.float32)
    acc0 = jnp.zeros((c.block_q, c.Dv), jnp.float32)

    def body(t, carry):
        m_prev, l_prev, acc = carry
        kb = r.kv_idx[bs, qb, t]
        cols = pl.ds(kb * bk, bk)
        i, j = _ij(c, qb, kb)
        bias = r.bias[:, cols] if c.has_bias else None
        vis = _vis(c, i, j, q_seg, r.kv_seg[cols] if c.has_segments else None)
        qt, k, v = tile_operands(c, vis, q, r.k[cols, :], r.v[cols, :])
        s, _ = tile_logits(c, qt, k, i, j, bias, slope)
        s = jnp.where(vis, s, -jnp.inf)
        m_new = jnp.maximum(m_prev, s.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m_prev - m_safe)
        l_new = alpha * l_prev + p.sum(axis=1)
        z = _z(c, r, b, h, i, j)
        pz = p if z is None else p * z
        acc = alpha[:, None] * acc + jnp.dot(pz.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l_new, acc

    m, l, acc = lax.fori_loop(0, r.kv_cnt[bs, qb], body, (m0, l0, acc0))
    has_mass = l > 0
    l_safe = jnp.where(has_mass, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_mass, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(l_safe), -jnp.inf)


def _common_inputs(c: Config, bias, slopes, q_seg, kv_seg, seed, *, bias_spec, qseg_spec, kvseg_spec):
    names, specs, args = [], [], []
    if c.has_bias:
        names.append("bias")
        specs.append(bias_spec)
        args.append(bias)
    if c.has_segments:
        names += ["q_seg", "kv_seg"]
        specs += [qseg_spec, kvseg_spec]
        args += [q_seg, kv_seg]
    if c.has_alibi:
        names.append("slopes")
        specs.append(_full(slopes))
        args.append(slopes)
    if c.dropout_rate:
        names.append("seed")
        specs.append(_full(seed))
        args.append(seed)
    return names, specs, args


def _bias_bh(c: Config, b, h):
    return (b if c.bias_batched else 0), (h if c.bias_headed else 0)


def forward(c: Config, q, k, v, bias, slopes, sinks, q_seg, kv_seg, lists, seed):
    kv_idx, kv_cnt = lists[0], lists[1]
    bq, G = c.block_q, c.G
    names = ["q", "k", "v", "kv_idx", "kv_cnt"]
    specs = [pl.BlockSpec((None, None, bq, c.Dk), lambda b, h, qb: (b, h, qb, 0)),
             pl.BlockSpec((None, None, c.Sp, c.Dk), lambda b, h, qb: (b, lax.div(h, G), 0, 0)),
             pl.BlockSpec((None, None, c.Sp, c.Dv), lambda b, h, qb: (b, lax.div(h, G), 0, 0)),
             _full(kv_idx), _full(kv_cnt)]
    args = [q, k, v, kv_idx, kv_cnt]
    n2, s2, a2 = _common_inputs(
        c, bias, slopes, q_seg, kv_seg, seed,
        bias_spec=pl.BlockSpec((None, None, bq, c.Sp), lambda b, h, qb: (*_bias_bh(c, b, h), qb, 0)),
        qseg_spec=pl.BlockSpec((None, bq), lambda b, h, qb: (b, qb)),
        kvseg_spec=pl.BlockSpec((None, c.Sp), lambda b, h, qb: (b, 0)))
    names, specs, args = names + n2, specs + s2, args + a2
    if c.has_sinks:
        sinks = sinks.astype(jnp.float32)
        names.append("sinks")
        specs.append(_full(sinks))
        args.append(sinks)
    o, lse = _call(c, functools.partial(_fwd_kernel, c=c, names=tuple(names)), grid=(c.B, c.H, c.nq),
                   in_specs=specs,
                   out_specs=[pl.BlockSpec((None, None, bq, c.Dv), lambda b, h, qb: (b, h, qb, 0)),
                              pl.BlockSpec((None, None, bq), lambda b, h, qb: (b, h, qb))],
                   out_shape=[jax.ShapeDtypeStruct((c.B, c.H, c.Tp, c.Dv), q.dtype),
                              jax.ShapeDtypeStruct((c.B, c.H, c.Tp), jnp.float32)],
                   name="flash_attention_fwd", args=args)
    return o, lse


# ----------------------------------------------------------------------------- dQ (+ dbias, dslope)


def _dq_kernel(*refs, c: Config, names):
    r = _Refs(names, refs[:len(names)])
    outs = list(refs[len(names):])
    dq_ref = outs.pop(0)
    dbias_ref = outs.pop(0) if c.has_bias else None
    dsl_ref = outs.pop(0) if c.has_alibi else None
    b, h, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bs = _bsel(c, b)
    bk = c.block_k
    q, do = r.q[...], r.do[...]
    lse, delta = r.lse[...][:, None], r.delta[...][:, None]
    q_seg = r.q_seg[...] if c.has_segments else None
    slope = r.slopes[h] if c.has_alibi else None

    def body(t, carry):
        dq, dsl = carry
        kb = r.kv_idx[bs, qb, t]
        cols = pl.ds(kb * bk, bk)
        i, j = _ij(c, qb, kb)
        bias = r.bias[:, cols] if c.has_bias else None
        vis = _vis(c, i, j, q_seg, r.kv_seg[cols] if c.has_segments else None)
        qt, k, v = tile_operands(c, vis, q, r.k[cols, :], r.v[cols, :])
        s, th = tile_logits(c, qt, k, i, j, bias, slope)
        _, ds, ds_raw = tile_grads(c, s, th, vis, lse, delta, do, v, _z(c, r, b, h, i, j))
        dq = dq + jnp.dot(ds_raw.astype(k.dtype), k, preferred_element_type=jnp.float32)
        if dbias_ref is not None:
            dbias_ref[:, cols] = ds.astype(dbias_ref.dtype)
        if dsl_ref is not None:
            dsl = dsl - (ds * jnp.abs(i + c.alibi_offset - j).astype(jnp.float32)).sum(axis=1)
        return dq, dsl

    dq, dsl = lax.fori_loop(0, r.kv_cnt[bs, qb], body, (jnp.zeros((c.block_q, c.Dk), jnp.float32),
                                                         jnp.zeros((c.block_q,), jnp.float32)))
    dq_ref[...] = dq.astype(dq_ref.dtype)
    if dsl_ref is not None:
        dsl_ref[...] = dsl


def backward_dq(c: Config, q, k, v, bias, slopes, q_seg, kv_seg, lists, seed, do, lse, delta):
    kv_idx, kv_cnt = lists[0], lists[1]
    bq, G = c.block_q, c.G
    row = lambda b, h, qb: (b, h, qb, 0)
    vec = lambda b, h, qb: (b, h, qb)
    whole_kv = lambda b, h, qb: (b, lax.div(h, G), 0, 0)
    names = ["q", "k", "v", "do", "lse", "delta", "kv_idx", "kv_cnt"]
    specs = [pl.BlockSpec((None, None, bq, c.Dk), row), pl.BlockSpec((None, None, c.Sp, c.Dk), whole_kv),
             pl.BlockSpec((None, None, c.Sp, c.Dv), whole_kv), pl.BlockSpec((None, None, bq, c.Dv), row),
             pl.BlockSpec((None, None, bq), vec), pl.BlockSpec((None, None, bq), vec), _full(kv_idx), _full(kv_cnt)]
    args = [q, k, v, do, lse, delta, kv_idx, kv_cnt]
    n2, s2, a2 = _common_inputs(
        c, bias, slopes, q_seg, kv_seg, seed,
        bias_spec=pl.BlockSpec((None, None, bq, c.Sp), lambda b, h, qb: (*_bias_bh(c, b, h), qb, 0)),
        qseg_spec=pl.BlockSpec((None, bq), lambda b, h, qb: (b, qb)),
        kvseg_spec=pl.BlockSpec((None, c.Sp), lambda b, h, qb: (b, 0)))
    names, specs, args = names + n2, specs + s2, args + a2
    out_specs = [pl.BlockSpec((None, None, bq, c.Dk), row)]
    out_shape = [jax.ShapeDtypeStruct((c.B, c.H, c.Tp, c.Dk), jnp.float32)]
    aliases = {}
    if c.has_bias:
        names.append("dbias_init")
        specs.append(pl.BlockSpec((None, None, bq, c.Sp), row))
        aliases[len(args)] = 1
        args.append(jnp.zeros((c.B, c.H, c.Tp, c.Sp), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, bq, c.Sp), row))
        out_shape.append(jax.ShapeDtypeStruct((c.B, c.H, c.Tp, c.Sp), jnp.float32))
    if c.has_alibi:
        out_specs.append(pl.BlockSpec((None, None, bq), vec))
        out_shape.append(jax.ShapeDtypeStruct((c.B, c.H, c.Tp), jnp.float32))
    outs = list(_call(c, functools.partial(_dq_kernel, c=c, names=tuple(names)), grid=(c.B, c.H, c.nq),
                      in_specs=specs, out_specs=out_specs, out_shape=out_shape, input_output_aliases=aliases,
                      name="flash_attention_dq", args=args))
    dq = outs.pop(0)
    dbias = outs.pop(0) if c.has_bias else None
    dslope_rows = outs.pop(0) if c.has_alibi else None
    return dq, dbias, dslope_rows


# ----------------------------------------------------------------------------- dK, dV


def _dkdv_kernel(*refs, c: Config, names):
    r = _Refs(names, refs[:len(names)])
    dk_ref, dv_ref = refs[len(names):]
    b, kh, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bs = _bsel(c, b)
    bq = c.block_q
    k, v = r.k[...], r.v[...]
    kv_seg = r.kv_seg[...] if c.has_segments else None
    n = r.q_cnt[bs, kb]

    def head(g, carry):
        h = kh * c.G + g
        slope = r.slopes[h] if c.has_alibi else None
        gb = g if c.bias_headed else 0

        def body(t, carry):
            dk, dv = carry
            qb = r.q_idx[bs, kb, t]
            rows = pl.ds(qb * bq, bq)
            i, j = _ij(c, qb, kb)
            q, do = r.q[g, rows, :], r.do[g, rows, :]
            lse, delta = r.lse[g, rows][:, None], r.delta[g, rows][:, None]
            bias = r.bias[gb, rows, :] if c.has_bias else None
            vis = _vis(c, i, j, r.q_seg[rows] if c.has_segments else None, kv_seg)
            q, kt, vt = tile_operands(c, vis, q, k, v)
            s, th = tile_logits(c, q, kt, i, j, bias, slope)
            p, _, ds_raw = tile_grads(c, s, th, vis, lse, delta, do, vt, _z(c, r, b, h, i, j))
            dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
            dk = dk + lax.dot_general(ds_raw.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)
            return dk, dv

        return lax.fori_loop(0, n, body, carry)

    dk, dv = lax.fori_loop(0, c.G, head, (jnp.zeros((c.block_k, c.Dk), jnp.float32),
                                          jnp.zeros((c.block_k, c.Dv), jnp.float32)))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dkdv(c: Config, q, k, v, bias, slopes, q_seg, kv_seg, lists, seed, do, lse, delta):
    q_idx, q_cnt = lists[2], lists[3]
    bk, G = c.block_k, c.G
    group = lambda b, kh, kb: (b, kh, 0, 0)
    gvec = lambda b, kh, kb: (b, kh, 0)
    tile = lambda b, kh, kb: (b, kh, kb, 0)
    names = ["q", "k", "v", "do", "lse", "delta", "q_idx", "q_cnt"]
    specs = [pl.BlockSpec((None, G, c.Tp, c.Dk), group), pl.BlockSpec((None, None, bk, c.Dk), tile),
             pl.BlockSpec((None, None, bk, c.Dv), tile), pl.BlockSpec((None, G, c.Tp, c.Dv), group),
             pl.BlockSpec((None, G, c.Tp), gvec), pl.BlockSpec((None, G, c.Tp), gvec), _full(q_idx), _full(q_cnt)]
    args = [q, k, v, do, lse, delta, q_idx, q_cnt]
    bias_heads = G if c.bias_headed else 1
    n2, s2, a2 = _common_inputs(
        c, bias, slopes, q_seg, kv_seg, seed,
        bias_spec=pl.BlockSpec((None, bias_heads, c.Tp, bk),
                               lambda b, kh, kb: (b if c.bias_batched else 0, kh if c.bias_headed else 0, 0, kb)),
        qseg_spec=pl.BlockSpec((None, c.Tp), lambda b, kh, kb: (b, 0)),
        kvseg_spec=pl.BlockSpec((None, bk), lambda b, kh, kb: (b, kb)))
    names, specs, args = names + n2, specs + s2, args + a2
    dk, dv = _call(c, functools.partial(_dkdv_kernel, c=c, names=tuple(names)), grid=(c.B, c.K, c.nk),
                   in_specs=specs,
                   out_specs=[pl.BlockSpec((None, None, bk, c.Dk), tile), pl.BlockSpec((None, None, bk, c.Dv), tile)],
                   out_shape=[jax.ShapeDtypeStruct((c.B, c.K, c.Sp, c.Dk), jnp.float32),
                              jax.ShapeDtypeStruct((c.B, c.K, c.Sp, c.Dv), jnp.float32)],
                   name="flash_attention_dkdv", args=args)
    return dk, dv
