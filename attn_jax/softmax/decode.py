"""Prefill and step decoding over KV caches; flash-decoding (split-K) and paged attention.

Caches: "Fast Transformer Decoding: One Write-Head is All You Need", Shazeer,
2019, arXiv:1911.02150 (incremental decoding with cached K/V; MQA/GQA shrink the
cache, which is the memory traffic of every step).  Pages: "Efficient Memory
Management for Large Language Model Serving with PagedAttention", Kwon et al.,
2023, arXiv:2309.06180.  Split-K: Flash-Decoding (Dao, Haziza, Massa, Sizov,
2023, blog "Flash-Decoding for long-context inference"; FlashDecoding++, Hong et
al., 2023, arXiv:2311.01282).  The caches themselves live in
:mod:`attn_jax.softmax.kv_cache`.

**Alignment.**  Query ``t`` of a chunk appended to row ``b`` sits at absolute
position ``L_b + t`` with ``L_b = lengths_before[b]``, and the keys of the cache
are at positions ``0 .. L_b + n_b - 1``.  So prefill of a chunk is exact
attention over the updated cache with the mask

    causal(offset=L) & key_padding(L + n)          [& sliding_window(w, offset=L)]

(``offset`` per row, an int32 ``[B]`` array).  It is computed in two exact parts merged
by LSE (below): the queries over the cached keys ``j < L`` (``key_padding(L)`` only —
every cached key precedes every query) and over the chunk itself (static ``causal()``,
``T x T``); an extra ``mask=``, a dense bias or dropout use the single call above over
the written cache instead.  Several prefill calls (chunked
prefill), one prefill then ``T = 1`` steps, or a single full forward all give
the same outputs.  Rows of a batch may hold different lengths; ``n_new[b] <=
T`` valid tokens per row (a batch of prompts of different lengths); padding
queries (``t >= n_new[b]``) get zero output.  Structured biases (ALiBi, T5, any
:class:`~attn_jax.core.bias.StructuredBias`) are evaluated at the true absolute
positions of queries and keys (a per-row shift, see :class:`PositionedBias`), so
relative *and* absolute position biases are exact.  Dense bias arrays are in the
key layout of the cache (``[B|1, H|1, T, S_max]``).

**Split-K (flash-decoding).**  With few queries (``B * T * H`` small) a single
pass over a long cache has little parallelism; split the ``S`` keys into ``P``
chunks ``S_1 .. S_P``, attend to each independently (in one batched call, the
chunks become batch rows) and merge exactly with the log-sum-exp:

    o_p, lse_p = attention(q, K[S_p], V[S_p])        lse_p = log sum_{j in S_p} exp(s_j)
    lse = log sum_p exp(lse_p)
    o   = sum_p exp(lse_p - lse) * o_p

A chunk with no visible key (``lse_p = -inf``: entirely past the row's length)
contributes nothing.  Learned sinks are added once, after the merge:
``lse' = logaddexp(lse, sink_h)``, ``o' = exp(lse - lse') * o``.  Chunks of
``C = ceil(S / P)`` keys: when ``P`` does not divide ``S`` the keys are padded
(a copy); choose ``P | S`` for a copy-free reshape.

**Paged attention** attends over the page pool through the page table, one
chunk per ``pages_per_split`` pages (the split-K merge above, as in vLLM's
PagedAttention V2); ``method="gather"`` instead rebuilds the contiguous cache
(:meth:`PagedKVCache.gather`) and attends once — the gather reference.

**Ring buffer** (sliding window ``w``): the ring of ``W >= w`` slots is rolled
into chronological order (index ``j`` = position ``L - W + j``), the new chunk
is appended, and the queries attend over those ``W + T`` keys with
``causal(offset=W) & sliding_window(w, offset=W) & segments(valid)`` (empty slots
and padding tokens have segment id 0) — *before* the chunk is written, because
a chunk longer than ``W - w`` overwrites keys its own first queries need.

Dispatch: :data:`DECODE` (``method=``) has ``"split_k"`` (chosen by ``"auto"``
when ``num_splits`` is given) and ``"direct"`` (one :func:`attn_jax.attention`
call over the whole cache); ``impl=`` is passed to :func:`attn_jax.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attn_jax.core import masks
from attn_jax.core import validation as V
from attn_jax.core.bias import StructuredBias
from attn_jax.core.dispatch import Decision, Registry
from attn_jax.softmax import decode_pallas as _decode_pallas
from attn_jax.softmax.api import attention, merge_attention
from attn_jax.softmax.kv_cache import KVCache, PagedKVCache, RingKVCache, _n_new

__all__ = [
    "DECODE", "DecodeProblem", "PositionedBias", "decode_attention", "decode_attention_split_k", "explain_decode",
    "paged_attention", "prefill", "decode_step",
]

DECODE = Registry("decode_attention")


# ----------------------------------------------------------------------------- positioned biases


@jax.tree_util.register_pytree_node_class
class PositionedBias(StructuredBias):
    """A structured bias evaluated at explicit per-row absolute positions.

    ``tile(q_idx, k_idx, T, S)`` of row ``r`` is ``inner`` evaluated for queries at
    absolute positions ``q_idx + q_offset[r]`` and keys at ``k_idx + k_offset[r]``
    (the inner bias sees ``query_positions(q', T, S) = q_idx + q_offset[r]``).
    ``batch_index[r]`` selects the row of a batch-dependent inner bias.  Output
    ``[R, H, tq, tk]``.  Assumes, like every bias in attn_jax, that the inner bias
    places queries with :func:`attn_jax.core.bias.query_positions`.
    """

    def __init__(self, inner: StructuredBias, q_offset, k_offset, batch_index):
        self.inner = inner
        self.q_offset = q_offset
        self.k_offset = k_offset
        self.batch_index = batch_index
        self.num_heads = inner.num_heads

    def tile(self, q_idx, k_idx, T: int, S: int):
        q_idx = jnp.asarray(q_idx, jnp.int32)
        k_idx = jnp.asarray(k_idx, jnp.int32)

        def one(qo, ko, bi):
            out = jnp.asarray(self.inner.tile(q_idx + (qo - (S - T)), k_idx + ko, T, S), jnp.float32)
            if out.ndim != 4:
                raise ValueError(f"bias: {type(self.inner).__name__}.tile must return rank 4, got {out.shape}")
            return out[0] if out.shape[0] == 1 else out[bi]

        return jax.vmap(one)(self.q_offset, self.k_offset, self.batch_index)

    def parameters(self):
        return self.inner.parameters()

    def tree_flatten(self):
        return (self.inner, self.q_offset, self.k_offset, self.batch_index), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.inner, obj.q_offset, obj.k_offset, obj.batch_index = children
        obj.num_heads = getattr(obj.inner, "num_heads", None)
        return obj

    def __repr__(self):
        return f"PositionedBias({self.inner!r})"


def _positioned(bias, q_offset, k_offset, batch_index):
    if not isinstance(bias, StructuredBias):
        return bias
    R = q_offset.shape[0]
    as_rows = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32), (R,))
    return PositionedBias(bias, as_rows(q_offset), as_rows(k_offset), as_rows(batch_index))


# ----------------------------------------------------------------------------- problem + validation


@dataclass(frozen=True)
class DecodeProblem:
    """Static description of a :func:`decode_attention` call (what ``unsupported`` inspects)."""

    dims: V.AttentionDims
    dtype: Any
    num_splits: int | None
    window: int | None
    mask: masks.Mask | None
    bias_kind: str              # "none" | "dense" | "structured"
    scale: float | None
    softcap: float | None
    has_sinks: bool
    dropout_rate: float
    return_lse: bool
    impl: Any                   # passed to attn_jax.attention
    causal: bool = True


def _int_rows(name: str, x, B: int):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer array of shape [B], got dtype {x.dtype}")
    if x.ndim == 0:
        x = jnp.broadcast_to(x, (B,))
    if x.shape != (B,):
        raise ValueError(f"{name}: expected shape [{B}] (or a scalar), got {V.shape_str(x)}")
    return x.astype(jnp.int32)


def _bias_kind(bias) -> str:
    return "none" if bias is None else ("structured" if isinstance(bias, StructuredBias) else "dense")


def _check_window(window):
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window: expected an int >= 0 (keys p - window .. p are visible), got {window!r}")
    return window


def _check_splits(num_splits, S):
    if num_splits is None:
        return None
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits: expected an int >= 1, got {num_splits!r}")
    return num_splits


# ----------------------------------------------------------------------------- implementations


def _apply_sinks(o, lse, sinks):
    """Add the per-head sink logit to the denominator once (after a split-K merge)."""
    sink = sinks.astype(jnp.float32)[None, None, :]
    total = jnp.logaddexp(lse, sink)
    w = jnp.exp(lse - total)  # 0 where lse = -inf
    return (o.astype(jnp.float32) * w[..., None]).astype(o.dtype), total


def _direct(p: DecodeProblem, q, k, v, lengths, offset, bias, sinks, dropout_rng):
    m = masks.key_padding(lengths)
    if p.causal:
        m = masks.causal(offset=offset) & m
    if p.window is not None:
        m = m & masks.sliding_window(p.window, offset=offset)
    if p.mask is not None:
        m = m & p.mask
    B = q.shape[0]
    bias = _positioned(bias, offset, 0, jnp.arange(B, dtype=jnp.int32))
    return attention(q, k, v, mask=m, bias=bias, scale=p.scale, softcap=p.softcap, sinks=sinks,
                     dropout_rate=p.dropout_rate, dropout_rng=dropout_rng, return_lse=p.return_lse, impl=p.impl)


def _attend_chunks(p: DecodeProblem, q, kc, vc, n: int, C: int, lengths, offset, bias, sinks):
    """Flash-decoding over ``n`` key chunks of ``C`` keys: ``kc: [B*n, C, K, Dk]`` (row-major in b).

    Chunk ``c`` of row ``b`` holds key positions ``c*C .. c*C + C - 1``.  ``bias`` is None,
    structured, or dense already chunked to ``[B*n|n, H|1, T, C]``.
    """
    B, T, H, Dk = q.shape
    start = jnp.tile(jnp.arange(n, dtype=jnp.int32) * C, B)                       # [B*n]
    rep = lambda x: jnp.repeat(x, n, axis=0, total_repeat_length=B * n)
    qr = jnp.broadcast_to(q[:, None], (B, n, T, H, Dk)).reshape(B * n, T, H, Dk)
    off_r = rep(offset) - start
    m = masks.key_padding(rep(lengths) - start)
    if p.causal:
        m = masks.causal(offset=off_r) & m
    if p.window is not None:
        m = m & masks.sliding_window(p.window, offset=off_r)
    if isinstance(bias, StructuredBias):
        bias = _positioned(bias, rep(offset), start, rep(jnp.arange(B, dtype=jnp.int32)))
    o, lse = attention(qr, kc, vc, mask=m, bias=bias, scale=p.scale, softcap=p.softcap, return_lse=True,
                       impl=p.impl)
    Dv = o.shape[-1]
    o = o.reshape(B, n, T, H, Dv)
    lse = lse.reshape(B, n, T, H)
    o, lse = merge_attention([(o[:, i], lse[:, i]) for i in range(n)], return_lse=True)
    if sinks is not None:
        o, lse = _apply_sinks(o, lse, sinks)
    return (o, lse) if p.return_lse else o


def _chunk_dense_bias(bias, B: int, n: int, C: int, S: int):
    """Dense bias ``[Bb, Hb, T, S]`` -> ``[B*n, Hb, T, C]`` (row-major in b)."""
    Bb, Hb, T, Sb = bias.shape
    if Sb == 1:
        return jnp.broadcast_to(bias[:, None], (Bb, n, Hb, T, 1)).reshape(Bb * n, Hb, T, 1) if Bb == B else bias
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, n * C - S)))
    bias = bias.reshape(Bb, Hb, T, n, C).transpose(0, 3, 1, 2, 4)
    return jnp.broadcast_to(bias, (B, n, Hb, T, C)).reshape(B * n, Hb, T, C)


def _split_k(p: DecodeProblem, q, k, v, lengths, offset, bias, sinks, dropout_rng):
    B, S = k.shape[:2]
    n = min(p.num_splits, S)
    C = -(-S // n)
    n = -(-S // C)  # e.g. S=10, P=4: C=3 -> 4 chunks; S=10, P=6: C=2 -> 5 chunks (never an empty chunk)
    if n * C != S:
        pad = ((0, 0), (0, n * C - S), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    kc = k.reshape(B * n, C, *k.shape[2:])
    vc = v.reshape(B * n, C, *v.shape[2:])
    if bias is not None and not isinstance(bias, StructuredBias):
        bias = _chunk_dense_bias(bias, B, n, C, S)
    return _attend_chunks(p, q, kc, vc, n, C, lengths, offset, bias, sinks)


def _direct_unsupported(platform, p: DecodeProblem):
    return []


def _split_k_unsupported(platform, p: DecodeProblem):
    reasons = []
    if p.num_splits is None:
        reasons.append("num_splits not given")
    if p.dropout_rate > 0:
        reasons.append("dropout: the counter-based keep mask is indexed by key position; splitting is not "
                       "implemented for it")
    if p.mask is not None:
        reasons.append("mask: an arbitrary mask cannot be re-indexed per key chunk (use window=, or "
                       "method='direct')")
    return reasons


DECODE.register("split_k", _split_k, _split_k_unsupported)
DECODE.register("direct", _direct, _direct_unsupported)
# Opt-in until the kernels have run on hardware (checked in interpret mode and by lowering only).
DECODE.register("pallas", _decode_pallas.decode_pallas, _decode_pallas.unsupported, auto=False)


# ----------------------------------------------------------------------------- public: contiguous


def _problem(q, k, v, lengths, offset, *, num_splits, window, mask, bias, scale, softcap, sinks, dropout_rate,
             dropout_rng, return_lse, impl, causal=True):
    dims = V.check_qkv(q, k, v)
    lengths = _int_rows("lengths", lengths, dims.B)
    offset = lengths - dims.T if offset is None else _int_rows("offset", offset, dims.B)
    mask = masks.as_mask(mask)
    if mask is not None:
        mask.check(dims.B, dims.H, dims.T, dims.S)
    V.check_dropout(dropout_rate, dropout_rng)
    V.check_sinks(sinks, dims.H)
    if bias is not None and not isinstance(bias, StructuredBias):
        V.check_float_array("bias", bias)
        V.check_broadcastable("bias", bias, (dims.B, dims.H, dims.T, dims.S), "[B|1, H|1, T, S]")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    p = DecodeProblem(dims, q.dtype, _check_splits(num_splits, dims.S), _check_window(window), mask, _bias_kind(bias),
                      scale, softcap, sinks is not None, float(dropout_rate), return_lse, impl, bool(causal))
    return p, lengths, offset


def decode_attention(q: Float[Array, "B T H Dk"], k: Float[Array, "B S K Dk"], v: Float[Array, "B S K Dv"], *,
                     lengths: Int[Array, "B"], offset: Int[Array, "B"] | None = None, window: int | None = None,
                     mask=None, bias=None, scale: float | None = None, softcap: float | None = None,
                     sinks: Float[Array, "H"] | None = None, dropout_rate: float = 0.0, dropout_rng=None,
                     return_lse: bool = False, method="auto", num_splits: int | None = None, impl="auto",
                     causal: bool = True):
    """Attention of ``T`` new queries over a contiguous cache holding ``lengths[b]`` valid keys.

    Query ``t`` of row ``b`` is at position ``offset[b] + t`` (default ``lengths[b] - T``:
    the last query is the last key) and sees keys ``j <= offset[b] + t`` (only with
    ``causal=True``) with ``j < lengths[b]`` (and ``j >= offset[b] + t - window`` when
    ``window`` is given).
    ``method``: ``"auto"``, ``"direct"`` or ``"split_k"`` (needs ``num_splits``); ``impl`` is
    passed to :func:`attn_jax.attention`.  ``mask`` (``&``-ed in; cache coordinates) is
    only supported by ``"direct"``.  Returns ``o: [B, T, H, Dv]`` (and ``lse`` ``[B, T, H]``).
    """
    p, lengths, offset = _problem(q, k, v, lengths, offset, num_splits=num_splits, window=window, mask=mask,
                                  bias=bias, scale=scale, softcap=softcap, sinks=sinks, dropout_rate=dropout_rate,
                                  dropout_rng=dropout_rng, return_lse=return_lse, impl=impl, causal=causal)
    return DECODE.call(method, p, q, k, v, lengths, offset, bias, sinks, dropout_rng)


def explain_decode(q, k, v, *, lengths, offset=None, method="auto", num_splits=None, window=None, mask=None,
                   bias=None, sinks=None, dropout_rate=0.0, return_lse=False, platform=None) -> Decision:
    """Which :data:`DECODE` method :func:`decode_attention` would use, and why the others cannot."""
    rng = jax.random.key(0) if dropout_rate > 0 else None
    p, _, _ = _problem(q, k, v, lengths, offset, num_splits=num_splits, window=window, mask=mask, bias=bias,
                       scale=None, softcap=None, sinks=sinks, dropout_rate=dropout_rate, dropout_rng=rng,
                       return_lse=return_lse, impl="auto")
    return DECODE.explain(method, p, platform)


def decode_attention_split_k(q: Float[Array, "B T H Dk"], cache_or_kv, lengths: Int[Array, "B"] | None = None, *,
                             num_splits: int, offset=None, window: int | None = None, bias=None,
                             scale: float | None = None, softcap: float | None = None, sinks=None,
                             return_lse: bool = False, impl="auto"):
    """Flash-decoding: split the keys into ``num_splits`` chunks, attend to each, merge by LSE.

    ``cache_or_kv``: a :class:`KVCache` (``lengths`` defaults to its fill) or a ``(k, v)`` pair.
    Equal to ``decode_attention(..., method="direct")`` for any ``num_splits`` (rows whose
    chunk lies entirely past their length contribute ``lse = -inf`` parts).
    """
    if isinstance(cache_or_kv, KVCache):
        k, v = cache_or_kv.k, cache_or_kv.v
        lengths = cache_or_kv.lengths if lengths is None else lengths
    elif isinstance(cache_or_kv, (tuple, list)) and len(cache_or_kv) == 2:
        k, v = cache_or_kv
        if lengths is None:
            raise ValueError("lengths: required when cache_or_kv is a (k, v) pair")
    else:
        raise TypeError(f"cache_or_kv: expected a KVCache or a (k, v) pair, got {type(cache_or_kv).__name__}")
    if num_splits is None:
        raise ValueError("num_splits: required (an int >= 1)")
    return decode_attention(q, k, v, lengths=lengths, offset=offset, window=window, bias=bias, scale=scale,
                            softcap=softcap, sinks=sinks, return_lse=return_lse, method="split_k",
                            num_splits=num_splits, impl=impl)


# ----------------------------------------------------------------------------- public: paged


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
    return _attend_chunks(pp.decode, q, kc, vc, n, C, lengths, offset, bias, sinks)


def _paged_xla_unsupported(platform, pp: PagedProblem):
    return []


#: Paged attention methods: "xla" (per-chunk gather + split-K merge) and "pallas" (opt-in kernels).
PAGED = Registry("paged_attention")
PAGED.register("xla", _paged_xla, _paged_xla_unsupported)
PAGED.register("pallas", _decode_pallas.paged_decode_pallas, _decode_pallas.paged_unsupported, auto=False)


def paged_attention(q: Float[Array, "B T H Dk"], cache: PagedKVCache, *, offset=None, pages_per_split: int = 1,
                    window: int | None = None, bias=None, scale=None, softcap=None, sinks=None,
                    return_lse: bool = False, impl="auto", causal: bool = True, method="auto"):
    """Attention over a :class:`PagedKVCache` through its page table, ``pages_per_split`` pages per chunk.

    Same semantics as :func:`decode_attention` over ``cache.gather()`` with
    ``lengths = cache.lengths``; dense ``bias`` arrays are not supported here.  ``method``:
    ``"auto"``/``"xla"`` (gather ``pages_per_split`` pages per chunk, attend, merge by LSE) or
    ``"pallas"`` (the paged Pallas kernels; GPU/TPU only, opt-in) -- see :data:`PAGED`.
    """
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache: expected a PagedKVCache, got {type(cache).__name__}")
    if isinstance(pages_per_split, bool) or not isinstance(pages_per_split, int) or pages_per_split < 1:
        raise ValueError(f"pages_per_split: expected an int >= 1, got {pages_per_split!r}")
    if bias is not None and not isinstance(bias, StructuredBias):
        raise ValueError("bias: dense bias arrays are not supported by paged_attention; use a StructuredBias "
                         "or method='gather'")
    B, M, ps = cache.batch, cache.max_pages_per_seq, cache.page_size
    shape_k = jax.ShapeDtypeStruct((B, M * ps, cache.kv_heads, cache.k_pages.shape[3]), cache.dtype)
    shape_v = jax.ShapeDtypeStruct((B, M * ps, cache.kv_heads, cache.v_pages.shape[3]), cache.dtype)
    p, lengths, offset = _problem(q, shape_k, shape_v, cache.lengths, offset, num_splits=None, window=window,
                                  mask=None, bias=bias, scale=scale, softcap=softcap, sinks=sinks, dropout_rate=0.0,
                                  dropout_rng=None, return_lse=return_lse, impl=impl, causal=causal)
    return PAGED.call(method, PagedProblem(p, pages_per_split), q, cache, lengths, offset, bias, sinks)


# ----------------------------------------------------------------------------- public: prefill / step


def _check_chunk(q, k, v, cache):
    dims = V.check_qkv(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k: expected the same number of new tokens as q (T={q.shape[1]}), got {V.shape_str(k)}")
    if isinstance(cache, PagedKVCache):
        K, Dk, Dv = cache.kv_heads, cache.k_pages.shape[3], cache.v_pages.shape[3]
    elif isinstance(cache, (KVCache, RingKVCache)):
        K, Dk, Dv = cache.kv_heads, cache.k.shape[3], cache.v.shape[3]
    else:
        raise TypeError(f"cache: expected a KVCache, RingKVCache or PagedKVCache, got {type(cache).__name__}")
    if cache.batch != dims.B:
        raise ValueError(f"cache: holds B={cache.batch} rows, q has B={dims.B}")
    if K != dims.K:
        raise ValueError(f"cache: has K={K} kv heads, k has K={dims.K} (shape {V.shape_str(k)})")
    if Dk != dims.Dk or Dv != dims.Dv:
        raise ValueError(f"cache: has head dims Dk={Dk}, Dv={Dv}; k/v have Dk={dims.Dk}, Dv={dims.Dv}")
    if q.dtype != cache.dtype:
        raise TypeError(f"q: dtype {q.dtype} differs from the cache dtype {cache.dtype}")
    cap = None if isinstance(cache, RingKVCache) else cache.max_len
    if cap is not None and dims.T > cap:
        raise ValueError(f"k: chunk of T_new={dims.T} tokens exceeds the cache capacity max_len={cap}")
    return dims


def _ring_prefill(q, k, v, cache: RingKVCache, n_new, *, window, mask, bias, scale, softcap, sinks, dropout_rate,
                  dropout_rng, impl):
    if window is not None and window != cache.window:
        raise ValueError(f"window: the RingKVCache was built for window={cache.window}, got window={window}")
    if mask is not None:
        raise ValueError("mask: not supported with a RingKVCache (its sliding window is the mask)")
    if bias is not None and not isinstance(bias, StructuredBias):
        raise ValueError("bias: dense bias arrays are not supported with a RingKVCache; use a StructuredBias")
    B, T = q.shape[:2]
    W, w = cache.capacity, cache.window
    n = _n_new(n_new, B, T)
    kc, vc, pc = cache.chronological()
    keys = jnp.concatenate([kc, k], axis=1)
    vals = jnp.concatenate([vc, v], axis=1)
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    q_ids = (t < n[:, None]).astype(jnp.int32)
    kv_ids = jnp.concatenate([(pc >= 0).astype(jnp.int32), q_ids], axis=1)
    m = masks.causal(offset=W) & masks.sliding_window(w, offset=W) & masks.segments(q_ids, kv_ids)
    L = cache.lengths
    bias = _positioned(bias, L, L - W, jnp.arange(B, dtype=jnp.int32))
    o = attention(q, keys, vals, mask=m, bias=bias, scale=scale, softcap=softcap, sinks=sinks,
                  dropout_rate=dropout_rate, dropout_rng=dropout_rng, impl=impl)
    return o, cache.append(k, v, n)


def _prefill_two_part(q, k, v, cache, L, n, *, window, bias, scale, softcap, sinks, method, num_splits,
                      pages_per_split, impl):
    """Attend over the cached keys ``j < L`` (no causal mask needed: they precede every query)
    and over the new chunk (causal, ``T x T``) separately; merge by LSE.

    ``cache`` is the cache *before* the write.  Measured on CPU (16k cache, donated): reading
    the old buffer and writing afterwards costs 2 cache copies per step inside XLA, attending
    over the written buffer 4 (XLA fuses the write into the attention's re-layout of the
    cache).  The cache part carries no data-dependent causal mask, the chunk part only a
    static one.
    """
    B, T = q.shape[:2]
    if isinstance(cache, PagedKVCache):
        o_c, lse_c = paged_attention(q, cache.replace(lengths=L), offset=L, pages_per_split=pages_per_split, window=window, bias=bias,
                                     scale=scale, softcap=softcap, return_lse=True, impl=impl, causal=False)
    else:
        o_c, lse_c = decode_attention(q, cache.k, cache.v, lengths=L, offset=L, window=window, bias=bias, scale=scale,
                                      softcap=softcap, return_lse=True, method=method, num_splits=num_splits,
                                      impl=impl, causal=False)  # every cached key precedes every query
    m = masks.causal() & masks.key_padding(n)
    if window is not None:
        m = m & masks.sliding_window(window)
    chunk_bias = _positioned(bias, L, L, jnp.arange(B, dtype=jnp.int32))
    o_n, lse_n = attention(q, k, v, mask=m, bias=chunk_bias, scale=scale, softcap=softcap, return_lse=True, impl=impl)
    o, lse = merge_attention([(o_c, lse_c), (o_n, lse_n)], return_lse=True)
    if sinks is not None:
        o, _ = _apply_sinks(o, lse, sinks)
    return o


def prefill(q: Float[Array, "B T H Dk"], k: Float[Array, "B T K Dk"], v: Float[Array, "B T K Dv"], cache, *,
            n_new: Int[Array, "B"] | None = None, mask=None, window: int | None = None, bias=None,
            scale: float | None = None, softcap: float | None = None, sinks: Float[Array, "H"] | None = None,
            dropout_rate: float = 0.0, dropout_rng=None, method="auto", num_splits: int | None = None,
            pages_per_split: int = 1, impl="auto"):
    """Append ``T`` tokens to ``cache`` and attend their queries over it; returns ``(o, new_cache)``.

    ``cache``: :class:`KVCache`, :class:`RingKVCache` (sliding window ``cache.window``) or
    :class:`PagedKVCache`.  ``n_new: int32[B]``: valid tokens per row (default all ``T``);
    outputs of padding queries are zero.  ``window``: sliding window for contiguous/paged
    caches.  ``method``: for :class:`KVCache` a :data:`DECODE` method (``"auto"``,
    ``"direct"``, ``"split_k"`` with ``num_splits``); for :class:`PagedKVCache` ``"auto"``
    / ``"paged"`` (per-page split-K) or ``"gather"`` (the gather reference).  ``mask``:
    extra mask ``&``-ed in, in cache coordinates (``[T, S_max]``; positional masks need
    ``offset=cache.lengths``); contiguous caches, direct method only.  Other keywords as in
    :func:`attn_jax.attention`, to which ``impl`` is passed.
    """
    _check_chunk(q, k, v, cache)
    B, T = q.shape[:2]
    if isinstance(cache, RingKVCache):
        if method not in ("auto", "direct") or num_splits is not None:
            raise ValueError(f"method: a RingKVCache attends directly over its {cache.capacity} slots; "
                             f"got method={method!r}, num_splits={num_splits!r}")
        return _ring_prefill(q, k, v, cache, n_new, window=window, mask=mask, bias=bias, scale=scale,
                             softcap=softcap, sinks=sinks, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                             impl=impl)
    n = _n_new(n_new, B, T)
    before = cache.lengths
    two_part = mask is None and dropout_rate == 0 and (bias is None or isinstance(bias, StructuredBias))
    if isinstance(cache, PagedKVCache):
        two_part = two_part and method in ("auto", "paged")
    if two_part:
        o = _prefill_two_part(q, k, v, cache, before, n, window=window, bias=bias, scale=scale, softcap=softcap,
                              sinks=sinks, method=method, num_splits=num_splits, pages_per_split=pages_per_split,
                              impl=impl)
        o = jnp.where((jnp.arange(T)[None, :] < n[:, None])[:, :, None, None], o, 0).astype(o.dtype)
        return o, cache.append(k, v, n)
    new = cache.append(k, v, n)
    if isinstance(cache, PagedKVCache):
        if method in ("auto", "paged"):
            if mask is not None or dropout_rate > 0:
                raise ValueError("mask/dropout_rate: not supported by the paged method; use method='gather'")
            o = paged_attention(q, new, offset=before, pages_per_split=pages_per_split, window=window, bias=bias,
                                scale=scale, softcap=softcap, sinks=sinks, impl=impl)
        elif method == "gather":
            kk, vv = new.gather()
            o = decode_attention(q, kk, vv, lengths=new.lengths, offset=before, window=window, mask=mask, bias=bias,
                                 scale=scale, softcap=softcap, sinks=sinks, dropout_rate=dropout_rate,
                                 dropout_rng=dropout_rng, method="direct", impl=impl)
        else:
            raise ValueError(f"method: expected 'auto', 'paged' or 'gather' for a PagedKVCache, got {method!r}")
    else:
        o = decode_attention(q, new.k, new.v, lengths=new.lengths, offset=before, window=window, mask=mask,
                             bias=bias, scale=scale, softcap=softcap, sinks=sinks, dropout_rate=dropout_rate,
                             dropout_rng=dropout_rng, method=method, num_splits=num_splits, impl=impl)
    if n_new is not None:
        o = jnp.where((jnp.arange(T)[None, :] < n[:, None])[:, :, None, None], o, 0).astype(o.dtype)
    return o, new


def decode_step(q: Float[Array, "B 1 H Dk"], k: Float[Array, "B 1 K Dk"], v: Float[Array, "B 1 K Dv"], cache,
                **kwargs):
    """One decoding step (``T = 1``): :func:`prefill` of a single token; returns ``(o, new_cache)``.

    Jit it once (``jax.jit(decode_step, donate_argnums=3)``): shapes are fixed and the fill
    levels are traced, so every step reuses the same executable.
    """
    if getattr(q, "ndim", None) == 4 and q.shape[1] != 1:
        raise ValueError(f"q: decode_step takes one token per row ([B, 1, H, Dk]), got {V.shape_str(q)}; "
                         "use prefill for chunks")
    return prefill(q, k, v, cache, **kwargs)
