"""GPU (Triton backend of Pallas) chunked GLA kernels: forward, dQ sweep, dK/dV/dh0 reverse sweep.

The chunk math is in :mod:`pallas_kernels.chunked_gla`.  GPU specifics:

* One program per ``(b*h, Dv tile)``; the chunks run as an in-kernel ``fori_loop`` carrying the
  ``[Dk, block_v]`` float32 state (or its cotangent, reverse order) in registers.  Inputs are
  addressed per chunk with ``pl.ds``; the per-channel intra-chunk loop loads single rows.
* The Triton backend is selected explicitly with ``plgpu.CompilerParams(num_warps, num_stages)``;
  only this file needs to change to move to Mosaic GPU.
* ``dq`` and ``dk`` are written as per-``Dv``-tile partials ``[nv, BH, Tp, Dk]`` (summed in XLA),
  as are the per-chunk ``rowsum(dS_T * S_prev)`` of the dQ sweep.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.call_cache import PallasCallCache
from pallas_kernels.chunked_gla import Config, Seg, dkdv_chunk, dq_chunk, fwd_chunk

_CACHE = PallasCallCache()


def _call(c: Config, kernel, *, name: str, args, **kw):
    params = plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages)
    return _CACHE(c, kernel, name=name, args=args, interpret=c.interpret, compiler_params=params, **kw)


def _specs(c: Config, names):
    """BlockSpecs over the grid ``(BH, nv)``: whole sequences of one ``(b*h)``, one ``Dv`` tile."""
    table = {
        "q": pl.BlockSpec((None, c.Tp, c.Dk), lambda bh, iv: (bh, 0, 0)),
        "k": pl.BlockSpec((None, c.Tp, c.Dk), lambda bh, iv: (bh, 0, 0)),
        "v": pl.BlockSpec((None, c.Tp, c.bv), lambda bh, iv: (bh, 0, iv)),
        "do": pl.BlockSpec((None, c.Tp, c.bv), lambda bh, iv: (bh, 0, iv)),
        "g": pl.BlockSpec((None, c.Tp, c.Dg), lambda bh, iv: (bh, 0, 0)),
        "g_last": pl.BlockSpec((None, c.N, 1, c.Dg), lambda bh, iv: (bh, 0, 0, 0)),
        "g_col": pl.BlockSpec((None, c.N, c.Dg, 1), lambda bh, iv: (bh, 0, 0, 0)),
        "g_row": pl.BlockSpec((None, c.N, 1, c.C), lambda bh, iv: (bh, 0, 0, 0)),
        "d": pl.BlockSpec((None, c.Tp, 1), lambda bh, iv: (bh, 0, 0)),
        "m_in": pl.BlockSpec((None, c.Tp, 1), lambda bh, iv: (bh, 0, 0)),
        "m_out": pl.BlockSpec((None, c.Tp, 1), lambda bh, iv: (bh, 0, 0)),
        "d_row": pl.BlockSpec((None, c.N, 1, c.C), lambda bh, iv: (bh, 0, 0, 0)),
        "state": pl.BlockSpec((None, c.Dk, c.bv), lambda bh, iv: (bh, 0, iv)),
        "fin": pl.BlockSpec((None, c.Dk, c.bv), lambda bh, iv: (bh, 0, iv)),
    }
    return [table[n] for n in names]


def _inputs(c: Config, names, arrays, seg=None):
    """Drop ``g_row`` / ``d_row`` for per-channel gates; append the segment tables if any."""
    if seg is not None:
        names, arrays = (*names, *Seg._fields), (*arrays, *seg)
    pairs = [(n, a) for n, a in zip(names, arrays) if not (n in ("g_row", "d_row") and not c.scalar)]
    return tuple(n for n, _ in pairs), [a for _, a in pairs]


class _Chunk:
    """The refs of one program, viewed at chunk ``n``."""

    def __init__(self, c: Config, names, refs, n):
        self.c, self.r, self.n = c, dict(zip(names, refs)), n
        self.base = pl.multiple_of(n * c.C, c.C)

    def __call__(self, name):
        return self.r[name][pl.ds(self.base, self.c.C), :]

    def row(self, name, j):
        return self.r[name][pl.ds(self.base + j, 1), :].astype(jnp.float32)

    def gates(self):
        c, n = self.c, self.n
        g_row = self.r["g_row"][n] if c.scalar else None
        return self("g"), self.r["g_last"][n], self.r["g_col"][n], g_row

    def seg(self):
        if "d" not in self.r:
            return None
        return Seg(self("d"), self.r["d_row"][self.n] if self.c.scalar else None, self("m_in"), self("m_out"))


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, c: Config, names):
    o_ref, st_ref = refs[len(names):]
    r = dict(zip(names, refs))

    def step(n, S):
        ch = _Chunk(c, names, refs, n)
        G, g_last, g_col, g_row = ch.gates()
        o, S = fwd_chunk(c, ch.row, ch("q"), ch("k"), ch("v"), G, g_last, g_col, g_row, S, ch.seg())
        o_ref[pl.ds(ch.base, c.C), :] = o.astype(o_ref.dtype)
        return S

    st_ref[...] = lax.fori_loop(0, c.N, step, r["state"][...].astype(jnp.float32))


def forward(c: Config, q, k, v, G, g_last, g_col, g_row, h0, seg=None):
    names, args = _inputs(c, ("q", "k", "v", "g", "g_last", "g_col", "g_row", "state"),
                          (q, k, v, G, g_last, g_col, g_row, h0), seg)
    return _call(c, functools.partial(_fwd_kernel, c=c, names=names), grid=(c.BH, c.nv),
                 in_specs=_specs(c, names), out_specs=_specs(c, ("v", "state")),
                 out_shape=[jax.ShapeDtypeStruct((c.BH, c.Tp, c.Dv), q.dtype),
                            jax.ShapeDtypeStruct((c.BH, c.Dk, c.Dv), jnp.float32)],
                 name="chunked_gla_fwd", args=args)


# ----------------------------------------------------------------------------- dQ (forward sweep)


def _dq_kernel(*refs, c: Config, names):
    dq_ref, p_ref = refs[len(names):]
    r = dict(zip(names, refs))
    fin = r["fin"][...]

    def step(n, S):
        ch = _Chunk(c, names, refs, n)
        G, g_last, g_col, g_row = ch.gates()
        p_ref[n] = jnp.sum(fin * S, axis=1, keepdims=True)
        dq, S = dq_chunk(c, ch.row, ch("k"), ch("v"), ch("do"), G, g_last, g_col, g_row, S, ch.seg())
        dq_ref[pl.ds(ch.base, c.C), :] = dq
        return S

    lax.fori_loop(0, c.N, step, r["state"][...].astype(jnp.float32))


def backward_dq(c: Config, k, v, do, G, g_last, g_col, g_row, h0, dst, seg=None):
    """``(dq partials [nv, BH, Tp, Dk], P [nv, BH, N, Dk, 1])`` with ``P_n = rowsum(dS_T * S_prev(n))``
    over this ``Dv`` tile (for the final-state part of ``dlog_g``)."""
    names, args = _inputs(c, ("k", "v", "do", "g", "g_last", "g_col", "g_row", "state", "fin"),
                          (k, v, do, G, g_last, g_col, g_row, h0, dst), seg)
    return _call(c, functools.partial(_dq_kernel, c=c, names=names), grid=(c.BH, c.nv),
                 in_specs=_specs(c, names),
                 out_specs=[pl.BlockSpec((None, None, c.Tp, c.Dk), lambda bh, iv: (iv, bh, 0, 0)),
                            pl.BlockSpec((None, None, c.N, c.Dk, 1), lambda bh, iv: (iv, bh, 0, 0, 0))],
                 out_shape=[jax.ShapeDtypeStruct((c.nv, c.BH, c.Tp, c.Dk), jnp.float32),
                            jax.ShapeDtypeStruct((c.nv, c.BH, c.N, c.Dk, 1), jnp.float32)],
                 name="chunked_gla_dq", args=args)


# ----------------------------------------------------------------------------- dK, dV, dh0 (reverse sweep)


def _dkdv_kernel(*refs, c: Config, names):
    dk_ref, dv_ref, dh0_ref = refs[len(names):]
    r = dict(zip(names, refs))

    def step(t, dS):
        ch = _Chunk(c, names, refs, c.N - 1 - t)
        G, g_last, g_col, g_row = ch.gates()
        dk, dv, dS = dkdv_chunk(c, ch.row, ch("q"), ch("k"), ch("v"), ch("do"), G, g_last, g_col, g_row, dS, ch.seg())
        dk_ref[pl.ds(ch.base, c.C), :] = dk
        dv_ref[pl.ds(ch.base, c.C), :] = dv
        return dS

    dh0_ref[...] = lax.fori_loop(0, c.N, step, r["state"][...])


def backward_dkdv(c: Config, q, k, v, do, G, g_last, g_col, g_row, dst, seg=None):
    names, args = _inputs(c, ("q", "k", "v", "do", "g", "g_last", "g_col", "g_row", "state"),
                          (q, k, v, do, G, g_last, g_col, g_row, dst), seg)
    return _call(c, functools.partial(_dkdv_kernel, c=c, names=names), grid=(c.BH, c.nv),
                 in_specs=_specs(c, names),
                 out_specs=[pl.BlockSpec((None, None, c.Tp, c.Dk), lambda bh, iv: (iv, bh, 0, 0)),
                            *_specs(c, ("v", "state"))],
                 out_shape=[jax.ShapeDtypeStruct((c.nv, c.BH, c.Tp, c.Dk), jnp.float32),
                            jax.ShapeDtypeStruct((c.BH, c.Tp, c.Dv), jnp.float32),
                            jax.ShapeDtypeStruct((c.BH, c.Dk, c.Dv), jnp.float32)],
                 name="chunked_gla_dkdv", args=args)
