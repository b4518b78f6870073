"""GPU (Triton backend of Pallas) split-K decode kernels, contiguous and paged.

One program per ``(b, kv head, split)``; the chunk's blocks are an in-kernel ``fori_loop`` whose
trip count stops at the last visible key of the row (``lengths`` / ``offsets`` are loaded as
scalars), so blocks past the length cost nothing.  Contiguous K/V are addressed in their
``[B, S, K, D]`` layout (the kv-head axis squeezed by the BlockSpec, strided loads); paged K/V
pass the whole pool and each iteration loads the page index from the table, then the page.
The Triton backend is selected explicitly with ``plgpu.CompilerParams``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode_attention import Config

_NT = (((1,), (1,)), ((), ()))   # a @ b.T


def _full(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _kernel(*refs, c: Config):
    if c.paged:
        len_ref, off_ref, tab_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    else:
        len_ref, off_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    b, s = pl.program_id(0), pl.program_id(2)
    L, off = len_ref[b], off_ref[b]
    last = jnp.minimum(L - 1, off + (c.T - 1)) if c.causal else L - 1      # last visible key of any row
    start = s * c.C
    nvis = jnp.clip(lax.div(last - start + c.bk, c.bk), 0, c.nb)
    q = q_ref[...]
    r = lax.broadcasted_iota(jnp.int32, (c.M, c.bk), 0)
    jj = lax.broadcasted_iota(jnp.int32, (c.M, c.bk), 1)

    def body(t, carry):
        m_prev, l_prev, acc = carry
        if c.paged:
            pg = jnp.maximum(tab_ref[b, s * c.nb + t], 0)
            k, v = k_ref[pg], v_ref[pg]
        else:
            rows = pl.ds(t * c.bk, c.bk)
            k, v = k_ref[rows, :], v_ref[rows, :]
        j = start + t * c.bk + jj
        jv = start + t * c.bk + lax.broadcasted_iota(jnp.int32, (c.bk, c.Dv), 0)
        v = jnp.where(jv < L, v, jnp.zeros_like(v))   # slots past the length may hold garbage
        sc = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * c.scale
        if c.softcap is not None:
            sc = jnp.tanh(sc * (1.0 / c.softcap)) * c.softcap
        vis = j < L
        if c.causal:
            vis = vis & (r >= (j - off) * c.G)          # j <= off + r // G
        sc = jnp.where(vis, sc, -jnp.inf)
        m_new = jnp.maximum(m_prev, sc.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(sc - m_safe[:, None])
        alpha = jnp.exp(m_prev - m_safe)
        l_new = alpha * l_prev + p.sum(axis=1)
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l_new, acc

    m0 = jnp.full((c.M,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((c.M,), jnp.float32)
    acc0 = jnp.zeros((c.M, c.Dv), jnp.float32)
    m, l, acc = lax.fori_loop(0, nvis, body, (m0, l0, acc0))
    has = l > 0
    l_safe = jnp.where(has, l, 1.0)
    o_ref[...] = acc / l_safe[:, None]
    lse_ref[...] = jnp.where(has, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(l_safe), -jnp.inf)


def partials(c: Config, q, k, v, lengths, offsets, table, *, interpret=False):
    """``q [B, K, M, Dk]``; ``k/v`` ``[B, n*C, K, D]`` or pools ``[P, ps, K, D]``; ``table [B, n*pps]``.

    Returns ``(o [B, n, K, M, Dv] float32, lse [B, n, K, M] float32)``.
    """
    q_spec = pl.BlockSpec((None, None, c.M, c.Dk), lambda b, h, s: (b, h, 0, 0))
    if c.paged:
        P, ps = k.shape[:2]
        kv_specs = [pl.BlockSpec((P, ps, None, c.Dk), lambda b, h, s: (0, 0, h, 0)),
                    pl.BlockSpec((P, ps, None, c.Dv), lambda b, h, s: (0, 0, h, 0))]
        args = [lengths, offsets, table, q, k, v]
        specs = [_full(lengths), _full(offsets), _full(table), q_spec, *kv_specs]
    else:
        kv_specs = [pl.BlockSpec((None, c.C, None, c.Dk), lambda b, h, s: (b, s, h, 0)),
                    pl.BlockSpec((None, c.C, None, c.Dv), lambda b, h, s: (b, s, h, 0))]
        args = [lengths, offsets, q, k, v]
        specs = [_full(lengths), _full(offsets), q_spec, *kv_specs]
    fn = pl.pallas_call(
        functools.partial(_kernel, c=c), grid=(c.B, c.K, c.n), in_specs=specs,
        out_specs=[pl.BlockSpec((None, None, None, c.M, c.Dv), lambda b, h, s: (b, s, h, 0, 0)),
                   pl.BlockSpec((None, None, None, c.M), lambda b, h, s: (b, s, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((c.B, c.n, c.K, c.M, c.Dv), jnp.float32),
                   jax.ShapeDtypeStruct((c.B, c.n, c.K, c.M), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages),
        interpret=interpret, name="paged_decode_attention" if c.paged else "decode_attention")
    return fn(*args)
