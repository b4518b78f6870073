"""Multi-head softmax attention as a Flax NNX mixer (MHA / GQA / MQA, self- and cross-attention).

"Attention Is All You Need", Vaswani et al., 2017, arXiv:1706.03762:

    q_h = x W^Q_h,  k_g = c W^K_g,  v_g = c W^V_g                 (c = x, or the context)
    o_h = softmax(scale * q_h k_{g(h)}^T + bias_h + mask) v_{g(h)}
    y   = sum_h o_h W^O_h

with ``H`` query heads and ``K`` key/value heads, head ``h`` reading kv group
``g(h) = h // (H / K)`` — GQA, "GQA: Training Generalized Multi-Query Transformer Models
from Multi-Head Checkpoints", Ainslie et al., 2023, arXiv:2305.13245 (``K = 1`` is MQA,
Shazeer 2019, arXiv:1911.02150).  The attention itself is :func:`attn_jax.attention`
(no K/V repeat); decoding is :func:`attn_jax.softmax.decode.prefill` over a
:class:`~attn_jax.softmax.kv_cache.KVCache` or, for sliding windows, a
:class:`~attn_jax.softmax.kv_cache.RingKVCache`.

Options
-------
* positional: ``"rope"`` (Su et al., 2021, arXiv:2104.09864, applied to q and k at
  ``positions``), ``"alibi"`` (Press et al., 2021, arXiv:2108.12409), ``"t5"`` (learned
  bucketed relative bias, Raffel et al., 2019, arXiv:1910.10683) or ``"none"``.
* qk-norm: ``"rms"`` — RMSNorm of q and k over the head dim with learned per-dim scales
  (Dehghani et al., 2023, arXiv:2302.05442), then the usual ``scale = Dk^-1/2``;
  ``"l2"`` — QKNorm (Henry et al., 2020, arXiv:2010.04245): ``q^ = q/||q||``,
  ``k^ = k/||k||``, logits ``= g * q^.k^`` with a learned scalar ``g`` (init
  ``sqrt(Dk)``, so initial logits have the scale of standard attention).
* softcap ``c``: logits ``c * tanh(s / c)``; sinks: ``True`` — a learned logit per head added to
  the softmax denominator; ``"off_by_one"`` — the fixed logit 0, i.e. softmax-off-by-one
  ``exp(s_j) / (1 + sum_j' exp(s_j'))`` (E. Miller, "Attention Is Off By One", 2023, blog post);
  attention dropout with keys from the module's ``rngs``.
* output gate ("Gated Attention for Large Language Models", Qiu et al., 2025,
  arXiv:2505.06708, position G1): ``o'_h = o_h * sigmoid(x W^G)`` applied to the attention
  output before ``W^O`` — ``"headwise"`` (``W^G: [d, H]``, one gate per head) or
  ``"elementwise"`` (``W^G: [d, H, Dv]``).
* ``monitor=True`` (opt-in): each full forward (no cache, self-attention) sows the largest
  visible logit and the attention entropy per query and head, float32 ``[B, T, H]``, as NNX
  intermediates ``attention_logit_max`` / ``attention_entropy``
  (:func:`attn_jax.variants.stability.attention_statistics`; costs one dense attention pass).
* analysis hooks (opt-in, off by default; :mod:`attn_jax.analysis` sets them per instance):
  ``capture_maps = True`` makes each full self-attention forward (no cache) sow float32
  ``attention_weights [B, H, T, S]`` (the matrix ``W`` with ``o_h = W_h v``), ``attention_values``
  ``v [B, S, K, Dv]`` and ``attention_output`` ``o [B, T, H, Dv]`` as NNX intermediates.  Plain
  softmax (no ``attention_fn``, ``_attend`` not overridden) materialises the probabilities (and
  sows ``attention_logits``, hidden pairs ``-inf``) and computes ``o = P v`` from them, the weights
  passing through ``perturb("attention_weights")`` so ``nnx.capture(..., init=...)`` can take
  ``∂L/∂P``; other mixers probe their own attention with the identity value basis (``v = I``
  returns ``W`` for any attention linear in ``v``) and keep their output.  Dropout is off while
  capturing.  ``head_mask``: an :class:`HeadMask` variable ``[H]`` multiplying each head's output
  before ``W^O`` (Michel et al. 2019, arXiv:1905.10650; ``None``: no mask).
* ``cross=True``: keys/values come from ``context`` (no positional scheme, not causal);
  decode with :meth:`MultiHeadAttention.cross_cache` (the context's K/V, computed once).

Parameters: ``W^Q [d, H, Dk]`` ("embed", "heads", "head_dim"), ``W^K [d, K, Dk]`` and
``W^V [d, K, Dv]`` ("embed", "kv_heads", "head_dim"), ``W^O [H, Dv, d]`` ("heads",
"head_dim", "embed"); stored in ``param_dtype``, computed in ``dtype``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.core import masks
from attn_jax.core.numerics import l2_normalize
from attn_jax.positional import T5RelativeBias, alibi, apply_rope
from attn_jax.softmax.api import attention
from attn_jax.softmax.decode import prefill
from attn_jax.softmax.kv_cache import KVCache, PagedKVCache, RingKVCache
from attn_jax.variants import dense_scores
from attn_jax.variants.gated import output_gate
from attn_jax.variants.stability import attention_statistics
from attn_jax.nn.layers import (check_mixer_input, check_positive_int, check_segment_ids, default_head_dim,
                                default_kernel_init, mixer_positions, param)

__all__ = ["MultiHeadAttention", "CrossAttentionCache", "HeadMask", "sliding_window_attention", "POSITIONAL",
           "QK_NORMS", "GATES", "SINKS"]

POSITIONAL = ("rope", "alibi", "t5", "none")
QK_NORMS = (None, "rms", "l2")
GATES = (None, "headwise", "elementwise")
SINKS = (False, True, "off_by_one")


@dataclasses.dataclass(frozen=True)
class CrossAttentionCache:
    """Projected context for cross-attention decoding: ``k [B, S, K, Dk]``, ``v [B, S, K, Dv]``,
    ``segment_ids int32 [B, S]`` (0 = padding key)."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array


