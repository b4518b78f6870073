"""NNX mixers for the attention variants of :mod:`attn_jax.variants` (gating, CoPE, head mixing).

Each is :class:`attn_jax.nn.MultiHeadAttention` — same projections ``W^Q, W^K, W^V, W^O``, GQA,
qk-norm, RoPE option, output gate and protocol — with the attention itself replaced through the
``_attend`` hook:

* ``gated_attention`` (registry ``"gated_attention"``): ``MultiHeadAttention(gate="elementwise")``,
  the sigmoid gate of Qiu et al. 2025 (arXiv:2505.06708) on the SDPA output (``gate="headwise"``
  for one gate per head); op :func:`attn_jax.variants.gated_attention`.
* :class:`CoPEAttention` (``"cope"``): :func:`attn_jax.variants.cope_attention` with a learned
  ``pos_emb [npos, Dk]`` shared by the heads (zeros at init, as the authors' code); no other
  positional scheme by default (``positional="none"``).
* :class:`TalkingHeadsAttention` (``"talking_heads"``):
  :func:`attn_jax.variants.talking_heads_attention` with learned ``P_l, P_w [H, H]``
  (identity at init, so the layer starts as multi-head attention).
* :class:`SelectiveAttention` (``"selective"``): :func:`attn_jax.variants.selective_attention`
  (parameter-free); its cache (:class:`SelectiveCache`) adds the accumulated selection ``F`` of
  every slot to the keys and values, and ``context_budget`` masks all but the ``budget`` cached
  keys with the smallest ``F`` while decoding (context pruning, emulated by masking).
* :class:`MixtureOfHeadsAttention` (``"moh"``): the MoH head gates of
  :func:`attn_jax.variants.head_gates` on the attention output (through the ``_gate_output``
  hook); with ``monitor=True`` the load-balancing loss is sown as the intermediate
  ``moh_load_balance_loss`` (read it with ``nnx.capture(mixer, nnx.Intermediate)``).
* :class:`PersistentMemoryAttention` (``"persistent_memory"``):
  :func:`attn_jax.variants.persistent_memory_attention` with ``num_memory`` learned key/value
  slots per kv head (unit-normal at init: our choice), visible from every query.

The last two read every cached key at each step (the positions of CoPE and the mixed logits of
talking heads depend on the query), so they decode over a :class:`~attn_jax.softmax.kv_cache.KVCache`:
the chunk is appended, then the op runs over the whole cache with
``causal(offset=lengths) & segments(valid queries, filled slots)`` — prefill + decode equals the
full forward, and padding queries of a ragged chunk give zero.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.core import masks
from attn_jax.nn.attention import MultiHeadAttention
from attn_jax.nn.layers import check_positive_int, param
from attn_jax.softmax.kv_cache import KVCache
from attn_jax.variants.cope import cope_attention
from attn_jax.variants.mixture_of_heads import head_gates
from attn_jax.variants.persistent_memory import persistent_memory_attention
from attn_jax.variants.selective import selective_attention, selective_keep
from attn_jax.variants.talking_heads import talking_heads_attention

__all__ = ["gated_attention", "CoPEAttention", "TalkingHeadsAttention", "SelectiveAttention", "SelectiveCache",
           "PersistentMemoryAttention", "MixtureOfHeadsAttention", "CachedVariantAttention"]

_BASE_FEATURES = frozenset({"mha", "gqa", "dk_ne_dv", "causal", "segments", "key_padding", "bf16", "rope"})


def gated_attention(d_model: int, num_heads: int, *, rngs: nnx.Rngs, gate: str = "elementwise",
                    **kwargs) -> MultiHeadAttention:
    """The ``"gated_attention"`` registry entry: :class:`MultiHeadAttention` with the output gate
    ``o ⊙ σ(x W_θ)`` (``gate="elementwise"``, ``W_θ [d, H, Dv]``, default; or ``"headwise"``)."""
    if gate is None:
        raise ValueError("gate: the gated_attention mixer needs 'elementwise' or 'headwise', got None")
    return MultiHeadAttention(d_model, num_heads, gate=gate, rngs=rngs, **kwargs)


gated_attention.SUPPORTED_FEATURES = MultiHeadAttention.SUPPORTED_FEATURES


class MixtureOfHeadsAttention(MultiHeadAttention):
    """MoH mixer (``"moh"``): :class:`MultiHeadAttention` whose head outputs are weighted by the
    MoH gates (Jin et al. 2024, arXiv:2410.11842) before ``W^O``.

    Args:
      num_shared: always-on heads ``h_s`` (default 1; 0 = routed only).
      top_k: routed heads per token (default half of the routed heads, at least 1).
      others: as :class:`MultiHeadAttention` (its ``gate`` option is refused: MoH is the gate);
        ``monitor=True`` also sows ``moh_load_balance_loss`` (an NNX intermediate) for training.
    Router weights ``W_r [d, H - h_s]``, ``W_s [d, h_s]`` (``h_s > 1``), ``W_0 [d, 2]`` (``h_s > 0``),
    no biases, as the authors' code.
    """

    SUPPORTED_FEATURES = MultiHeadAttention.SUPPORTED_FEATURES

    def __init__(self, d_model: int, num_heads: int, *, num_shared: int = 1, top_k: int | None = None,
                 rngs: nnx.Rngs, **kwargs):
        if kwargs.get("gate") is not None:
            raise ValueError(f"gate: the moh mixer gates the heads itself, got gate={kwargs['gate']!r}")
        if isinstance(num_shared, bool) or not isinstance(num_shared, int) or not 0 <= num_shared < num_heads:
            raise ValueError(f"num_shared: expected an int in [0, num_heads={num_heads}), got {num_shared!r}")
        E = num_heads - num_shared
        top_k = max(1, E // 2) if top_k is None else top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
            raise ValueError(f"top_k: expected an int in [1, {E}] (the routed heads), got {top_k!r}")
        super().__init__(d_model, num_heads, rngs=rngs, **kwargs)
        self.num_shared, self.top_k = num_shared, top_k
        pdt, init = kwargs.get("param_dtype", jnp.float32), nnx.initializers.lecun_normal()
        self.w_router = param(rngs, init, (d_model, E), ("embed", None), pdt)
        self.w_shared = param(rngs, init, (d_model, num_shared), ("embed", None), pdt) if num_shared > 1 else None
        self.w_mix = param(rngs, init, (d_model, 2), ("embed", None), pdt) if num_shared > 0 else None

    def _gate_output(self, x, o):
        logits = lambda w: None if w is None else jnp.einsum("btd,de->bte", x, self._w(w))  # noqa: E731
        g, aux = head_gates(logits(self.w_router), top_k=self.top_k, shared_logits=logits(self.w_shared),
                            mix_logits=logits(self.w_mix), num_shared=self.num_shared)
        if self.monitor:
            self.sow(nnx.Intermediate, "moh_load_balance_loss", aux)
        return (o * g[..., None].astype(o.dtype)).astype(o.dtype)


class CachedVariantAttention(MultiHeadAttention):
    """A :class:`MultiHeadAttention` whose attention is a materialised variant op, decoded over a
    :class:`KVCache` (module docstring).  Subclasses implement ``_variant(q, k, v, mask, kw)``.

    Refused options (ValueError naming them): ``cross``, ``window``, ``positional="alibi" | "t5"``
    and whichever of ``softcap`` / ``sinks`` / ``dropout_rate`` the op does not take (``_OPTIONS``).
    """

    _OPTIONS: frozenset = frozenset()   # of {"softcap", "sinks", "dropout"}
    _NAME = "variant"

    def __init__(self, d_model: int, num_heads: int, *, positional: str | None = None, **kwargs):
        for name in ("cross", "window"):
            if kwargs.get(name):
                raise ValueError(f"{name}: not supported by the {self._NAME} mixer, got {kwargs[name]!r}")
        if positional in ("alibi", "t5"):
            raise ValueError(f"positional: the {self._NAME} mixer takes 'rope' or 'none', got {positional!r}")
        for name, off in (("softcap", None), ("sinks", False), ("dropout_rate", 0.0)):
            key = "dropout" if name == "dropout_rate" else name
            if key not in self._OPTIONS and kwargs.get(name, off) not in (off, 0.0):
                raise ValueError(f"{name}: not supported by the {self._NAME} mixer, got {kwargs[name]!r}")
        super().__init__(d_model, num_heads, positional=positional, **kwargs)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        """An empty :class:`KVCache` of ``max_len`` positions."""
        return KVCache.init(batch, max_len, self.num_kv_heads, self.head_dim, dtype, value_dim=self.value_head_dim)

    def _check_cache(self, cache):
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache from init_cache, got {type(cache).__name__}")

    def _variant(self, q, k, v, mask, kw):
        """The variant's attention of ``q [B, T, H, Dk]`` over ``k, v`` under ``mask`` (chunk or cache
        coordinates); ``kw``: scale, softcap, sinks, dropout, impl.  Every subclass defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define _variant (the attention it computes)")

    def _attend(self, q, k, v, *, segment_ids, cache, bias, kw):
        if cache is None:
            return self._variant(q, k, v, self._mask(segment_ids), kw), None
        if not self.causal:
            raise ValueError("cache: decoding needs a causal mixer (causal=True)")
        B, T = q.shape[:2]
        n = (jnp.full((B,), T, jnp.int32) if segment_ids is None
             else jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32))
        L, dt = cache.lengths, cache.dtype
        cache = cache.append(k.astype(dt), v.astype(dt), n)
        q_ids = (jnp.arange(T)[None, :] < n[:, None]).astype(jnp.int32)
        kv_ids = (jnp.arange(cache.max_len)[None, :] < (L + n)[:, None]).astype(jnp.int32)
        mask = masks.causal(offset=L) & masks.segments(q_ids, kv_ids)
        o = self._variant(q.astype(dt), cache.k, cache.v, mask, kw)
        return o.astype(self.dtype), cache


