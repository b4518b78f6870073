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
PagedAttention V2); ``prefill(..., impl="gather")`` instead rebuilds the contiguous cache
(:meth:`PagedKVCache.gather`) and attends once — the gather reference.

**Ring buffer** (sliding window ``w``): the ring of ``W >= w`` slots is rolled
into chronological order (index ``j`` = position ``L - W + j``), the new chunk
is appended, and the queries attend over those ``W + T`` keys with
``causal(offset=W) & sliding_window(w, offset=W) & segments(valid)`` (empty slots
and padding tokens have segment id 0) — *before* the chunk is written, because
a chunk longer than ``W - w`` overwrites keys its own first queries need.

Dispatch: :data:`DECODE` (``impl=``) has ``"split_k"`` (chosen by ``"auto"``
when ``num_splits`` is given), ``"direct"`` (one :func:`attn_jax.attention`
call over the whole cache) and the opt-in ``"pallas"`` kernels;
``attention_impl=`` is passed to :func:`attn_jax.attention` as its ``impl``.
(``method=`` is the deprecated old name of ``impl=``.)
"""


from attn_jax.softmax.decode.contiguous import DECODE, decode_attention, decode_attention_split_k
from attn_jax.softmax.decode.paged import PAGED, paged_attention
from attn_jax.softmax.decode.positioned_bias import PositionedBias
from attn_jax.softmax.decode.prefill import decode_step, prefill
from attn_jax.softmax.decode.problem import DecodeProblem

__all__ = [
    "DECODE", "PAGED", "DecodeProblem", "PositionedBias", "decode_attention", "decode_attention_split_k",
    "paged_attention", "prefill", "decode_step",
]
