"""Chunked gated linear attention (GLA) in Pallas: GPU (Triton) and TPU (Mosaic), forward and backward.

Paper: Songlin Yang, Bailin Wang, Yikang Shen, Rameswar Panda, Yoon Kim, "Gated Linear Attention
Transformers with Hardware-Efficient Training", 2023, arXiv:2312.06635 (§4, chunkwise form; the
same algorithm as fla's ``chunk_gla``).  Per ``(b, h)``, with ``S`` a float32 ``[Dk, Dv]`` state::

    S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t,     S_0 = h0 (or 0)
    o_t = scale * q_t S_t

``log_g`` is ``[B, T, H, Dk]`` (per-channel gates, GLA) or ``[B, T, H]`` (scalar gates: RetNet,
Lightning, Mamba-2 SSD), ``<= 0``.  Chunk ``n`` of ``C`` tokens, ``G_i`` = cumulative sum of
``log_g`` from the chunk start to position ``i`` (inclusive, so ``G_i <= 0``), ``G_C`` its last row::

    o_i   = scale (q_i * exp(G_i)) S_prev + sum_{j <= i} A_ij v_j
    A_ij  = scale sum_d q_id k_jd exp(G_id - G_jd)
    S_new = diag(exp(G_C)) S_prev + sum_j (k_j * exp(G_C - G_j))^T v_j

Every exponent above is ``<= 0`` (the reference point is the chunk start for the inter-chunk term,
the chunk end for the state update, and the exact pairwise difference inside the chunk), so no
``exp(+large)`` is ever formed and arbitrarily strong gates are safe.  Scalar gates make ``A`` a
masked matmul ``scale (q k^T) * exp(G_i - G_j)`` (default ``C = 64``); per-channel gates compute
the intra-chunk part exactly, one key (or query) row at a time over ``[C, Dk]`` tiles -- the
"diagonal sub-block" path of GLA §4.2 / fla with the whole chunk as one sub-chunk (default
``C = 16``; the inter-chunk FLOPs per token do not depend on ``C``).

Backward (two sweeps, no stored per-chunk states; ``S`` is recomputed)::

    dq_i = scale (do_i S_prev^T) * exp(G_i) + scale sum_{j <= i} (do_i . v_j) k_j * exp(G_i - G_j)
           (forward sweep carrying S; it also returns P_n = rowsum(dS_T * S_prev) per chunk)
    dv_j = (k_j * exp(G_C - G_j)) dS + sum_{i >= j} A_ij do_i
    dk_j = (v_j dS^T) * exp(G_C - G_j) + scale sum_{i >= j} (do_i . v_j) q_i * exp(G_i - G_j)
    dS_prev = diag(exp(G_C)) dS + scale (q * exp(G))^T do,       dh0 = dS before chunk 0
           (reverse sweep carrying dS, started from 0)
    dlog_g_t = sum_{t' >= t} (q_t' * dq_t' - k_t' * dk_t')  +  F_t

The first part of ``dlog_g`` is the identity of GLA/fla: ``q`` and ``k`` enter only as
``q_t exp(Λ_t)`` and ``k_t exp(-Λ_t)`` (``Λ`` the global cumulative log gate), so
``dL/dΛ_t = q_t * dq_t - k_t * dk_t``; for scalar gates it is summed over ``d``.  Two kinds of
O(1) terms cancel exactly in it and would leave their rounding in the (small, for strong gates)
``dlog_g``; both are kept out of the kernels and handled in XLA:

* the ``i == j`` terms ``scale (do_i . v_i) k_i`` of ``dq_i`` and ``scale (do_i . v_i) q_i`` of
  ``dk_i`` (the kernels' intra-chunk masks are strict; the terms are added back to dq/dk);
* the final-state cotangent ``dS_T``: with ``R_j = sum_{t > j} log_g_t`` (a reverse cumsum),
  ``dk_j += exp(R_j) * (v_j dS_T^T)``, ``dv_j += (k_j * exp(R_j)) dS_T``,
  ``dh0 += exp(Λ_T) * dS_T`` and ``F_t = exp(R_{t-1}) * rowsum(dS_T * S_{t-1}) =
  exp(R_{t0-1}) * P_n + sum_{t0 <= j < t} k_j * dk_fin_j`` for ``t`` in chunk ``n`` (starting at
  ``t0``) -- a sum over only the pairs that straddle ``t``, instead of
  ``rowsum(dS_T * S_T) - sum_{j >= t} k_j * dk_fin_j``.

The reverse cumulative sums and the chunk-local cumulative sum of the forward are XLA outside
the kernels.  All kernels tile ``Dv`` (``block_v``): ``S`` columns are independent, and the
``dq``/``dk``/``P`` partial sums over ``Dv`` tiles are added outside the kernels.

Packed documents (``segment_ids``, the semantics of ``attn_jax.linear.common``): padding (id 0) is
made transparent outside the kernels (zero q, k, v and log gate: no write, no decay, zero output);
document starts are tables the kernels read per chunk (``Seg``): the intra-chunk masks also need
``doc_i == doc_j``; only tokens of the chunk's first document, and only if it began before the
chunk, read the carried state (``m_in``); only tokens of the chunk's last document write the state
carried out (``m_out``); a chunk that starts a document drops the carried state (its ``g_col`` is
``-inf``, so ``exp(g_col) S = 0``).  The backward sweeps apply the same masks (``dS`` flows to the
previous chunk only through ``m_in`` rows and ``exp(g_col)``); outside the kernels the final-state
cotangent reaches only the last document (and ``dh0`` only with one document), and ``dlog_g`` is a
reverse cumulative sum within each document (the terms of a whole later document sum to zero
exactly in real arithmetic, not in floating point), zero at document starts.

Deviations / layout: kernels work on ``[B*H, T, D]``; ``T`` is zero-padded to a chunk multiple
(zero q/k/v and zero log gates leave ``o`` and the final state unchanged); on GPU head dims are
zero-padded to a power of two >= 16 (exact).  Matmul operands are cast to the input dtype
(float32 inputs use full-precision float32 dots), accumulation is float32.  The final-state
cotangent costs two float32 ``[T, D] x [D, D]`` XLA matmuls per head in the backward pass, also
when that cotangent is zero (a ``custom_vjp`` cannot tell).  ``log_g > 0`` is not refused (values
are traced) but voids the "exponents <= 0" stability argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import backend_module, next_pow2

__all__ = ["chunked_gla", "unsupported_reasons", "Config", "DEFAULT_CHUNK"]

#: default chunk size by gate kind (per-channel gates use the exact row loop, scalar gates matmuls)
DEFAULT_CHUNK = {"vector": 16, "scalar": 64}
_SUPPORTED_DTYPES = ("float32", "bfloat16")

NN = (((1,), (0,)), ((), ()))   # a @ b
NT = (((1,), (1,)), ((), ()))   # a @ b.T
TN = (((0,), (0,)), ((), ()))   # a.T @ b


@dataclass(frozen=True)
class Config:
    """Static metadata shared by the kernels."""

    platform: str          # "gpu" | "tpu"
    interpret: Any         # False | True | pltpu.InterpretParams
    scale: float
    C: int                 # chunk size
    N: int                 # chunks
    BH: int
    Tp: int                # padded sequence length (N * C)
    Dk: int                # (padded) key dim
    Dv: int                # (padded) value dim
    bv: int                # value-dim tile
    scalar: bool           # scalar gates ([.., 1] gate arrays)
    dtype: str             # input dtype name (matmul operand dtype)
    num_warps: int = 4
    num_stages: int = 2
    segments: bool = False  # packed documents: the kernels read the ``Seg`` tables

    @property
    def nv(self) -> int:
        return self.Dv // self.bv

    @property
    def Dg(self) -> int:
        return 1 if self.scalar else self.Dk


# ----------------------------------------------------------------------------- chunk math
# Backend-independent; both kernels call these on values already loaded from refs.  ``row(name, j)``
# returns row ``j`` (a traced index inside the chunk) of the named input as a float32 ``[1, D]``
# tile (GPU: a row load; TPU: a masked sublane reduction, as Mosaic cannot load from an
# unaligned dynamic sublane offset).


def _f32(x):
    return x.astype(jnp.float32)


def _mm(c: Config, x):
    return x.astype(jnp.dtype(c.dtype))


def _dot(a, b, dims=NN):
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _rows(c: Config):
    return lax.broadcasted_iota(jnp.int32, (c.C, 1), 0)


class Seg(NamedTuple):
    """Packed-document tables of one chunk (float32; see ``_segment_tables``)."""

    d: Any       # [C, 1] document index of each token
    d_row: Any   # [1, C] the same as a row (scalar gates) or None
    m_in: Any    # [C, 1] 1 where the token reads the state carried into the chunk
    m_out: Any   # [C, 1] 1 where the token writes the state carried out of the chunk


def _scalar_decay(c: Config, G, g_row, strict=False, seg=None):
    """``D_ij = exp(G_i - G_j)`` for ``j <= i`` (``j < i`` if strict) in one document, else 0
    (scalar gates; ``G [C, 1]``, ``g_row [1, C]``)."""
    i = lax.broadcasted_iota(jnp.int32, (c.C, c.C), 0)
    j = lax.broadcasted_iota(jnp.int32, (c.C, c.C), 1)
    vis = i > j if strict else i >= j
    if seg is not None:
        vis = vis & (seg.d == seg.d_row)
    return jnp.exp(jnp.where(vis, G - g_row, -jnp.inf))


def _row_vis(row, vis, j, seg):
    """``vis`` (a ``[C, 1]`` mask against row ``j``) restricted to the document of row ``j``."""
    return vis if seg is None else vis & (seg.d == row("d", j))


def _in(seg, x):
    return x if seg is None else x * seg.m_in


def fwd_chunk(c: Config, row, q, k, v, G, g_last, g_col, g_row, S, seg=None):
    """``(o [C, bv] f32, S_new)`` of one chunk; ``S`` is the state before it."""
    s = c.scale
    qf = _f32(q)
    o = s * _dot(_mm(c, _in(seg, qf * jnp.exp(G))), _mm(c, S))
    if c.scalar:
        A = s * _dot(q, k, NT) * _scalar_decay(c, G, g_row, seg=seg)
        o = o + _dot(_mm(c, A), v)
    else:
        rid = _rows(c)

        def body(j, o):
            kj, vj, Gj = _f32(row("k", j)), _f32(row("v", j)), row("g", j)
            E = jnp.exp(jnp.where(_row_vis(row, rid >= j, j, seg), G - Gj, -jnp.inf))  # exp(-inf) = 0 masks
            a = s * jnp.sum(qf * kj * E, axis=1, keepdims=True)
            return o + a * vj

        o = lax.fori_loop(0, c.C, body, o)
    return o, _state_update(c, k, v, G, g_last, g_col, S, seg)


def _state_update(c: Config, k, v, G, g_last, g_col, S, seg=None):
    eg = jnp.exp(g_last - G)
    kg = _f32(k) * (eg if seg is None else eg * seg.m_out)
    return jnp.exp(g_col) * S + _dot(_mm(c, kg), v, TN)


def dq_chunk(c: Config, row, k, v, do, G, g_last, g_col, g_row, S, seg=None):
    """``(dq partial [C, Dk] f32, S_new)``: the ``dq`` terms of this ``Dv`` tile, forward sweep,
    without the ``i == j`` term (added outside, see ``bwd``)."""
    s = c.scale
    dq = s * _dot(do, _mm(c, S), NT) * _in(seg, jnp.exp(G))
    if c.scalar:
        B = _dot(do, v, NT) * _scalar_decay(c, G, g_row, strict=True, seg=seg)
        dq = dq + s * _dot(_mm(c, B), k)
    else:
        rid = _rows(c)
        dof = _f32(do)

        def body(j, dq):
            kj, vj, Gj = _f32(row("k", j)), _f32(row("v", j)), row("g", j)
            E = jnp.exp(jnp.where(_row_vis(row, rid > j, j, seg), G - Gj, -jnp.inf))
            b = jnp.sum(dof * vj, axis=1, keepdims=True)
            return dq + (s * b) * kj * E

        dq = lax.fori_loop(0, c.C, body, dq)
    return dq, _state_update(c, k, v, G, g_last, g_col, S, seg)


def dkdv_chunk(c: Config, row, q, k, v, do, G, g_last, g_col, g_row, dS, seg=None):
    """``(dk partial [C, Dk], dv [C, bv], dS_prev)`` of one chunk, reverse sweep (``dS`` after it);
    ``dk`` without the ``i == j`` term."""
    s = c.scale
    qf, kf, vf = _f32(q), _f32(k), _f32(v)
    eg = jnp.exp(g_last - G)
    if seg is not None:
        eg = eg * seg.m_out
    dSm = _mm(c, dS)
    dv = _dot(_mm(c, kf * eg), dSm)
    dk = _dot(v, dSm, NT) * eg
    if c.scalar:
        D = _scalar_decay(c, G, g_row, seg=seg)
        A = s * _dot(q, k, NT) * D
        dv = dv + _dot(_mm(c, A), do, TN)
        B = _dot(do, v, NT) * _scalar_decay(c, G, g_row, strict=True, seg=seg)
        dk = dk + s * _dot(_mm(c, B), q, TN)
    else:
        rid = _rows(c)

        def body(i, carry):
            dk, dv = carry
            qi, doi, Gi = _f32(row("q", i)), _f32(row("do", i)), row("g", i)
            QE = qi * jnp.exp(jnp.where(_row_vis(row, rid <= i, i, seg), Gi - G, -jnp.inf))
            a = s * jnp.sum(kf * QE, axis=1, keepdims=True)
            b = jnp.where(rid < i, jnp.sum(vf * doi, axis=1, keepdims=True), 0.0)
            return dk + (s * b) * QE, dv + a * doi

        dk, dv = lax.fori_loop(0, c.C, body, (dk, dv))
    dS = jnp.exp(g_col) * dS + s * _dot(_mm(c, _in(seg, qf * jnp.exp(G))), do, TN)
    return dk, dv, dS


# ----------------------------------------------------------------------------- custom VJP


def _gate_tables(c: Config, lg, st=None):
    """``(G, g_last, g_col, g_row)``: chunk-local cumulative log gates ``[BH, Tp, Dg]``, their last
    row per chunk as a row ``[BH, N, 1, Dg]`` and as a column ``[BH, N, Dg, 1]``, and (scalar gates)
    ``G`` as rows ``[BH, N, 1, C]``.  With segment tables ``st``, ``g_col = -inf`` (the carried state
    is dropped: ``exp(g_col) S = 0``) for chunks that start a document."""
    Gc = jnp.cumsum(lg.reshape(c.BH, c.N, c.C, c.Dg), axis=2)
    G = Gc.reshape(c.BH, c.Tp, c.Dg)
    g_last = Gc[:, :, -1:, :]
    g_col = Gc[:, :, -1, :, None]
    if st is not None:
        g_col = jnp.where(st["carries"][:, :, None, None] > 0, g_col, -jnp.inf)
    g_row = Gc.reshape(c.BH, c.N, 1, c.C) if c.scalar else None
    return G, g_last, g_col, g_row


def _kernel_seg(c: Config, st):
    """The per-token tables the kernels read (``Seg`` fields, whole arrays), or None."""
    if st is None:
        return None
    return Seg(st["d"], st["d"].reshape(c.BH, c.N, 1, c.C) if c.scalar else None, st["m_in"], st["m_out"])


def _segment_tables(c: Config, segment_ids, B: int, H: int, T: int):
    """Float32 tables of packed documents (``attn_jax.linear.common.segment_layout`` semantics: id 0 =
    padding, transparent; a document starts where the id differs from the last non-padding id),
    per ``b*h`` row: document index ``d``, ``reset`` (a document start), ``m_in`` / ``m_out`` (the
    token is in the chunk's first document and that document began before the chunk / the token is
    in the chunk's last document), ``last`` (in the row's last document), ``carries`` ``[BH, N]``
    (the chunk starts no document) and ``single`` ``[BH]`` (one document: h0 reaches the final state).
    Positions past ``T`` continue the last document."""
    seg = segment_ids.astype(jnp.int32)
    valid = seg != 0
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    last_valid = lax.cummax(jnp.where(valid, idx, -1), axis=1)
    before = jnp.concatenate([jnp.full((B, 1), -1, jnp.int32), last_valid[:, :-1]], axis=1)
    prev = jnp.take_along_axis(seg, jnp.maximum(before, 0), axis=1)
    reset = valid & (before >= 0) & (prev != seg)
    doc = jnp.cumsum(reset.astype(jnp.int32), axis=1)
    doc = jnp.pad(doc, ((0, 0), (0, c.Tp - T)), mode="edge")
    reset = jnp.pad(reset, ((0, 0), (0, c.Tp - T)))
    docc = doc.reshape(B, c.N, c.C)
    doc_last = docc[:, :, -1]
    doc_before = jnp.concatenate([docc[:, :1, 0], doc_last[:, :-1]], axis=1)   # doc of the token before
    tabs = {"d": doc, "reset": reset, "m_in": (docc == doc_before[..., None]).reshape(B, c.Tp),
            "m_out": (docc == doc_last[..., None]).reshape(B, c.Tp), "last": doc == doc[:, -1:],
            "carries": doc_last == doc_before, "single": doc[:, -1] == 0}
    per_bh = lambda x: jnp.repeat(x.astype(jnp.float32), H, axis=0)             # rows b*H + h
    return {n: per_bh(x)[..., None] if x.ndim == 2 and n != "carries" else per_bh(x) for n, x in tabs.items()}


def _segmented_reverse_cumsum(x, d):
    """``sum_{t' >= t, same document} x_t'`` along axis 1 (``d`` ``[BH, Tp, 1]`` monotone document index)."""
    xr, dr = jnp.flip(x, 1), jnp.flip(d, 1)
    start = jnp.concatenate([jnp.ones_like(dr[:, :1], bool), dr[:, 1:] != dr[:, :-1]], axis=1)
    start = jnp.broadcast_to(start, xr.shape)

    def op(a, b):
        return a[0] | b[0], jnp.where(b[0], b[1], a[1] + b[1])

    return jnp.flip(lax.associative_scan(op, (start, xr), axis=1)[1], 1)


def _make_core(c: Config):
    backend = backend_module(__name__, c.platform)

    def run_fwd(q, k, v, lg, h0, st):
        gates = _gate_tables(c, lg, st)
        o, fin = backend.forward(c, q, k, v, *gates, h0, seg=_kernel_seg(c, st))
        return (o, fin), gates

    @jax.custom_vjp
    def core(q, k, v, lg, h0, st):
        return run_fwd(q, k, v, lg, h0, st)[0]

    def fwd(q, k, v, lg, h0, st):
        (o, fin), gates = run_fwd(q, k, v, lg, h0, st)
        return (o, fin), (q, k, v, lg, h0, st, gates)

    def bwd(res, cts):
        q, k, v, lg, h0, st, gates = res
        do, dst = cts
        do = do.astype(q.dtype)
        dst = dst.astype(jnp.float32)
        kseg = _kernel_seg(c, st)
        dq, P = backend.backward_dq(c, k, v, do, *gates, h0, dst, seg=kseg)
        dq, P = dq.sum(0), P.sum(0)[..., 0]                      # [BH, Tp, Dk], [BH, N, Dk]
        # the reverse sweep starts from dS = 0: the final-state cotangent is handled below
        dk, dv, dh0 = backend.backward_dkdv(c, q, k, v, do, *gates, jnp.zeros_like(dst), seg=kseg)
        dk = dk.sum(0)
        qf, kf = _f32(q), _f32(k)
        dlam = qf * dq - kf * dk                                 # [BH, Tp, Dk]
        # The kernels leave out the i == j term s (do_i . v_i) k_i of dq_i (q_i of dk_i): it cancels
        # exactly in q * dq - k * dk, and would otherwise dominate it (and its rounding) when gates
        # are strong.  It is added back here.
        b_diag = c.scale * jnp.sum(_f32(do) * _f32(v), axis=-1, keepdims=True)
        dq = dq + b_diag * kf
        dk = dk + b_diag * qf
        # Final-state cotangent dS_T, with R_j = sum_{t > j} log_g_t (<= 0; a reverse cumsum, exact
        # near T):  dk_j += exp(R_j) * (v_j dS_T^T),  dv_j += (k_j * exp(R_j)) dS_T,
        # dh0 += exp(R_0 + log_g_0) * dS_T, and dlog_g_t += exp(R_{t-1}) * rowsum(dS_T * S_{t-1})
        # = exp(R_{t0-1}) * P_n + sum_{t0 <= j < t} k_j * dk_fin_j   (t in chunk n starting at t0;
        # P_n = rowsum(dS_T * S_{t0-1}) from the dq sweep).  Summing only terms that straddle t
        # avoids the O(1) cancellation of "rowsum(dS_T * S_T) - sum_{j >= t} k_j * dk_fin_j".
        # Packed documents: only the last document reaches the final state (and h0 only when there
        # is one document); the P term of F_t needs t in the last document and reading the carried
        # state; dlog_g is a reverse cumsum within each document (a whole later document's terms
        # sum to zero) and is zero at document starts (their gate multiplies a zeroed state).
        hp = lax.Precision.HIGHEST
        r_incl = jnp.flip(jnp.cumsum(jnp.flip(lg, 1), axis=1), 1)   # [BH, Tp, Dg]
        w = jnp.exp(r_incl - lg)
        if st is not None:
            w = w * st["last"]
        dk_fin = w * jnp.einsum("bte,bde->btd", _f32(v), dst, precision=hp)
        dv_fin = jnp.einsum("btd,bde->bte", kf * w, dst, precision=hp)
        e0 = jnp.exp(r_incl[:, 0])[:, :, None]
        dh0 = dh0 + (e0 if st is None else e0 * st["single"][:, None, None]) * dst
        x = (kf * dk_fin).reshape(c.BH, c.N, c.C, c.Dk)
        fP = jnp.exp(r_incl[:, ::c.C])[:, :, None, :] * P[:, :, None, :]
        if st is not None:
            fP = fP * (st["m_in"] * st["last"]).reshape(c.BH, c.N, c.C, 1)
        F = (fP + (jnp.cumsum(x, axis=2) - x)).reshape(c.BH, c.Tp, c.Dk)
        if c.scalar:
            dlam = dlam.sum(-1, keepdims=True)
            F = F.sum(-1, keepdims=True)
        if st is None:
            dlg = jnp.flip(jnp.cumsum(jnp.flip(dlam, 1), axis=1), 1) + F
        else:
            dlg = jnp.where(st["reset"] > 0, 0.0, _segmented_reverse_cumsum(dlam, st["d"]) + F)
        dk = dk + dk_fin
        dv = dv + dv_fin
        dtabs = None if st is None else jax.tree.map(jnp.zeros_like, st)  # the tables are constants
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dlg, dh0, dtabs

    core.defvjp(fwd, bwd)
    return core


# ----------------------------------------------------------------------------- public entry


def _platform(platform: str) -> str:
    if platform in ("gpu", "cuda"):
        return "gpu"
    if platform == "tpu":
        return "tpu"
    raise ValueError(f"platform: expected 'gpu', 'cuda' or 'tpu', got {platform!r}")


def unsupported_reasons(q, k, v, log_g, *, initial_state=None, chunk_size: int | None = None,
                        platform: str = "tpu", block_v: int | None = None) -> list[str]:
    """Why :func:`chunked_gla` cannot serve this configuration on ``platform`` (empty: it can).

    Arguments may be arrays or ``jax.ShapeDtypeStruct``.  Shape errors (mismatched dims) are not
    listed here; :func:`chunked_gla` raises ``ValueError`` for them.
    """
    reasons = []
    try:
        plat = _platform(platform)
    except ValueError as e:
        return [str(e)]
    dtypes = {jnp.dtype(x.dtype).name for x in (q, k, v)}
    if len(dtypes) > 1:
        reasons.append(f"q, k, v must share one dtype, got {sorted(dtypes)}")
    for dt in dtypes:
        if dt not in _SUPPORTED_DTYPES:
            reasons.append(f"dtype {dt} is not supported by the chunked GLA kernels (float32 or bfloat16)")
    Dk, Dv = q.shape[-1], v.shape[-1]
    for name, d in (("Dk", Dk), ("Dv", Dv)):
        if not 16 <= d <= 256:
            reasons.append(f"head dim {name}={d} outside [16, 256] supported by the chunked GLA kernels")
    if jnp.dtype(log_g.dtype).name not in ("float32", "bfloat16", "float16"):
        reasons.append(f"log_g dtype {jnp.dtype(log_g.dtype).name} is not a float type")
    if chunk_size is not None:
        if plat == "gpu" and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
            reasons.append(f"chunk_size={chunk_size}: Triton needs a power of two >= 16")
        if plat == "tpu":
            sub = 16 if "bfloat16" in dtypes else 8
            if chunk_size % sub:
                reasons.append(f"chunk_size={chunk_size}: Mosaic needs a multiple of {sub} for {sorted(dtypes)}")
    if block_v is not None:
        Dvp = max(16, next_pow2(Dv)) if plat == "gpu" else Dv
        if Dvp % block_v or (plat == "gpu" and (block_v < 16 or block_v & (block_v - 1))):
            reasons.append(f"block_v={block_v} must divide the (padded) Dv={Dvp}"
                           + (" and be a power of two >= 16" if plat == "gpu" else ""))
        if plat == "tpu" and block_v != Dv and block_v % 128:
            reasons.append(f"block_v={block_v}: Mosaic needs Dv itself or a multiple of 128")
    return reasons


def _check_shapes(q, k, v, log_g, initial_state):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v: expected [B, T, H, D] arrays, got shapes {q.shape}, {k.shape}, {v.shape}")
    B, T, H, Dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k: expected shape {q.shape} (same as q), got {k.shape}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v: expected shape [{B}, {T}, {H}, Dv], got {v.shape}")
    if log_g.shape not in ((B, T, H, Dk), (B, T, H)):
        raise ValueError(f"log_g: expected [B, T, H, Dk] = {(B, T, H, Dk)} (per-channel) or [B, T, H] = "
                         f"{(B, T, H)} (scalar gates), got {log_g.shape}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, v.shape[3]):
        raise ValueError(f"initial_state: expected [B, H, Dk, Dv] = {(B, H, Dk, v.shape[3])}, "
                         f"got {initial_state.shape}")


def chunked_gla(q, k, v, log_g, *, scale: float | None = None, initial_state=None, chunk_size: int | None = None,
                platform: str, interpret: Any = False, block_v: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None, segment_ids=None):
    """Chunked gated linear attention, ``-> (o [B, T, H, Dv] (q.dtype), final_state [B, H, Dk, Dv] f32)``.

    Args:
      q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (float32 or bfloat16, one dtype).
      log_g: log forget gates ``<= 0``, ``[B, T, H, Dk]`` (per channel) or ``[B, T, H]`` (scalar
        gates, handled by a matmul-only intra-chunk path); computed in float32.
      scale: default ``Dk ** -0.5``.
      initial_state: optional float32 ``[B, H, Dk, Dv]`` (differentiable).
      chunk_size: default ``DEFAULT_CHUNK`` (16 per-channel, 64 scalar; shrunk for short T).
      platform: ``"gpu"``/``"cuda"`` (Triton) or ``"tpu"`` (Mosaic).
      interpret: ``False``, ``True`` or (TPU) a ``pltpu.InterpretParams``.
      block_v: ``Dv`` tile per program (default: GPU ``min(Dv, 64)`` (32 when ``Dk > 128``), TPU ``Dv``).
      num_warps, num_stages: Triton launch parameters (default 4, 2).
      segment_ids: optional int ``[B, T]`` packed documents (0 = padding), the semantics of
        ``attn_jax.linear.common``: the state resets to zero at each document start (``h0`` belongs
        to the first document), padding is transparent (no write, no decay; its output, and the
        gradients of its q, k, v, log_g, are zero) and the final state is the last document's.
    """
    _check_shapes(q, k, v, log_g, initial_state)
    if segment_ids is not None:
        if getattr(segment_ids, "shape", None) != q.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids: expected an integer [B, T] = {list(q.shape[:2])} array, got "
                             f"{getattr(segment_ids, 'dtype', None)} {getattr(segment_ids, 'shape', None)}")
        valid = (segment_ids != 0)[:, :, None]
        q, k, v = (jnp.where(valid[..., None], x, jnp.zeros((), x.dtype)) for x in (q, k, v))
        log_g = jnp.where(valid if log_g.ndim == 3 else valid[..., None], log_g, jnp.zeros((), log_g.dtype))
    reasons = unsupported_reasons(q, k, v, log_g, initial_state=initial_state, chunk_size=chunk_size,
                                  platform=platform, block_v=block_v)
    if reasons:
        raise ValueError("chunked_gla cannot serve this call: " + "; ".join(reasons))
    plat = _platform(platform)
    B, T, H, Dk = q.shape
    Dv = v.shape[3]
    scalar = log_g.ndim == 3
    if chunk_size is None:
        C = DEFAULT_CHUNK["scalar" if scalar else "vector"]
        C = min(C, max(16, next_pow2(T)))
    else:
        C = int(chunk_size)
    Tp = -(-T // C) * C
    N = Tp // C
    Dkp, Dvp = (max(16, next_pow2(Dk)), max(16, next_pow2(Dv))) if plat == "gpu" else (Dk, Dv)
    # GPU: a [Dk, block_v] float32 state per program stays within the register file
    bv = block_v or (min(Dvp, 64 if Dkp <= 128 else 32) if plat == "gpu" else Dvp)
    BH = B * H

    def lay(x, D):  # [B, T, H, d] -> [B*H, Tp, D]
        x = x.transpose(0, 2, 1, 3).reshape(BH, T, x.shape[-1])
        return jnp.pad(x, ((0, 0), (0, Tp - T), (0, D - x.shape[-1])))

    lg = log_g.astype(jnp.float32)
    lg = lay(lg[..., None] if scalar else lg, 1 if scalar else Dkp)
    if initial_state is None:
        h0 = jnp.zeros((BH, Dkp, Dvp), jnp.float32)
    else:
        h0 = initial_state.astype(jnp.float32).reshape(BH, Dk, Dv)
        h0 = jnp.pad(h0, ((0, 0), (0, Dkp - Dk), (0, Dvp - Dv)))
    c = Config(platform=plat, interpret=interpret, scale=float(Dk ** -0.5 if scale is None else scale), C=C, N=N,
               BH=BH, Tp=Tp, Dk=Dkp, Dv=Dvp, bv=bv, scalar=scalar, dtype=jnp.dtype(q.dtype).name,
               num_warps=num_warps or 4, num_stages=num_stages or 2, segments=segment_ids is not None)
    tabs = None if segment_ids is None else _segment_tables(c, segment_ids, B, H, T)
    o, st = _make_core(c)(lay(q, Dkp), lay(k, Dkp), lay(v, Dvp), lg, h0, tabs)
    o = o[:, :T, :Dv].reshape(B, H, T, Dv).transpose(0, 2, 1, 3)
    st = st[:, :Dk, :Dv].reshape(B, H, Dk, Dv)
    return o, st