class PersistentMemoryAttention(CachedVariantAttention):
    """Persistent-memory mixer (``"persistent_memory"``): ``num_memory`` (default 8) learned
    ``memory_k [N, K, Dk]``, ``memory_v [N, K, Dv]`` attended by every query besides the sequence.
    Padding tokens (segment id 0) output zero, as the mixer protocol requires (the op itself lets
    every query read the memory)."""

    SUPPORTED_FEATURES = _BASE_FEATURES | {"sinks", "softcap", "bidirectional"}
    _OPTIONS = frozenset({"sinks", "softcap"})
    _NAME = "persistent_memory"

    def __init__(self, d_model: int, num_heads: int, *, num_memory: int = 8, rngs: nnx.Rngs, **kwargs):
        check_positive_int("num_memory", num_memory)
        super().__init__(d_model, num_heads, rngs=rngs, **kwargs)
        pdt, init = kwargs.get("param_dtype", jnp.float32), nnx.initializers.normal(1.0)
        K = self.num_kv_heads
        self.memory_k = param(rngs, init, (num_memory, K, self.head_dim), (None, "kv_heads", "head_dim"), pdt)
        self.memory_v = param(rngs, init, (num_memory, K, self.value_head_dim), (None, "kv_heads", "head_dim"), pdt)

    def _attend(self, q, k, v, *, segment_ids, cache, bias, kw):
        # the memory is visible from every query, padding ones too: the protocol wants zeros there
        o, new_cache = super()._attend(q, k, v, segment_ids=segment_ids, cache=cache, bias=bias, kw=kw)
        if segment_ids is None:
            return o, new_cache
        if cache is None:
            valid = segment_ids != 0
        else:
            valid = jnp.arange(q.shape[1])[None, :] < jnp.sum(segment_ids != 0, axis=1)[:, None]
        return jnp.where(valid[:, :, None, None], o, 0).astype(o.dtype), new_cache

    def _variant(self, q, k, v, mask, kw):
        return persistent_memory_attention(q, k, v, self.memory_k[...], self.memory_v[...], mask=mask,
                                           scale=kw["scale"], softcap=kw["softcap"], sinks=kw["sinks"],
                                           impl=kw["impl"])


