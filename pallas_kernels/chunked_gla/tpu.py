"""TPU (Mosaic) chunked GLA kernels: forward, dQ sweep, dK/dV/dh0 reverse sweep.

The chunk math is in :mod:`pallas_kernels.chunked_gla`.  TPU specifics:

* Grid ``(B*H, nv, N)``; the last axis walks the chunks (``"arbitrary"``, reversed through the
  index maps for the dK/dV sweep) and the ``[Dk, block_v]`` float32 state (or its cotangent)
  lives in a VMEM scratch, initialised at the first chunk and written out at the last.
* Each grid step sees one chunk's ``(C, D)`` blocks (pipelined by Pallas); the per-channel
  intra-chunk loop reads single rows of those VMEM blocks.
* Chunk-end gates arrive as a ``[Dg, 1]`` column and (scalar gates) the chunk's cumulative gates
  as a ``[1, C]`` row, so no in-kernel transposes are needed.
* ``dq`` and ``dk`` are written as per-``Dv``-tile partials ``[nv, BH, Tp, Dk]`` (summed in XLA),
  as are the per-chunk ``rowsum(dS_T * S_prev)`` of the dQ sweep.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.call_cache import PallasCallCache
from pallas_kernels.chunked_gla import Config, Seg, dkdv_chunk, dq_chunk, fwd_chunk

_CACHE = PallasCallCache()


def _call(c: Config, kernel, *, name: str, args, **kw):
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    return _CACHE(c, kernel, name=name, args=args, interpret=c.interpret, compiler_params=params, **kw)


def _specs(c: Config, names, reverse=False):
    """BlockSpecs over the grid ``(BH, nv, N)``: one chunk of one ``(b*h)``, one ``Dv`` tile."""
    ch = (lambda n: c.N - 1 - n) if reverse else (lambda n: n)
    table = {
        "q": pl.BlockSpec((None, c.C, c.Dk), lambda bh, iv, n: (bh, ch(n), 0)),
        "k": pl.BlockSpec((None, c.C, c.Dk), lambda bh, iv, n: (bh, ch(n), 0)),
        "v": pl.BlockSpec((None, c.C, c.bv), lambda bh, iv, n: (bh, ch(n), iv)),
        "do": pl.BlockSpec((None, c.C, c.bv), lambda bh, iv, n: (bh, ch(n), iv)),
        "g": pl.BlockSpec((None, c.C, c.Dg), lambda bh, iv, n: (bh, ch(n), 0)),
        "g_last": pl.BlockSpec((None, None, 1, c.Dg), lambda bh, iv, n: (bh, ch(n), 0, 0)),
        "g_col": pl.BlockSpec((None, None, c.Dg, 1), lambda bh, iv, n: (bh, ch(n), 0, 0)),
        "g_row": pl.BlockSpec((None, None, 1, c.C), lambda bh, iv, n: (bh, ch(n), 0, 0)),
        "d": pl.BlockSpec((None, c.C, 1), lambda bh, iv, n: (bh, ch(n), 0)),
        "m_in": pl.BlockSpec((None, c.C, 1), lambda bh, iv, n: (bh, ch(n), 0)),
        "m_out": pl.BlockSpec((None, c.C, 1), lambda bh, iv, n: (bh, ch(n), 0)),
        "d_row": pl.BlockSpec((None, None, 1, c.C), lambda bh, iv, n: (bh, ch(n), 0, 0)),
        "state": pl.BlockSpec((None, c.Dk, c.bv), lambda bh, iv, n: (bh, 0, iv)),
        "fin": pl.BlockSpec((None, c.Dk, c.bv), lambda bh, iv, n: (bh, 0, iv)),
        "partial": pl.BlockSpec((None, None, c.C, c.Dk), lambda bh, iv, n: (iv, bh, ch(n), 0)),
    }
    return [table[n] for n in names]


def _inputs(c: Config, names, arrays, seg=None):
    """Drop ``g_row`` / ``d_row`` for per-channel gates; append the segment tables if any."""
    if seg is not None:
        names, arrays = (*names, *Seg._fields), (*arrays, *seg)
    pairs = [(n, a) for n, a in zip(names, arrays) if not (n in ("g_row", "d_row") and not c.scalar)]
    return tuple(n for n, _ in pairs), [a for _, a in pairs]


class _Chunk:
    """The chunk blocks of one grid step.  ``row`` extracts a row with a masked sublane reduction
    (exact: one non-zero term) instead of a load at a dynamic, unaligned sublane offset."""

    def __init__(self, c: Config, names, refs):
        self.c, self.r = c, dict(zip(names, refs))
        # float32 copies of the row-indexed inputs, loaded once outside the intra-chunk loop
        self._f32 = {} if c.scalar else {n: self.r[n][...].astype(jnp.float32)
                                         for n in ("q", "k", "v", "do", "g", "d") if n in self.r}

    def __call__(self, name):
        return self.r[name][...]

    def row(self, name, j):
        x = self._f32[name]
        rid = lax.broadcasted_iota(jnp.int32, (self.c.C, 1), 0)
        return jnp.sum(jnp.where(rid == j, x, 0.0), axis=0, keepdims=True)

    def gates(self):
        g_row = self.r["g_row"][...] if self.c.scalar else None
        return self("g"), self.r["g_last"][...], self.r["g_col"][...], g_row

    def seg(self):
        if "d" not in self.r:
            return None
        return Seg(self("d"), self.r["d_row"][...] if self.c.scalar else None, self("m_in"), self("m_out"))


def _carry(c: Config, state_ref, scratch):
    """Initialise the scratch from the ``state`` input at the first chunk."""
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        scratch[...] = state_ref[...].astype(jnp.float32)

    return n


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, c: Config, names):
    o_ref, st_ref, S_sc = refs[len(names):]
    ch = _Chunk(c, names, refs)
    n = _carry(c, ch.r["state"], S_sc)
    G, g_last, g_col, g_row = ch.gates()
    o, S = fwd_chunk(c, ch.row, ch("q"), ch("k"), ch("v"), G, g_last, g_col, g_row, S_sc[...], ch.seg())
    o_ref[...] = o.astype(o_ref.dtype)
    S_sc[...] = S

    @pl.when(n == c.N - 1)
    def _finish():
        st_ref[...] = S


def forward(c: Config, q, k, v, G, g_last, g_col, g_row, h0, seg=None):
    names, args = _inputs(c, ("q", "k", "v", "g", "g_last", "g_col", "g_row", "state"),
                          (q, k, v, G, g_last, g_col, g_row, h0), seg)
    return _call(c, functools.partial(_fwd_kernel, c=c, names=names), grid=(c.BH, c.nv, c.N),
                 in_specs=_specs(c, names), out_specs=_specs(c, ("v", "state")),
                 out_shape=[jax.ShapeDtypeStruct((c.BH, c.Tp, c.Dv), q.dtype),
                            jax.ShapeDtypeStruct((c.BH, c.Dk, c.Dv), jnp.float32)],
                 scratch_shapes=[pltpu.VMEM((c.Dk, c.bv), jnp.float32)],
                 name="chunked_gla_fwd", args=args)


# ----------------------------------------------------------------------------- dQ (forward sweep)


def _dq_kernel(*refs, c: Config, names):
    dq_ref, p_ref, S_sc = refs[len(names):]
    ch = _Chunk(c, names, refs)
    _carry(c, ch.r["state"], S_sc)
    G, g_last, g_col, g_row = ch.gates()
    S = S_sc[...]
    p_ref[...] = jnp.sum(ch.r["fin"][...] * S, axis=1, keepdims=True)
    dq, S = dq_chunk(c, ch.row, ch("k"), ch("v"), ch("do"), G, g_last, g_col, g_row, S, ch.seg())
    dq_ref[...] = dq
    S_sc[...] = S


def backward_dq(c: Config, k, v, do, G, g_last, g_col, g_row, h0, dst, seg=None):
    """``(dq partials [nv, BH, Tp, Dk], P [nv, BH, N, Dk, 1])`` with ``P_n = rowsum(dS_T * S_prev(n))``
    over this ``Dv`` tile (for the final-state part of ``dlog_g``)."""
    names, args = _inputs(c, ("k", "v", "do", "g", "g_last", "g_col", "g_row", "state", "fin"),
                          (k, v, do, G, g_last, g_col, g_row, h0, dst), seg)
    return _call(c, functools.partial(_dq_kernel, c=c, names=names), grid=(c.BH, c.nv, c.N),
                 in_specs=_specs(c, names),
                 out_specs=[*_specs(c, ("partial",)),
                            pl.BlockSpec((None, None, None, c.Dk, 1), lambda bh, iv, n: (iv, bh, n, 0, 0))],
                 out_shape=[jax.ShapeDtypeStruct((c.nv, c.BH, c.Tp, c.Dk), jnp.float32),
                            jax.ShapeDtypeStruct((c.nv, c.BH, c.N, c.Dk, 1), jnp.float32)],
                 scratch_shapes=[pltpu.VMEM((c.Dk, c.bv), jnp.float32)],
                 name="chunked_gla_dq", args=args)


# ----------------------------------------------------------------------------- dK, dV, dh0 (reverse sweep)


def _dkdv_kernel(*refs, c: Config, names):
    dk_ref, dv_ref, dh0_ref, dS_sc = refs[len(names):]
    ch = _Chunk(c, names, refs)
    n = _carry(c, ch.r["state"], dS_sc)
    G, g_last, g_col, g_row = ch.gates()
    dk, dv, dS = dkdv_chunk(c, ch.row, ch("q"), ch("k"), ch("v"), ch("do"), G, g_last, g_col, g_row, dS_sc[...],
                            ch.seg())
    dk_ref[...] = dk
    dv_ref[...] = dv
    dS_sc[...] = dS

    @pl.when(n == c.N - 1)
    def _finish():
        dh0_ref[...] = dS


def backward_dkdv(c: Config, q, k, v, do, G, g_last, g_col, g_row, dst, seg=None):
    names, args = _inputs(c, ("q", "k", "v", "do", "g", "g_last", "g_col", "g_row", "state"),
                          (q, k, v, do, G, g_last, g_col, g_row, dst), seg)
    return _call(c, functools.partial(_dkdv_kernel, c=c, names=names), grid=(c.BH, c.nv, c.N),
                 in_specs=_specs(c, names, reverse=True), out_specs=_specs(c, ("partial", "v", "state"), reverse=True),
                 out_shape=[jax.ShapeDtypeStruct((c.nv, c.BH, c.Tp, c.Dk), jnp.float32),
                            jax.ShapeDtypeStruct((c.BH, c.Tp, c.Dv), jnp.float32),
                            jax.ShapeDtypeStruct((c.BH, c.Dk, c.Dv), jnp.float32)],
                 scratch_shapes=[pltpu.VMEM((c.Dk, c.bv), jnp.float32)],
                 name="chunked_gla_dkdv", args=args)
