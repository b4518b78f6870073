"""TPU (Mosaic) split-K decode kernels, contiguous and paged.

* Grid ``(B, K / KH, num_splits, nb)``; the last axis walks the ``nb`` blocks (paged: pages) of
  the split sequentially with the online-softmax state in VMEM scratch.
* ``lengths``, ``offsets`` (and the flattened page table) are scalar-prefetched into SMEM; the
  K/V index maps clamp the block (page slot) to the row's last visible one, so blocks past the
  length repeat the previous index (no new DMA) and their body is skipped with ``pl.when``.
* K/V are viewed as ``[B, S, K * D]`` (pools ``[P, page_size, K * D]``, free reshapes); a
  program reads one head's ``D``-lane slice when ``Dk, Dv`` are multiples of 128 (``KH = 1``),
  else all heads' full lane width (``KH = K``, static per-head loop), so K/V are read once.
* All index arithmetic is int32 with ``lax.div``; the causal test needs no vector division.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention import Config

_NT = (((1,), (1,)), ((), ()))   # a @ b.T


def _last_visible(c: Config, L, off):
    return jnp.minimum(L - 1, off + (c.T - 1)) if c.causal else L - 1


def _kernel(len_ref, off_ref, *refs, c: Config):
    if c.paged:
        refs = refs[1:]   # the table is only read by the index maps
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    b, s, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    L, off = len_ref[b], off_ref[b]
    last = _last_visible(c, L, off)
    start = (s * c.nb + t) * c.bk

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(start <= last)
    def _step():
        r = lax.broadcasted_iota(jnp.int32, (c.M, c.bk), 0)
        j = start + lax.broadcasted_iota(jnp.int32, (c.M, c.bk), 1)
        vis = j < L
        if c.causal:
            vis = vis & (r >= (j - off) * c.G)          # j <= off + r // G
        v_ok = (start + lax.broadcasted_iota(jnp.int32, (c.bk, c.Dv), 0)) < L
        for h in range(c.KH):
            k = k_ref[:, h * c.Dk:(h + 1) * c.Dk]
            v = v_ref[:, h * c.Dv:(h + 1) * c.Dv]
            v = jnp.where(v_ok, v, jnp.zeros_like(v))     # slots past the length may hold garbage
            sc = lax.dot_general(q_ref[h], k, _NT, preferred_element_type=jnp.float32) * c.scale
            if c.softcap is not None:
                sc = jnp.tanh(sc * (1.0 / c.softcap)) * c.softcap
            sc = jnp.where(vis, sc, -jnp.inf)
            m_prev = m_sc[h]
            m_new = jnp.maximum(m_prev, sc.max(axis=1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(sc - m_safe)
            alpha = jnp.exp(m_prev - m_safe)
            l_sc[h] = alpha * l_sc[h] + p.sum(axis=1, keepdims=True)
            acc_sc[h] = alpha * acc_sc[h] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            m_sc[h] = m_new

    @pl.when(t == c.nb - 1)
    def _finish():
        l = l_sc[...]
        has = l > 0
        l_safe = jnp.where(has, l, 1.0)
        o_ref[...] = acc_sc[...] / l_safe
        m = m_sc[...]
        lse_ref[...] = jnp.where(has, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(l_safe), -jnp.inf)


def partials(c: Config, q, k, v, lengths, offsets, table, *, interpret=False):
    """``q [B, K, M, Dk]``; ``k/v`` ``[B, n*C, K, D]`` or pools ``[P, ps, K, D]``; ``table [B, n*pps]``.

    Returns ``(o [B, n, K, M, Dv] float32, lse [B, n, K, M] float32)``.
    """
    KH, KG = c.KH, c.K // c.KH
    k = k.reshape(*k.shape[:2], c.K * c.Dk)
    v = v.reshape(*v.shape[:2], c.K * c.Dv)

    if c.paged:
        W = table.shape[1]

        def kv_map(b, hg, s, t, ln, of, tab):
            last = _last_visible(c, ln[b], of[b])
            slot = jnp.minimum(s * c.nb + t, jnp.maximum(lax.div(last, c.bk), 0))
            return jnp.maximum(tab[b * W + slot], 0), 0, hg

        prefetch = [lengths, offsets, table.reshape(-1)]
        q_map = lambda b, hg, s, t, *_: (b, hg, 0, 0)
        o_map = lambda b, hg, s, t, *_: (b, s, hg, 0, 0)
    else:
        def kv_map(b, hg, s, t, ln, of):
            last = _last_visible(c, ln[b], of[b])
            return b, jnp.minimum(s * c.nb + t, jnp.maximum(lax.div(last, c.bk), 0)), hg

        prefetch = [lengths, offsets]
        q_map = lambda b, hg, s, t, *_: (b, hg, 0, 0)
        o_map = lambda b, hg, s, t, *_: (b, s, hg, 0, 0)

    kv_block = lambda D: (None, c.bk, KH * D)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=(c.B, KG, c.n, c.nb),
        in_specs=[pl.BlockSpec((None, KH, c.M, c.Dk), q_map),
                  pl.BlockSpec(kv_block(c.Dk), kv_map),
                  pl.BlockSpec(kv_block(c.Dv), kv_map)],
        out_specs=[pl.BlockSpec((None, None, KH, c.M, c.Dv), o_map),
                   pl.BlockSpec((None, None, KH, c.M, 1), o_map)],
        scratch_shapes=[pltpu.VMEM((KH, c.M, 1), jnp.float32), pltpu.VMEM((KH, c.M, 1), jnp.float32),
                        pltpu.VMEM((KH, c.M, c.Dv), jnp.float32)])
    fn = pl.pallas_call(
        functools.partial(_kernel, c=c), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((c.B, c.n, c.K, c.M, c.Dv), jnp.float32),
                   jax.ShapeDtypeStruct((c.B, c.n, c.K, c.M, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="paged_decode_attention" if c.paged else "decode_attention")
    o, lse = fn(*prefetch, q, k, v)
    return o, lse[..., 0]