class CoPEAttention(CachedVariantAttention):
    """CoPE mixer (``"cope"``): :func:`attn_jax.variants.cope_attention` with a learned
    ``pos_emb [npos, Dk]`` (zeros at init); causal only.

    Args:
      npos: number of integer positions (``p`` is clipped to ``npos - 1``); default 128.
      others: as :class:`MultiHeadAttention` (positional default ``"none"``: CoPE is the position
        encoding).
    """

    SUPPORTED_FEATURES = _BASE_FEATURES | {"sinks", "dropout"}
    _OPTIONS = frozenset({"sinks", "dropout"})
    _NAME = "cope"

    def __init__(self, d_model: int, num_heads: int, *, npos: int = 128, positional: str | None = "none",
                 causal: bool = True, rngs: nnx.Rngs, **kwargs):
        check_positive_int("npos", npos)
        if not causal:
            raise ValueError("causal: CoPE counts the keys between a key and its query, defined for causal "
                             "attention only; got causal=False")
        super().__init__(d_model, num_heads, positional=positional, causal=True, rngs=rngs, **kwargs)
        self.npos = npos
        self.pos_emb = param(None, nnx.initializers.zeros, (npos, self.head_dim), (None, "head_dim"),
                             kwargs.get("param_dtype", jnp.float32))

    def _variant(self, q, k, v, mask, kw):
        return cope_attention(q, k, v, self.pos_emb[...].astype(q.dtype), mask=mask, scale=kw["scale"],
                              sinks=kw["sinks"], dropout_rate=kw["dropout_rate"], dropout_rng=kw["dropout_rng"],
                              impl=kw["impl"])


