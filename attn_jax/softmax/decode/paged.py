"""Paged attention over a :class:`~attn_jax.softmax.kv_cache.PagedKVCache` (the PAGED registry)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.core.bias import StructuredBias
from attn_jax.core.dispatch import Registry
from attn_jax.softmax.decode import pallas as decode_pallas
from attn_jax.softmax.decode.contiguous import attend_chunks
from attn_jax.softmax.decode.problem import DecodeProblem, decode_problem, resolve_method
from attn_jax.softmax.kv_cache import PagedKVCache

__all__ = ["PAGED", "PagedProblem", "paged_attention"]


@dataclass(frozen=True)
class PagedProblem:
    """A decode problem over a page pool plus the static split size (pages per chunk)."""

    decode: DecodeProblem
    pages_per_split: int


def _paged_xla(pp: PagedProblem, q, cache, lengths, offset, bias, sinks):
    B, M, ps = cache.batch, cache.max_pages_per_seq, cache.page_size
    pps = min(pp.pages_per_split, M)
    n = -(-M // pps)
    table = cache.page_table
    if n * pps != M:
        table = jnp.pad(table, ((0, 0), (0, n * pps - M)), constant_values=-1)  # pad the table, not the pool
    kp, vp = cache.gather_pages(table)                                           # [B, n*pps, ps, K, D]
    C = pps * ps
    kc = kp.reshape(B * n, C, *kp.shape[3:])
    vc = vp.reshape(B * n, C, *vp.shape[3:])
    return attend_chunks(pp.decode, q, kc, vc, n, C, lengths, offset, bias, sinks)


def _paged_xla_unsupported(platform, pp: PagedProblem):
    return []


#: Paged attention methods: "xla" (per-chunk gather + split-K merge) and "pallas" (opt-in kernels).
PAGED = Registry("paged_attention")
PAGED.register("xla", _paged_xla, _paged_xla_unsupported)
PAGED.register("pallas", decode_pallas.paged_decode_pallas, decode_pallas.paged_unsupported, auto=False)


def paged_attention(q: Float[Array, "B T H Dk"], cache: PagedKVCache, *, offset=None, pages_per_split: int = 1,
                    window: int | None = None, bias=None, scale=None, softcap=None, sinks=None,
                    return_lse: bool = False, impl="auto", causal: bool = True, attention_impl="auto",
                    method=None):
    """Attention over a :class:`PagedKVCache` through its page table, ``pages_per_split`` pages per chunk.

    Same semantics as :func:`decode_attention` over ``cache.gather()`` with
    ``lengths = cache.lengths``; dense ``bias`` arrays are not supported here.  ``impl``:
    ``"auto"``/``"xla"`` (gather ``pages_per_split`` pages per chunk, attend, merge by LSE) or
    ``"pallas"`` (the paged Pallas kernels; GPU/TPU only, opt-in) -- see :data:`PAGED`.
    """
    impl = resolve_method("paged_attention", impl, method)
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache: expected a PagedKVCache, got {type(cache).__name__}")
    if isinstance(pages_per_split, bool) or not isinstance(pages_per_split, int) or pages_per_split < 1:
        raise ValueError(f"pages_per_split: expected an int >= 1, got {pages_per_split!r}")
    if bias is not None and not isinstance(bias, StructuredBias):
        raise ValueError("bias: dense bias arrays are not supported by paged_attention; use a StructuredBias "
                         "or prefill(..., impl='gather')")
    B, M, ps = cache.batch, cache.max_pages_per_seq, cache.page_size
    shape_k = jax.ShapeDtypeStruct((B, M * ps, cache.kv_heads, cache.k_pages.shape[3]), cache.dtype)
    shape_v = jax.ShapeDtypeStruct((B, M * ps, cache.kv_heads, cache.v_pages.shape[3]), cache.dtype)
    p, lengths, offset = decode_problem(q, shape_k, shape_v, cache.lengths, offset, num_splits=None, window=window,
                                        mask=None, bias=bias, scale=scale, softcap=softcap, sinks=sinks,
                                        dropout_rate=0.0, dropout_rng=None, return_lse=return_lse,
                                        attention_impl=attention_impl, causal=causal)
    return PAGED.call(impl, PagedProblem(p, pages_per_split), q, cache, lengths, offset, bias, sinks)