jax.tree_util.register_dataclass(CrossAttentionCache, data_fields=["k", "v", "segment_ids"], meta_fields=[])


class HeadMask(nnx.Variable):
    """A per-head multiplicative gate ``[H]`` on the head outputs (the ``head_mask`` analysis hook)."""


class MultiHeadAttention(nnx.Module):
    """Softmax attention mixer (see the module docstring); the ``"softmax"`` registry entry.

    Args:
      d_model: model width.
      num_heads: query heads ``H``.
      num_kv_heads: key/value heads ``K`` (``H % K == 0``); default ``H`` (MHA); 1 = MQA.
      head_dim: ``Dk``; default ``d_model // num_heads`` (then ``num_heads`` must divide
        ``d_model``).  value_head_dim: ``Dv`` (default ``Dk``).
      causal: causal self-attention (decoder).  window: sliding window ``w`` — a query at
        ``i`` sees keys ``i - w .. i`` (``.. i + w`` when not causal).
      positional: one of :data:`POSITIONAL`; default ``"rope"`` (``"none"`` for cross).
      qk_norm: one of :data:`QK_NORMS`.  softcap: logit cap.  sinks: one of :data:`SINKS` (learned
        sink logits, or the fixed zero logit of softmax-off-by-one).
      gate: one of :data:`GATES`.  dropout_rate: attention-probability dropout.
      cross: cross-attention (keys/values from ``context``).
      monitor: sow attention-logit and entropy statistics (see the module docstring).
      ring_cache: for ``window``: decode with a :class:`RingKVCache` of ``window + 1``
        slots (default) instead of a full-length :class:`KVCache` with a window mask.
      dtype: compute dtype; param_dtype: storage dtype of the parameters.
      impl: passed to :func:`attn_jax.attention`.
      attention_fn: replaces :func:`attn_jax.attention` (a score normaliser of
        :mod:`attn_jax.variants`): called as ``attention_fn(q, k, v, *, mask, scale, x)`` with
        ``x`` the layer input (``None`` for cross-attention), may be an ``nnx.Module`` holding its
        own parameters; decodes over a :class:`KVCache` (no ring buffer).  Not combinable with
        softcap, sinks, dropout, ALiBi or T5 bias.
    """

    SUPPORTED_FEATURES = frozenset({
        "mha", "gqa", "dk_ne_dv", "cross", "causal", "sliding_window", "segments", "key_padding", "alibi",
        "t5", "softcap", "sinks", "dropout", "bf16", "rope", "bidirectional",
    })
    # Analysis hooks (module docstring), set per instance by attn_jax.analysis; off by default.
    capture_maps: bool = False
    head_mask: HeadMask | None = None

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, value_head_dim: int | None = None, causal: bool = True,
                 window: int | None = None, positional: str | None = None, rope_base: float = 10000.0,
                 t5_num_buckets: int = 32, t5_max_distance: int = 128, qk_norm: str | None = None,
                 softcap: float | None = None, sinks: bool = False, gate: str | None = None,
                 dropout_rate: float = 0.0, cross: bool = False, ring_cache: bool = True, monitor: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, impl="auto", attention_fn=None, rngs: nnx.Rngs):
        head_dim = default_head_dim(d_model, num_heads, head_dim)
        check_positive_int("head_dim", head_dim)
        value_head_dim = head_dim if value_head_dim is None else check_positive_int("value_head_dim",
                                                                                    value_head_dim)
        num_kv_heads = num_heads if num_kv_heads is None else check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: {num_kv_heads} kv heads do not divide num_heads={num_heads}")
        if positional is None:
            positional = "none" if cross else "rope"
        if positional not in POSITIONAL:
            raise ValueError(f"positional: expected one of {POSITIONAL}, got {positional!r}")
        if cross and positional != "none":
            raise ValueError(f"positional: cross-attention takes no positional scheme, got {positional!r}")
        if cross and (causal or window is not None):
            causal, window = False, None  # queries and context keys live on different axes
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm: expected one of {QK_NORMS}, got {qk_norm!r}")
        if gate not in GATES:
            raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
            raise ValueError(f"window: expected an int >= 0, got {window!r}")
        if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
            raise ValueError(f"softcap: expected a positive float, got {softcap!r}")
        if not (isinstance(dropout_rate, (int, float)) and 0.0 <= dropout_rate < 1.0):
            raise ValueError(f"dropout_rate: expected a float in [0, 1), got {dropout_rate!r}")
        if positional == "rope" and head_dim % 2:
            raise ValueError(f"head_dim: RoPE needs an even head_dim, got {head_dim}")
        if attention_fn is not None:
            if not callable(attention_fn):
                raise TypeError(f"attention_fn: expected a callable, got {type(attention_fn).__name__}")
            taken = {"softcap": softcap, "sinks": sinks or None, "dropout_rate": dropout_rate or None,
                     "positional": positional if positional in ("alibi", "t5") else None}
            for name, value in taken.items():
                if value is not None:
                    raise ValueError(f"{name}: not available with a custom attention_fn (it takes q, k, v, mask, "
                                     f"scale and x only), got {value!r}")

        self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
        self.head_dim, self.value_head_dim = head_dim, value_head_dim
        self.causal, self.window, self.positional = bool(causal), window, positional
        self.rope_base = float(rope_base)
        self.qk_norm, self.softcap, self.gate = qk_norm, softcap, gate
        self.dropout_rate, self.cross, self.ring_cache = float(dropout_rate), bool(cross), bool(ring_cache)
        self.dtype, self.impl = dtype, impl
        self.attention_fn = attention_fn
        H, K, Dk, Dv, d = num_heads, num_kv_heads, head_dim, value_head_dim, d_model

        self.w_q = param(rngs, default_kernel_init, (d, H, Dk), ("embed", "heads", "head_dim"), param_dtype,
                         in_axis=0, out_axis=(1, 2))
        self.w_k = param(rngs, default_kernel_init, (d, K, Dk), ("embed", "kv_heads", "head_dim"), param_dtype,
                         in_axis=0, out_axis=(1, 2))
        self.w_v = param(rngs, default_kernel_init, (d, K, Dv), ("embed", "kv_heads", "head_dim"), param_dtype,
                         in_axis=0, out_axis=(1, 2))
        self.w_o = param(rngs, default_kernel_init, (H, Dv, d), ("heads", "head_dim", "embed"), param_dtype,
                         in_axis=(0, 1), out_axis=2)
        ones = nnx.initializers.ones
        if qk_norm == "rms":
            self.q_norm_scale = param(None, ones, (Dk,), ("head_dim",), param_dtype)
            self.k_norm_scale = param(None, ones, (Dk,), ("head_dim",), param_dtype)
        elif qk_norm == "l2":
            self.qk_scale = param(None, nnx.initializers.constant(math.sqrt(Dk)), (), (), param_dtype)
        if gate == "headwise":
            self.w_gate = param(rngs, default_kernel_init, (d, H), ("embed", "heads"), param_dtype)
        elif gate == "elementwise":
            self.w_gate = param(rngs, default_kernel_init, (d, H, Dv), ("embed", "heads", "head_dim"), param_dtype,
                                in_axis=0, out_axis=(1, 2))
        if sinks not in SINKS:
            raise ValueError(f"sinks: expected one of {SINKS}, got {sinks!r}")
        if sinks != "off_by_one" and sinks:
            self.sinks = param(None, nnx.initializers.zeros, (H,), ("heads",), jnp.float32)
        else:
            self.sinks = None
        self.off_by_one = sinks == "off_by_one"
        if positional == "t5":
            self.t5_table = param(rngs, nnx.initializers.normal(0.02), (t5_num_buckets, H), (None, "heads"),
                                  param_dtype)
            self.t5_max_distance = int(t5_max_distance)
        self.dropout_rngs = rngs if dropout_rate > 0 else None
        self.monitor = bool(monitor)

    # ------------------------------------------------------------------ caches

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        """Empty cache: :class:`RingKVCache` for sliding windows (``ring_cache``), else :class:`KVCache`."""
        if self.cross:
            raise ValueError("cross: a cross-attention cache holds the projected context; build it with "
                             "cross_cache(context)")
        if self.window is not None and self.ring_cache and self.attention_fn is None:
            return RingKVCache.init(batch, self.window, self.num_kv_heads, self.head_dim, dtype,
                                    value_dim=self.value_head_dim)
        return KVCache.init(batch, max_len, self.num_kv_heads, self.head_dim, dtype, value_dim=self.value_head_dim)

    def cross_cache(self, context, context_segment_ids=None, dtype=None) -> CrossAttentionCache:
        """Project ``context [B, S, d]`` once for cross-attention decoding."""
        if not self.cross:
            raise ValueError("cross: cross_cache needs a cross-attention module (cross=True)")
        k, v = self._kv(context)
        B, S = context.shape[:2]
        ids = check_segment_ids(context_segment_ids, B, S, "context_segment_ids")
        ids = jnp.ones((B, S), jnp.int32) if ids is None else ids
        if dtype is not None:
            k, v = k.astype(dtype), v.astype(dtype)
        return CrossAttentionCache(k, v, ids)

    # ------------------------------------------------------------------ projections

    def _w(self, p):
        return p[...].astype(self.dtype)

    def _kv(self, c):
        c = c.astype(self.dtype)
        k = jnp.einsum("bsd,dkf->bskf", c, self._w(self.w_k))
        v = jnp.einsum("bsd,dkf->bskf", c, self._w(self.w_v))
        if self.qk_norm is not None:
            k = self._norm(k, "k")
        return k, v

    def _norm(self, x, which: str):
        if self.qk_norm == "rms":
            scale = (self.q_norm_scale if which == "q" else self.k_norm_scale)[...].astype(jnp.float32)
            xf = x.astype(jnp.float32)
            y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6) * scale
            return y.astype(x.dtype)
        y = l2_normalize(x)
        if which == "q":
            y = (y.astype(jnp.float32) * self.qk_scale[...].astype(jnp.float32)).astype(x.dtype)
        return y

    def _bias(self):
        if self.positional == "alibi":
            return alibi(self.num_heads, causal=self.causal)
        if self.positional == "t5":
            return T5RelativeBias(self.t5_table[...].astype(jnp.float32), bidirectional=not self.causal,
                                  max_distance=self.t5_max_distance)
        return None

    # ------------------------------------------------------------------ forward

    def __call__(self, x, *, context=None, context_segment_ids=None, positions=None, segment_ids=None, cache=None,
                 deterministic: bool = True):
        """``(y [B, T, d], cache)``; see :mod:`attn_jax.nn.protocol` for the protocol.

        Cross-attention: pass ``context [B, S, d]`` (and ``context_segment_ids``, 0 = padding
        key) or a :class:`CrossAttentionCache` as ``cache`` (returned unchanged).
        """
        B, T, segment_ids = check_mixer_input(x, self.d_model, segment_ids)
        x = x.astype(self.dtype)
        q = jnp.einsum("btd,dhf->bthf", x, self._w(self.w_q))
        if self.qk_norm is not None:
            q = self._norm(q, "q")
        scale = 1.0 if self.qk_norm == "l2" else None
        rate = 0.0 if deterministic else self.dropout_rate
        drop_rng = self.dropout_rngs.dropout() if rate > 0 else None
        sinks = jnp.zeros((self.num_heads,), jnp.float32) if self.off_by_one else None
        kw = dict(scale=scale, softcap=self.softcap, sinks=sinks if self.sinks is None else self.sinks[...],
                  dropout_rate=rate, dropout_rng=drop_rng, impl=self.impl)

        if self.cross:
            o, cache = self._cross(q, context, context_segment_ids, segment_ids, cache, kw)
        else:
            if context is not None:
                raise ValueError("context: only cross-attention modules (cross=True) take a context")
            self._check_cache(cache)
            k, v = self._kv(x)
            if self.positional == "rope":
                pos = mixer_positions(positions, B, T, cache)
                q = apply_rope(q, pos, base=self.rope_base)
                k = apply_rope(k, pos, base=self.rope_base)
            if self.monitor and cache is None:
                logit_max, entropy = attention_statistics(q, k, mask=self._mask(segment_ids), bias=self._bias(),
                                                          scale=scale, softcap=self.softcap)
                self.sow(nnx.Intermediate, "attention_logit_max", logit_max)
                self.sow(nnx.Intermediate, "attention_entropy", entropy)
            capturing = self.capture_maps and cache is None
            o = self._capture(q, k, v, x, segment_ids, kw, deterministic) if capturing else None
            if o is None and self.attention_fn is not None:
                o, cache = self._custom(q, k, v, x, segment_ids, cache, scale)
            elif o is None:
                o, cache = self._attend(q, k, v, segment_ids=segment_ids, cache=cache, bias=self._bias(), kw=kw)
            if capturing:
                self.sow(nnx.Intermediate, "attention_values", v)
                self.sow(nnx.Intermediate, "attention_output", o)

        o = self._gate_output(x, o)
        if self.head_mask is not None:
            o = o * self.head_mask[...].astype(o.dtype)[:, None]
        y = jnp.einsum("bthf,hfd->btd", o.astype(self.dtype), self._w(self.w_o))
        return y, cache

    def _capture(self, q, k, v, x, segment_ids, kw, deterministic):
        """The ``capture_maps`` hook (module docstring): sow the attention weights; return the
        attention output computed from them (plain softmax) or None (the mixer's own path runs)."""
        if not deterministic and self.dropout_rate > 0:
            raise ValueError("deterministic: capture_maps records the attention without dropout; call the model "
                             "with deterministic=True")
        B, T, H, _ = q.shape
        S, K = k.shape[1], k.shape[2]
        mask = self._mask(segment_ids)
        if self.attention_fn is None and type(self)._attend is MultiHeadAttention._attend:
            visible = dense_scores.visible_pairs(masks.as_mask(mask), B, H, T, S)
            q, k, v = dense_scores.zero_unused(q, k, v, visible)
            s = dense_scores.scores(q, k, self.head_dim ** -0.5 if kw["scale"] is None else kw["scale"])
            if self.softcap is not None:
                s = self.softcap * jnp.tanh(s / self.softcap)
            bias = self._bias()
            if bias is not None:
                s = s + bias.materialize(T, S).astype(s.dtype)
            p = dense_scores.masked_softmax(s, visible, kw["sinks"])
            self.sow(nnx.Intermediate, "attention_logits", s if visible is None else jnp.where(visible, s, -jnp.inf))
            self.sow(nnx.Intermediate, "attention_weights", p.astype(jnp.float32))
            p = self.perturb("attention_weights", p)
            return dense_scores.mix_values(p, v, self.dtype)
        # any attention linear in v: o = W v, so the identity value basis (Dv = S) returns W itself
        eye = jnp.broadcast_to(jnp.eye(S, dtype=v.dtype)[None, :, None, :], (B, S, K, S))
        try:
            if self.attention_fn is not None:
                w = self.attention_fn(q, k, eye, mask=mask, scale=kw["scale"], x=x)
            else:
                w, _ = self._attend(q, k, eye, segment_ids=segment_ids, cache=None, bias=self._bias(), kw=kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"capture: the {type(self).__name__} mixer's attention cannot be probed with the identity "
                             f"value basis (it is not a map W with o = W v): {e}") from e
        self.sow(nnx.Intermediate, "attention_weights", w.astype(jnp.float32).transpose(0, 2, 1, 3))
        return None

    def _custom(self, q, k, v, x, segment_ids, cache, scale):
        """``attention_fn(q, k, v, mask=, scale=, x=)`` over the chunk, or over a :class:`KVCache`
        (the chunk appended first; causal and window masks in cache coordinates)."""
        if cache is None:
            return self.attention_fn(q, k, v, mask=self._mask(segment_ids), scale=scale, x=x), None
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache: a custom attention_fn decodes over a KVCache, got {type(cache).__name__}")
        B, T = q.shape[:2]
        n = jnp.full((B,), T, jnp.int32) if segment_ids is None else jnp.sum(segment_ids != 0, axis=1).astype(
            jnp.int32)
        before = cache.lengths
        dt = cache.dtype
        cache = cache.append(k.astype(dt), v.astype(dt), n)
        mask = masks.key_padding(cache.lengths)
        if self.causal:
            mask = mask & masks.causal(offset=before)
        if self.window is not None:
            w = self.window
            mask = mask & masks.sliding_window(w, 0 if self.causal else w, offset=before)
        o = self.attention_fn(q.astype(dt), cache.k, cache.v, mask=mask, scale=scale, x=x)
        o = jnp.where((jnp.arange(T)[None, :] < n[:, None])[:, :, None, None], o, 0).astype(self.dtype)
        return o, cache

    def _gate_output(self, x, o):
        """The ``gate`` option on the attention output ``o [B, T, H, Dv]`` (a hook: head gating
        variants replace it)."""
        if self.gate is None:
            return o
        if self.gate == "headwise":
            return output_gate(o, jnp.einsum("btd,dh->bth", x, self._w(self.w_gate)))
        return output_gate(o, jnp.einsum("btd,dhf->bthf", x, self._w(self.w_gate)))

    # Hooks for the attention variants of attn_jax.nn.variant_attention, which keep the projections,
    # positional schemes, gate and caches of this class and replace only the attention itself.

    def _check_cache(self, cache):
        if cache is not None and not isinstance(cache, (KVCache, RingKVCache, PagedKVCache)):
            raise TypeError(f"cache: expected a KVCache or RingKVCache from init_cache, got "
                            f"{type(cache).__name__}")

    def _attend(self, q, k, v, *, segment_ids, cache, bias, kw):
        """Self-attention of the projected ``q [B, T, H, Dk]``, ``k``, ``v`` (after RoPE); returns
        ``(o [B, T, H, Dv], cache)``.  ``kw``: scale, softcap, sinks, dropout and impl."""
        if cache is None:
            return attention(q, k, v, mask=self._mask(segment_ids), bias=bias, **kw), None
        n_new = None if segment_ids is None else jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
        dt = cache.dtype
        window = None if isinstance(cache, RingKVCache) else self.window
        decode_kw = {("attention_impl" if name == "impl" else name): x for name, x in kw.items()}
        o, cache = prefill(q.astype(dt), k.astype(dt), v.astype(dt), cache, n_new=n_new, window=window,
                           bias=bias, **decode_kw)
        return o.astype(self.dtype), cache

    def _mask(self, segment_ids):
        m = None
        if self.causal:
            m = masks.causal()
        if self.window is not None:
            w = masks.sliding_window(self.window) if self.causal else masks.sliding_window(self.window, self.window)
            m = w if m is None else m & w
        if segment_ids is not None:
            s = masks.segments(segment_ids)
            m = s if m is None else m & s
        return m

    def _cross(self, q, context, context_segment_ids, segment_ids, cache, kw):
        B, T = q.shape[:2]
        if cache is not None:
            if not isinstance(cache, CrossAttentionCache):
                raise TypeError(f"cache: expected a CrossAttentionCache (from cross_cache), got "
                                f"{type(cache).__name__}")
            if context is not None:
                raise ValueError("context: pass either context or a CrossAttentionCache, not both")
            k, v, kv_ids = cache.k.astype(self.dtype), cache.v.astype(self.dtype), cache.segment_ids
        else:
            if context is None:
                raise ValueError("context: cross-attention needs context [B, S, d_model] (or a CrossAttentionCache)")
            if getattr(context, "ndim", None) != 3 or context.shape[0] != B or context.shape[-1] != self.d_model:
                raise ValueError(f"context: expected [B={B}, S, d_model={self.d_model}], got "
                                 f"{getattr(context, 'shape', None)}")
            k, v = self._kv(context)
            kv_ids = check_segment_ids(context_segment_ids, B, context.shape[1], "context_segment_ids")
        mask = None
        if kv_ids is not None or segment_ids is not None:
            q_ids = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids
            if kv_ids is None:
                kv_ids = jnp.ones((B, k.shape[1]), jnp.int32)
            if segment_ids is None:
                kv_ids = (kv_ids != 0).astype(jnp.int32)   # key padding only
            mask = masks.segments(q_ids, kv_ids)
        if self.attention_fn is not None:
            return self.attention_fn(q, k, v, mask=mask, scale=kw["scale"], x=None), cache
        return attention(q, k, v, mask=mask, bias=None, **kw), cache