class TalkingHeadsAttention(CachedVariantAttention):
    """Talking-heads mixer (``"talking_heads"``): :func:`attn_jax.variants.talking_heads_attention`
    with learned head projections ``logits_proj, weights_proj [H, H]`` (identity at init)."""

    SUPPORTED_FEATURES = _BASE_FEATURES | {"bidirectional"}
    _NAME = "talking_heads"

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, **kwargs):
        super().__init__(d_model, num_heads, rngs=rngs, **kwargs)
        H = self.num_heads
        eye = lambda key, shape, dtype: jnp.eye(shape[0], dtype=dtype)  # noqa: E731
        pdt = kwargs.get("param_dtype", jnp.float32)
        self.logits_proj = param(None, eye, (H, H), ("heads", None), pdt)
        self.weights_proj = param(None, eye, (H, H), (None, "heads"), pdt)

    def _variant(self, q, k, v, mask, kw):
        return talking_heads_attention(q, k, v, self.logits_proj[...], self.weights_proj[...], mask=mask,
                                       scale=kw["scale"])


@dataclasses.dataclass(frozen=True)
class SelectiveCache:
    """Decode cache of :class:`SelectiveAttention`: the keys/values (:class:`KVCache`) and the
    selection accumulated so far on each slot, float32 ``[B, S_max]``."""

    kv: Any
    selection: Any

    @property
    def lengths(self):
        return self.kv.lengths

    @property
    def dtype(self):
        return self.kv.dtype


jax.tree_util.register_dataclass(SelectiveCache, data_fields=["kv", "selection"], meta_fields=[])


def _document_starts(segment_ids, B: int, T: int):
    """Bool ``[B, T]``: the first token of every document (all of key 0 without segment ids)."""
    if segment_ids is None:
        return jnp.broadcast_to(jnp.arange(T) == 0, (B, T))
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    return (segment_ids != 0) & (segment_ids != prev)


class SelectiveAttention(CachedVariantAttention):
    """Selective-attention mixer (``"selective"``): causal only, no extra parameters.

    Args:
      selection_head: the head whose logits select (default 0).
      context_budget: when decoding, attend only to the ``context_budget`` cached keys with the
        smallest accumulated selection (:func:`attn_jax.variants.selective_keep`; the first token
        is always kept) plus the new chunk; None (default) keeps every key (exact).
      others: as :class:`MultiHeadAttention`.  The first token of each document (of each packed
        segment) is the protected <BOS>.
    """

    SUPPORTED_FEATURES = _BASE_FEATURES | {"sinks"}
    _OPTIONS = frozenset({"sinks"})
    _NAME = "selective"

    def __init__(self, d_model: int, num_heads: int, *, selection_head: int = 0, context_budget: int | None = None,
                 causal: bool = True, rngs: nnx.Rngs, **kwargs):
        if not causal:
            raise ValueError("causal: selective attention accumulates over earlier queries, defined for causal "
                             "attention only; got causal=False")
        if context_budget is not None:
            check_positive_int("context_budget", context_budget)
        super().__init__(d_model, num_heads, causal=True, rngs=rngs, **kwargs)
        if not 0 <= selection_head < self.num_heads:
            raise ValueError(f"selection_head: expected an int in [0, {self.num_heads}), got {selection_head!r}")
        self.selection_head, self.context_budget = int(selection_head), context_budget

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> SelectiveCache:
        """An empty :class:`SelectiveCache` of ``max_len`` positions."""
        return SelectiveCache(super().init_cache(batch, max_len, dtype), jnp.zeros((batch, max_len), jnp.float32))

    def _check_cache(self, cache):
        if cache is not None and not isinstance(cache, SelectiveCache):
            raise TypeError(f"cache: expected a SelectiveCache from init_cache, got {type(cache).__name__}")

    def _attend(self, q, k, v, *, segment_ids, cache, bias, kw):
        B, T = q.shape[:2]
        op_kw = dict(selection_head=self.selection_head, scale=kw["scale"], sinks=kw["sinks"], impl=kw["impl"])
        if cache is None:
            o = selective_attention(q, k, v, mask=self._mask(segment_ids),
                                    protected=_document_starts(segment_ids, B, T), **op_kw)
            return o, None
        n = (jnp.full((B,), T, jnp.int32) if segment_ids is None
             else jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32))
        L, dt = cache.lengths, cache.dtype
        kv = cache.kv.append(k.astype(dt), v.astype(dt), n)
        S = kv.max_len
        q_ids = (jnp.arange(T)[None, :] < n[:, None]).astype(jnp.int32)
        kv_ids = (jnp.arange(S)[None, :] < (L + n)[:, None]).astype(jnp.int32)
        mask = masks.segments(q_ids, kv_ids)
        if self.context_budget is not None:
            first = jnp.broadcast_to(jnp.arange(S) == 0, (B, S))
            kept = selective_keep(cache.selection, L, self.context_budget, protected=first)
            new = (jnp.arange(S)[None, :] >= L[:, None])
            mask = mask & masks.dense((kept | new)[:, None, None, :])
        o, selection = selective_attention(q.astype(dt), kv.k, kv.v, mask=mask, offset=L,
                                           initial_selection=cache.selection, return_selection=True, **op_kw)
        return o.astype(self.dtype), SelectiveCache(kv, selection.astype(jnp.float32))
