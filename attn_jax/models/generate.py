"""Autoregressive generation: one jit-compiled prefill plus a ``lax.while_loop`` of decode steps.

    out = generate(model, prompts, prompt_lengths=lengths, max_new_tokens=32,
                   temperature=0.8, top_k=50, top_p=0.95, stop_tokens=(eos,), rng=jax.random.key(0))
    out.tokens   # int32 [B, max_new_tokens] (pad_id after a row stops)
    out.lengths  # int32 [B] generated tokens per row, the stop token included

``model`` is any module with ``init_cache(batch, max_len, dtype)`` and
``model(tokens, segment_ids=, cache=) -> (logits, cache)`` (:class:`DecoderLM`).
Prompts of different lengths: right-padded rows (``padding="right"``, the default) are
prefilled with per-row valid counts (``segment_ids`` marks the valid prefix, so every row's
cache advances by its own length); left-padded rows are first shifted to the left.  Every
row then decodes from its own position.

Compilation: the whole call (prefill + loop) is one ``jax.jit`` whose static arguments
are the model's graph, the shapes, ``max_new_tokens``, the cache size and dtype, and the
number of stop tokens; the sampling settings, stop ids, pad id and padding side are traced
(one executable serves every temperature / top-k / top-p).  The
decode step is the loop body, traced once — no per-token recompilation (``TRACE_COUNTS``
records traces for the tests).

Sampling: greedy when ``temperature == 0``; otherwise ``softmax(logits / temperature)``
restricted to the ``top_k`` most likely tokens and to the smallest set whose probability
reaches ``top_p`` (nucleus sampling, Holtzman et al., 2019, arXiv:1904.09751).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["generate", "GenerationOutput", "sample_logits", "TRACE_COUNTS"]

#: Number of times each traced function was traced (tests check the decode loop compiles once).
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """A pytree (usable as a ``jit`` / ``checkify`` output)."""

    tokens: jax.Array   # int32 [B, max_new_tokens]
    lengths: jax.Array  # int32 [B]


jax.tree_util.register_dataclass(GenerationOutput, data_fields=["tokens", "lengths"], meta_fields=[])


def sample_logits(logits, rng, *, temperature=0.0, top_k=None, top_p=None):
    """Next tokens ``int32 [B]`` from ``logits [B, V]``.

    Greedy when ``temperature == 0``.  ``temperature``, ``top_k`` (``0``/``None`` = off) and
    ``top_p`` (``1.0``/``None`` = off) may be traced scalars, so one executable serves every
    setting: the filters run under ``lax.cond`` and cost one sort of the vocabulary per row
    only when enabled.
    """
    logits = logits.astype(jnp.float32)
    V = logits.shape[-1]
    temperature = jnp.asarray(temperature, jnp.float32)
    top_k = jnp.asarray(0 if top_k is None else top_k, jnp.int32)
    top_p = jnp.asarray(1.0 if top_p is None else top_p, jnp.float32)
    neg = jnp.finfo(jnp.float32).min
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)

    def filtered(x):
        srt = jnp.sort(x, axis=-1)[:, ::-1]                                     # descending
        k = jnp.where((top_k > 0) & (top_k < V), top_k, V)
        kth = jax.lax.dynamic_index_in_dim(srt, k - 1, axis=1, keepdims=True)    # k-th largest
        srt = jnp.where(srt >= kth, srt, neg)
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs       # mass strictly above each sorted token
        keep = (before < top_p) & (srt > neg)              # the most likely token is always kept
        threshold = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(x >= threshold, x, neg)

    scaled = jax.lax.cond(((top_k > 0) & (top_k < V)) | (top_p < 1.0), filtered, lambda x: x, scaled)
    sampled = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1).astype(jnp.int32))


def _check_sampling(temperature, top_k, top_p):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature: expected a float >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a float in (0, 1] or None, got {top_p!r}")
    return (jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k or 0, jnp.int32),
            jnp.asarray(1.0 if top_p is None else top_p, jnp.float32))


def _left_to_right(prompts, lengths, left_padded):
    """Shift every left-padded row so its tokens start at index 0 (identity when not ``left_padded``)."""
    P = prompts.shape[1]
    shift = jnp.where(left_padded, P - lengths, 0)
    idx = (jnp.arange(P, dtype=jnp.int32)[None, :] + shift[:, None]) % P
    return jnp.take_along_axis(prompts, idx, axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_dtype", "max_len"))
def _generate(graphdef, state, prompts, lengths, rng, sampling, stops, pad_id, left_padded, *, max_new_tokens,
              cache_dtype, max_len):
    TRACE_COUNTS["generate"] += 1
    model = nnx.merge(graphdef, state)
    B, P = prompts.shape
    prompts = _left_to_right(prompts, lengths, left_padded)
    temperature, top_k, top_p = sampling
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

    cache = model.init_cache(B, max_len, cache_dtype)
    valid = (jnp.arange(P, dtype=jnp.int32)[None, :] < lengths[:, None]).astype(jnp.int32)
    logits, cache = model(prompts, segment_ids=valid, cache=cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    rng, sub = jax.random.split(rng)
    tok = sample(last, sub)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, stops)
    n_gen = jnp.ones((B,), jnp.int32)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        TRACE_COUNTS["decode_step"] += 1
        i, tok, cache, out, done, n_gen, rng = carry
        logits, cache = model(tok[:, None], cache=cache)
        rng, sub = jax.random.split(rng)
        new = jnp.where(done, pad_id, sample(logits[:, 0], sub))
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
        n_gen = n_gen + (~done).astype(jnp.int32)
        done = done | jnp.isin(new, stops)
        return i + 1, new, cache, out, done, n_gen, rng

    carry = (jnp.asarray(1, jnp.int32), tok, cache, out, done, n_gen, rng)
    _, _, _, out, _, n_gen, _ = jax.lax.while_loop(cond, body, carry)
    return out, n_gen


def generate(model: nnx.Module, prompts, *, max_new_tokens: int, prompt_lengths=None, padding: str = "right",
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens=(), pad_id: int = 0, rng=None, cache_dtype=jnp.float32,
             max_len: int | None = None) -> GenerationOutput:
    """Generate ``max_new_tokens`` tokens after each prompt (see the module docstring).

    Args:
      prompts: int ``[B, P]``; with ``prompt_lengths`` (int ``[B]``, each ``>= 1``) rows are
        padded on the ``padding`` side (``"right"`` or ``"left"``).
      stop_tokens: token ids that end a row (the stop token is emitted and counted).
      rng: PRNG key (required unless greedy).
      max_len: cache capacity per row, default ``P + max_new_tokens``; at least
        ``P + max_new_tokens - 1`` (the last token is never fed back), else ``ValueError``.
    """
    prompts = jnp.asarray(prompts)
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"prompts: expected int [B, P], got {prompts.dtype} {prompts.shape}")
    B, P = prompts.shape
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if padding not in ("right", "left"):
        raise ValueError(f"padding: expected 'right' or 'left', got {padding!r}")
    sampling = _check_sampling(temperature, top_k, top_p)
    if rng is None:
        if temperature != 0.0:
            raise ValueError("rng: a PRNG key is required when temperature > 0")
        rng = jax.random.key(0)
    lengths = jnp.full((B,), P, jnp.int32) if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32)
    if lengths.shape != (B,):
        raise ValueError(f"prompt_lengths: expected shape [{B}], got {lengths.shape}")
    if not isinstance(lengths, jax.core.Tracer) and (int(lengths.min()) < 1 or int(lengths.max()) > P):
        raise ValueError(f"prompt_lengths: expected values in [1, {P}], got {lengths.tolist()}")
    # The cache receives the prompt and every generated token but the last (which is never fed back).
    need = P + max_new_tokens - 1
    if max_len is None:
        max_len = P + max_new_tokens
    elif isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < need:
        raise ValueError(f"max_len: the cache must hold the prompt and the generated tokens, max_len >= "
                         f"prompt length P + max_new_tokens - 1 = {P} + {max_new_tokens} - 1 = {need}; got "
                         f"max_len={max_len!r} (raise max_len or lower max_new_tokens)")
    # Stop tokens, pad id and padding side are traced: only their count shapes the executable.
    stops = jnp.asarray([int(t) for t in stop_tokens] or [-1], jnp.int32)
    graphdef, state = nnx.split(model)
    out, n = _generate(graphdef, state, prompts.astype(jnp.int32), lengths, rng, sampling, stops,
                       jnp.asarray(pad_id, jnp.int32), jnp.asarray(padding == "left"), max_new_tokens=max_new_tokens,
                       cache_dtype=jnp.dtype(cache_dtype), max_len=int(max_len))
    return GenerationOutput(out, n)