def sliding_window_attention(d_model: int, num_heads: int, *, rngs: nnx.Rngs, window: int = 8,
                             **kwargs) -> MultiHeadAttention:
    """The ``"sliding_window"`` registry entry: causal :class:`MultiHeadAttention` with a window
    (a query sees itself and the ``window`` previous tokens), decoded with a :class:`RingKVCache`."""
    return MultiHeadAttention(d_model, num_heads, window=window, rngs=rngs, **kwargs)


sliding_window_attention.SUPPORTED_FEATURES = MultiHeadAttention.SUPPORTED_FEATURES


# ----------------------------------------------------------------------------- declarations
# The softmax family's mixers (the ops' registry is attn_jax.softmax.ATTENTION).  These layers are
# hand-written NNX classes, so the declaration names them directly: this file is already in nn/.
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

_VASWANI = Paper("Attention Is All You Need", 2017, "1706.03762", "Vaswani et al.")

SOFTMAX = declare(Declaration(
    name="softmax", family="softmax", title="Exact softmax attention (MHA / GQA / MQA)",
    papers=(_VASWANI, Paper("GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints",
                            2023, "2305.13245", "Ainslie et al.")),
    summary="o = softmax(q kᵀ / sqrt(Dk) + bias, mask) v", op=attention, directions=("causal", "bidirectional"),
    layer=MultiHeadAttention, notes="impls: attn_jax.softmax.ATTENTION (reference, xla, pallas, cudnn)"))

SLIDING_WINDOW = declare(Declaration(
    name="sliding_window", family="softmax", title="Sliding-window softmax attention",
    papers=(Paper("Longformer: The Long-Document Transformer", 2020, "2004.05150", "Beltagy et al."),),
    summary="o_i = softmax over keys i - w .. i (.. i + w when not causal)", op=attention,
    directions=("causal", "bidirectional"), layer=sliding_window_attention,
    notes="decoded with a RingKVCache of window + 1 slots"))
