"""Split-K (flash-decoding) attention kernels over contiguous and paged KV caches (forward only).

Flash-Decoding (Dao, Haziza, Massa, Sizov, 2023); paged layout as in PagedAttention
(Kwon et al., 2023, arXiv:2309.06180; vLLM's PagedAttention V2 splits the same way).

Problem (per row ``b`` with ``L = lengths[b]``, ``o_b = offsets[b]``, default ``L - T``):
query ``t`` (position ``o_b + t``) sees key ``j`` iff ``j < L`` and, with ``causal``,
``j <= o_b + t``.  Logits ``softcap(scale * q.k)`` (``softcap(x) = c tanh(x / c)``).

Layout inside the kernels: the ``G = H / K`` query heads of one kv head and the ``T`` queries
are the rows of one tile (row ``r = t * G + g``, padded to ``M`` rows), so each program reads
its K/V block once for the whole group.  The causal test ``j <= o_b + r // G`` is evaluated
without a vector division as ``r >= (j - o_b) * G``.

Grid ``(B, K, num_splits)`` (TPU: ``(B, K / KH, num_splits, blocks per split)``, the last axis
the sequential reduction).  Each program covers one chunk of ``C = nb * bk`` keys (paged: one
chunk = ``pages_per_split`` pages, one block = one page) and skips blocks past the last visible
key; it writes the chunk's partial ``o`` (float32, normalised) and ``lse`` (``-inf`` for a chunk
without a visible key, then ``o = 0``).  Value rows past the length are zeroed before the
``p @ V`` product, so stale or uninitialised (even NaN) cache slots past ``lengths[b]`` never
reach the output.  :func:`merge_partials` (plain ``jnp``) combines the
splits by LSE and adds the optional per-head sink logit once.

Padding (a copy) happens only when needed: contiguous caches whose ``S`` is not a multiple of
``num_splits * block_k`` are padded with zeros (choose ``block_k * num_splits | S`` for a
copy-free call); on GPU a head dim that is not a power of two is zero-padded.  On TPU, K/V are
viewed as ``[B, S, K * D]`` (free reshape) and a program reads one head's lane slice when
``Dk`` and ``Dv`` are multiples of 128; otherwise one program handles all ``K`` kv heads
(``KH = K``, the full lane width, K/V still read once).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax.numpy as jnp

from pallas_kernels.common import backend_module, next_pow2, round_up

__all__ = ["Config", "decode_attention", "paged_decode_attention", "decode_partials", "paged_decode_partials",
           "merge_partials"]


@dataclass(frozen=True)
class Config:
    B: int
    T: int
    H: int
    K: int
    G: int
    M: int            # rows per tile (T * G padded)
    Dk: int
    Dv: int
    bk: int           # keys per block (paged: page_size)
    nb: int           # blocks per split (paged: pages_per_split)
    n: int            # splits
    KH: int           # kv heads per program (TPU)
    scale: float
    softcap: float | None
    causal: bool
    paged: bool
    num_warps: int = 4
    num_stages: int = 2

    @property
    def C(self) -> int:
        return self.nb * self.bk


def _check(q, k, v, lengths, platform):
    if platform not in ("gpu", "tpu"):
        raise ValueError(f"platform: expected 'gpu' or 'tpu', got {platform!r}")
    if q.ndim != 4:
        raise ValueError(f"q: expected [B, T, H, Dk], got shape {q.shape}")
    B, T, H, Dk = q.shape
    K = k.shape[-2]
    if H % K:
        raise ValueError(f"q: H={H} query heads is not a multiple of K={K} kv heads")
    if k.shape[-1] != Dk:
        raise ValueError(f"k: head dim {k.shape[-1]} differs from q's {Dk}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths: expected int32[{B}], got shape {lengths.shape}")
    return B, T, H, K, Dk, v.shape[-1]


def _rows(platform: str, TG: int) -> int:
    # Triton dots need power-of-two dims >= 16; Mosaic wants sublane multiples of 8.
    return max(16, next_pow2(TG)) if platform == "gpu" else round_up(TG, 8)


def _kh(platform: str, K: int, Dk: int, Dv: int) -> int:
    if platform == "gpu" or K == 1 or (Dk % 128 == 0 and Dv % 128 == 0):
        return 1
    return K


def _prep_q(q, K, M, Dk_pad):
    """``[B, T, H, Dk] -> [B, K, M, Dk_pad]`` (row ``t * G + g``)."""
    B, T, H, Dk = q.shape
    G = H // K
    qg = q.reshape(B, T, K, G, Dk).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, Dk)
    return jnp.pad(qg, ((0, 0), (0, 0), (0, M - T * G), (0, Dk_pad - Dk)))


def _unprep(c: Config, o, lse):
    """Kernel partials ``[B, n, K, M, Dv] / [B, n, K, M]`` -> ``[B, n, T, H, Dv] / [B, n, T, H]``."""
    B, n = o.shape[:2]
    TG = c.T * c.G
    o = o[:, :, :, :TG, :c.Dv].reshape(B, n, c.K, c.T, c.G, c.Dv).transpose(0, 1, 3, 2, 4, 5)
    lse = lse[:, :, :, :TG].reshape(B, n, c.K, c.T, c.G).transpose(0, 1, 3, 2, 4)
    return o.reshape(B, n, c.T, c.H, c.Dv), lse.reshape(B, n, c.T, c.H)


def _interp(interpret, platform):
    if interpret is True:
        from pallas_kernels.testing import interpret_params
        return interpret_params(platform)
    return interpret


def _rows_meta(lengths, offsets, T, cap):
    lengths = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, cap)
    offsets = lengths - T if offsets is None else jnp.asarray(offsets, jnp.int32)
    return lengths, offsets


def decode_partials(q, k, v, lengths, *, offsets=None, num_splits: int = 1, block_k: int | None = None,
                    scale: float | None = None, softcap: float | None = None, causal: bool = True,
                    platform: str = "tpu", interpret=False, num_warps: int | None = None,
                    num_stages: int | None = None):
    """Per-split partials over a contiguous cache ``k: [B, S, K, Dk]``, ``v: [B, S, K, Dv]``.

    Returns ``(o [B, n, T, H, Dv] float32, lse [B, n, T, H] float32)`` with
    ``n = ceil(S / C)`` splits of ``C = block_k * ceil(S / (num_splits * block_k))`` keys
    (``n <= num_splits``; never an empty trailing split).
    """
    B, T, H, K, Dk, Dv = _check(q, k, v, lengths, platform)
    S = k.shape[1]
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits: expected an int >= 1, got {num_splits!r}")
    per = -(-S // num_splits)
    if block_k is None:
        block_k = min(64, max(16, next_pow2(per))) if platform == "gpu" else min(128, round_up(per, 8))
    nb = -(-per // block_k)
    C = nb * block_k
    n = -(-S // C)
    Sp = n * C
    Dkp, Dvp = (next_pow2(Dk), next_pow2(Dv)) if platform == "gpu" else (Dk, Dv)
    if Sp != S or Dkp != Dk or Dvp != Dv:
        k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, Dkp - Dk)))
        v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, Dvp - Dv)))
    G = H // K
    M = _rows(platform, T * G)
    c = Config(B, T, H, K, G, M, Dkp, Dvp, block_k, nb, n, _kh(platform, K, Dk, Dv),
               float(Dk ** -0.5 if scale is None else scale), None if softcap is None else float(softcap),
               bool(causal), False, num_warps or (4 if Dkp <= 64 else 8), num_stages or 2)
    lengths, offsets = _rows_meta(lengths, offsets, T, S)
    kernel = backend_module(__name__, platform)
    o, lse = kernel.partials(c, _prep_q(q, K, M, Dkp), k, v, lengths, offsets, None,
                             interpret=_interp(interpret, platform))
    return _unprep(dataclasses.replace(c, Dv=Dv), o, lse)


def paged_decode_partials(q, k_pages, v_pages, page_table, lengths, *, offsets=None, pages_per_split: int = 1,
                          scale: float | None = None, softcap: float | None = None, causal: bool = True,
                          platform: str = "tpu", interpret=False, num_warps: int | None = None,
                          num_stages: int | None = None):
    """Per-split partials over a paged cache ``k_pages: [P, page_size, K, Dk]`` through
    ``page_table: int32[B, max_pages]`` (``-1`` = unallocated); ``n = ceil(max_pages / pages_per_split)``.
    """
    B, T, H, K, Dk, Dv = _check(q, k_pages, v_pages, lengths, platform)
    ps, Mp = k_pages.shape[1], page_table.shape[1]
    if not isinstance(pages_per_split, int) or pages_per_split < 1:
        raise ValueError(f"pages_per_split: expected an int >= 1, got {pages_per_split!r}")
    pps = min(pages_per_split, Mp)
    n = -(-Mp // pps)
    table = jnp.asarray(page_table, jnp.int32)
    if n * pps != Mp:
        table = jnp.pad(table, ((0, 0), (0, n * pps - Mp)), constant_values=-1)
    Dkp, Dvp = (next_pow2(Dk), next_pow2(Dv)) if platform == "gpu" else (Dk, Dv)
    if Dkp != Dk or Dvp != Dv:   # copies the pool; keep head dims powers of two on GPU
        k_pages = jnp.pad(k_pages, ((0, 0), (0, 0), (0, 0), (0, Dkp - Dk)))
        v_pages = jnp.pad(v_pages, ((0, 0), (0, 0), (0, 0), (0, Dvp - Dv)))
    G = H // K
    M = _rows(platform, T * G)
    c = Config(B, T, H, K, G, M, Dkp, Dvp, ps, pps, n, _kh(platform, K, Dk, Dv),
               float(Dk ** -0.5 if scale is None else scale), None if softcap is None else float(softcap),
               bool(causal), True, num_warps or (4 if Dkp <= 64 else 8), num_stages or 2)
    lengths, offsets = _rows_meta(lengths, offsets, T, Mp * ps)
    kernel = backend_module(__name__, platform)
    o, lse = kernel.partials(c, _prep_q(q, K, M, Dkp), k_pages, v_pages, lengths, offsets, table,
                             interpret=_interp(interpret, platform))
    return _unprep(dataclasses.replace(c, Dv=Dv), o, lse)


def merge_partials(o_part, lse_part, *, sinks=None, dtype=None):
    """Combine split partials ``(o [B, n, T, H, Dv], lse [B, n, T, H])`` by LSE.

    Splits with ``lse = -inf`` contribute nothing; rows with no visible key get ``o = 0``,
    ``lse = -inf``.  ``sinks [H]`` (a per-head logit with a zero value vector) is added once.
    Returns ``(o [B, T, H, Dv] in dtype, lse [B, T, H] float32)``.
    """
    lse_part = lse_part.astype(jnp.float32)
    m = jnp.max(lse_part, axis=1)
    if sinks is not None:
        m = jnp.maximum(m, sinks.astype(jnp.float32)[None, None, :])
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_part - m[:, None])                                   # 0 for empty splits
    total = w.sum(axis=1)
    o = jnp.einsum("bnth,bnthd->bthd", w, o_part.astype(jnp.float32))
    if sinks is not None:
        total = total + jnp.exp(sinks.astype(jnp.float32)[None, None, :] - m)
    safe = jnp.where(total > 0, total, 1.0)
    o = o / safe[..., None]
    lse = jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)
    return o.astype(dtype or o_part.dtype), lse


def decode_attention(q, k, v, lengths, *, offsets=None, num_splits: int = 1, block_k: int | None = None,
                     scale=None, softcap=None, sinks=None, causal: bool = True, platform: str = "tpu",
                     interpret=False, num_warps=None, num_stages=None):
    """Split-K decode attention over a contiguous cache: ``(o [B, T, H, Dv] in q.dtype, lse [B, T, H])``."""
    o, lse = decode_partials(q, k, v, lengths, offsets=offsets, num_splits=num_splits, block_k=block_k,
                             scale=scale, softcap=softcap, causal=causal, platform=platform, interpret=interpret,
                             num_warps=num_warps, num_stages=num_stages)
    return merge_partials(o, lse, sinks=sinks, dtype=q.dtype)


def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, offsets=None, pages_per_split: int = 1,
                           scale=None, softcap=None, sinks=None, causal: bool = True, platform: str = "tpu",
                           interpret=False, num_warps=None, num_stages=None):
    """Split-K decode attention over a paged cache: ``(o [B, T, H, Dv] in q.dtype, lse [B, T, H])``."""
    o, lse = paged_decode_partials(q, k_pages, v_pages, page_table, lengths, offsets=offsets,
                                   pages_per_split=pages_per_split, scale=scale, softcap=softcap, causal=causal,
                                   platform=platform, interpret=interpret, num_warps=num_warps,
                                   num_stages=num_stages)
    return merge_partials(o, lse, sinks=sinks, dtype=q.dtype)
