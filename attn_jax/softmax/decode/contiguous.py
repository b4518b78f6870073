"""Decode attention over a contiguous cache: the DECODE registry ("direct", "split_k", "pallas")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attn_jax.core import masks
from attn_jax.core.bias import StructuredBias
from attn_jax.core.dispatch import Decision, Registry, register_explainer
from attn_jax.softmax.api import attention, merge_attention
from attn_jax.softmax.decode import pallas as decode_pallas
from attn_jax.softmax.decode.positioned_bias import positioned
from attn_jax.softmax.decode.problem import DecodeProblem, decode_problem, resolve_method
from attn_jax.softmax.kv_cache import KVCache

__all__ = ["DECODE", "decode_attention", "decode_attention_split_k", "explain_decode", "attend_chunks",
           "apply_sinks"]

DECODE = Registry("decode_attention")


def apply_sinks(o, lse, sinks):
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
    bias = positioned(bias, offset, 0, jnp.arange(B, dtype=jnp.int32))
    return attention(q, k, v, mask=m, bias=bias, scale=p.scale, softcap=p.softcap, sinks=sinks,
                     dropout_rate=p.dropout_rate, dropout_rng=dropout_rng, return_lse=p.return_lse,
                     impl=p.attention_impl)


def attend_chunks(p: DecodeProblem, q, kc, vc, n: int, C: int, lengths, offset, bias, sinks):
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
        bias = positioned(bias, rep(offset), start, rep(jnp.arange(B, dtype=jnp.int32)))
    o, lse = attention(qr, kc, vc, mask=m, bias=bias, scale=p.scale, softcap=p.softcap, return_lse=True,
                       impl=p.attention_impl)
    Dv = o.shape[-1]
    o = o.reshape(B, n, T, H, Dv)
    lse = lse.reshape(B, n, T, H)
    o, lse = merge_attention([(o[:, i], lse[:, i]) for i in range(n)], return_lse=True)
    if sinks is not None:
        o, lse = apply_sinks(o, lse, sinks)
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
    return attend_chunks(p, q, kc, vc, n, C, lengths, offset, bias, sinks)


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
                       "impl='direct')")
    return reasons


DECODE.register("split_k", _split_k, _split_k_unsupported)
DECODE.register("direct", _direct, _direct_unsupported)
# Opt-in until the kernels have run on hardware (checked in interpret mode and by lowering only).
DECODE.register("pallas", decode_pallas.decode_pallas, decode_pallas.unsupported, auto=False)


def decode_attention(q: Float[Array, "B T H Dk"], k: Float[Array, "B S K Dk"], v: Float[Array, "B S K Dv"], *,
                     lengths: Int[Array, "B"], offset: Int[Array, "B"] | None = None, window: int | None = None,
                     mask=None, bias=None, scale: float | None = None, softcap: float | None = None,
                     sinks: Float[Array, "H"] | None = None, dropout_rate: float = 0.0, dropout_rng=None,
                     return_lse: bool = False, impl="auto", num_splits: int | None = None,
                     attention_impl="auto", causal: bool = True, method=None):
    """Attention of ``T`` new queries over a contiguous cache holding ``lengths[b]`` valid keys.

    Query ``t`` of row ``b`` is at position ``offset[b] + t`` (default ``lengths[b] - T``:
    the last query is the last key) and sees keys ``j <= offset[b] + t`` (only with
    ``causal=True``) with ``j < lengths[b]`` (and ``j >= offset[b] + t - window`` when
    ``window`` is given).
    ``impl``: the :data:`DECODE` entry, ``"auto"``, ``"direct"``, ``"split_k"`` (needs
    ``num_splits``) or ``"pallas"`` (``method=`` is its deprecated old name);
    ``attention_impl`` is passed to :func:`attn_jax.attention` as its ``impl``.  ``mask``
    (``&``-ed in; cache coordinates) is only supported by ``"direct"``.  Returns ``o: [B, T, H, Dv]`` (and ``lse`` ``[B, T, H]``).
    """
    impl = resolve_method("decode_attention", impl, method)
    p, lengths, offset = decode_problem(q, k, v, lengths, offset, num_splits=num_splits, window=window, mask=mask,
                                        bias=bias, scale=scale, softcap=softcap, sinks=sinks,
                                        dropout_rate=dropout_rate, dropout_rng=dropout_rng, return_lse=return_lse,
                                        attention_impl=attention_impl, causal=causal)
    return DECODE.call(impl, p, q, k, v, lengths, offset, bias, sinks, dropout_rng)


def explain_decode(q, k, v, *, lengths, offset=None, impl="auto", num_splits=None, window=None, mask=None,
                   bias=None, sinks=None, dropout_rate=0.0, return_lse=False, platform=None,
                   method=None) -> Decision:
    """Which :data:`DECODE` entry :func:`decode_attention` would use, and why the others cannot."""
    impl = resolve_method("explain_decode", impl, method)
    rng = jax.random.key(0) if dropout_rate > 0 else None
    p, _, _ = decode_problem(q, k, v, lengths, offset, num_splits=num_splits, window=window, mask=mask, bias=bias,
                             scale=None, softcap=None, sinks=sinks, dropout_rate=dropout_rate, dropout_rng=rng,
                             return_lse=return_lse, attention_impl="auto")
    return DECODE.explain(impl, p, platform)


def decode_attention_split_k(q: Float[Array, "B T H Dk"], cache_or_kv, lengths: Int[Array, "B"] | None = None, *,
                             num_splits: int, offset=None, window: int | None = None, bias=None,
                             scale: float | None = None, softcap: float | None = None, sinks=None,
                             return_lse: bool = False, attention_impl="auto"):
    """Flash-decoding: split the keys into ``num_splits`` chunks, attend to each, merge by LSE.

    ``cache_or_kv``: a :class:`KVCache` (``lengths`` defaults to its fill) or a ``(k, v)`` pair.
    Equal to ``decode_attention(..., impl="direct")`` for any ``num_splits`` (rows whose
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
                            softcap=softcap, sinks=sinks, return_lse=return_lse, impl="split_k",
                            num_splits=num_splits, attention_impl=attention_impl)


register_explainer(decode_attention, explain_decode)
