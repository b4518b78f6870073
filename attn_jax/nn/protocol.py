"""The token-mixer protocol shared by every sequence-mixing layer in attn_jax.

A *mixer* is an ``nnx.Module`` that mixes information along the sequence axis of
``x: [B, T, d_model]`` (softmax attention, sliding-window attention, linear/recurrent
attention, ...).  Models select mixers per layer by registry name
(:mod:`attn_jax.mixers`), so every mixer honours one contract:

``y, cache = mixer(x, *, positions=None, segment_ids=None, cache=None, deterministic=True)``

* ``x``: ``[B, T, d_model]``; ``y``: ``[B, T, d_model]`` in the compute dtype.
* ``positions``: int ``[B, T]`` or ``[T]`` absolute positions (for RoPE-like schemes).
  Default ``arange(T)`` without a cache, ``cache.lengths[:, None] + arange(T)`` with one.
* ``segment_ids``: int ``[B, T]``.  Without a cache: packed documents (a token sees only
  tokens of its own segment; id 0 = padding, whose output is zero).  With a cache: a
  per-row validity marker of a right-padded chunk — row ``b`` appends its first
  ``n_new[b] = sum(segment_ids[b] != 0)`` tokens (a batch of prompts of different lengths);
  the outputs at padding tokens are zero and the cache does not advance past them.
* ``cache``: ``None`` = no caching (training, full forward).  Otherwise the mixer's cache
  pytree from ``init_cache``: the ``T`` tokens are appended (prefill when ``T > 1``, a decode
  step when ``T == 1``) and the updated cache is returned.  Caches are explicit, immutable
  pytrees (not module state) so that a jitted ``lax.while_loop`` can carry them.
* ``deterministic``: disables dropout when True.

``mixer.init_cache(batch, max_len, dtype) -> cache`` builds an empty cache for up to
``max_len`` tokens per row (a mixer with a bounded state may ignore ``max_len``).

Invariants checked over the decoder mixers (``attn_jax.mixers.names(causal=True)``,
tests/nn/test_mixer_registry.py): jit == eager, finite gradients, causality, prefill + step
decode == full forward, packed == padded.  Over the mixers that accept ``causal=False``
(``names(causal=False)``, tests/nn/test_encoder_mixers.py): jit == eager, finite gradients,
non-causality, padded rows == each row alone, packed == padded.

Registry factories have the signature ``factory(d_model, num_heads, *, rngs, **kwargs) ->
mixer``; a factory (or class) may expose ``SUPPORTED_FEATURES`` (a frozenset of the
feature keys of :data:`FEATURE_KEYS`) which the README feature matrix reads.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["TokenMixer", "FEATURE_KEYS"]

#: Feature keys a mixer may claim in ``SUPPORTED_FEATURES``.
FEATURE_KEYS = frozenset({
    "mha", "gqa", "dk_ne_dv", "cross", "causal", "sliding_window", "chunked", "prefix_lm", "segments",
    "key_padding", "dense_mask", "bias", "alibi", "t5", "softcap", "sinks", "dropout", "lse", "bf16", "rope",
    "xpos", "absolute", "bidirectional",
})
# "bidirectional": the factory accepts ``causal=False`` (an encoder mixer: every token sees its whole
# document; no cache).  A mixer claiming "bidirectional" but not "causal" is encoder-only: its
# factory raises unless given ``causal=False``.


@runtime_checkable
class TokenMixer(Protocol):
    """Structural type of a mixer (see the module docstring for the contract)."""

    def __call__(self, x, *, positions=None, segment_ids=None, cache=None,
                 deterministic: bool = True) -> tuple[Any, Any]:
        ...

    def init_cache(self, batch: int, max_len: int, dtype) -> Any:
        ...
