"""BASED: Taylor-feature linear attention + small sliding-window softmax attention.

Arora, Eyuboglu, Zhang, Timalsina, Alberti, Zinsley, Zou, Rudra & Ré, "Simple linear attention
language models balance the recall-throughput tradeoff", 2024, arXiv:2402.18668, §4.

Two primitives:

* **Linear attention with the 2nd-order Taylor map** (:func:`attn_jax.linear.feature_maps.taylor_exp`),
  causal and normalised, on *small* query/key features ``q_feat, k_feat: [B, T, H, d']`` —
  ``d'`` (16 in the paper) is the dial that sets the recurrent state size
  ``(1 + d' + d'²) × (Dv + 1)`` per head:

      o_i = φ(q_i) Σ_{j≤i} φ(k_j)ᵀ v_j / (φ(q_i)·Σ_{j≤i} φ(k_j) + eps),   φ(q)·φ(k) = 1 + t + t²/2, t = q·k/√d'

  (zoology/based ``Based`` mixer; its ``eps = 1e-12``).  The projections to ``d'`` happen in the
  layer, so this op takes the features directly.
* **Sliding-window softmax attention** with a tiny window ``w`` (64-128 in the paper): query
  ``i`` sees keys ``i − w + 1 .. i`` (``w`` keys, itself included), i.e.
  ``masks.causal() & masks.sliding_window(w − 1)``, on full-width ``q, k, v``.

**How the paper combines them**: as *separate layers* of a hybrid stack (the released models
route layer indices to a linear-attention mixer, a sliding-window mixer, or a gated short
convolution — ``alt_mixer_layers`` / ``alt_mixer_2_layers`` in HazyResearch/based), not as a sum
inside one layer.  So :func:`based_attention` returns the two outputs ``(o_linear, o_window)``
unsummed; a layer that wants the single-layer mixture adds them (a deviation from the paper to
name if used).  The two are also available alone: :func:`based_linear_attention`,
:func:`based_window_attention`.

Decode: :class:`BasedCache` holds the float32 linear state ``[B, H, 1 + d' + d'², Dv + 1]``
(normaliser in the last column) and a :class:`~attn_jax.softmax.kv_cache.RingKVCache` of
``w`` slots for the window; :func:`based_prefill` appends any number of tokens (``T = 1`` is a
decode step) and equals the full forward.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.core import masks
from attn_jax.core.validation import check_qkv, shape_str
from attn_jax.linear.feature_maps import taylor_exp, taylor_exp_dim
from attn_jax.linear.gated import DEFAULT_CHUNK
from attn_jax.linear.linear_attention import linear_attention, linear_attention_reference
from attn_jax.softmax.api import attention
from attn_jax.softmax.decode import prefill as _ring_prefill
from attn_jax.softmax.kv_cache import RingKVCache

__all__ = ["based_attention", "based_attention_reference", "based_linear_attention", "based_window_attention",
           "BasedCache", "init_based_cache", "based_prefill", "DEFAULT_BASED_EPS"]

DEFAULT_BASED_EPS = 1e-12


def _check_window(window):
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected an int >= 1 (keys per query, itself included), got {window!r}")
    return window


def _window_mask(window, segment_ids):
    m = masks.causal() & masks.sliding_window(window - 1)
    return m if segment_ids is None else m & masks.segments(segment_ids)


def based_linear_attention(q_feat: Float[Array, "B T H F"], k_feat: Float[Array, "B T K F"],
                           v: Float[Array, "B T K Dv"], *, eps: float = DEFAULT_BASED_EPS,
                           initial_state=None, return_final_state: bool = False, segment_ids=None, impl="auto",
                           chunk_size: int = DEFAULT_CHUNK):
    """Causal normalised linear attention with the Taylor map on ``d'``-dim features; ``(o, state)``."""
    check_qkv(q_feat, k_feat, v)
    return linear_attention(q_feat, k_feat, v, feature_map=taylor_exp, normalize=True, eps=eps, scale=1.0,
                            causal=True, initial_state=initial_state, return_final_state=return_final_state,
                            segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)


def based_window_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T K D"], v: Float[Array, "B T K Dv"], *,
                           window: int, scale: float | None = None, segment_ids=None, impl="auto"):
    """Causal sliding-window softmax attention over the last ``window`` keys (itself included)."""
    check_qkv(q, k, v)
    window = _check_window(window)
    return attention(q, k, v, mask=_window_mask(window, segment_ids), scale=scale, impl=impl)


def _check_pair(q_feat, k_feat, q, k, v):
    check_qkv(q_feat, k_feat, v)
    check_qkv(q, k, v)
    if q_feat.shape[:3] != q.shape[:3] or k_feat.shape[:3] != k.shape[:3]:
        raise ValueError(f"q_feat, k_feat: expected the [B, T, heads] of q and k, got q_feat {shape_str(q_feat)} "
                         f"vs q {shape_str(q)}, k_feat {shape_str(k_feat)} vs k {shape_str(k)}")


def based_attention(q_feat: Float[Array, "B T H F"], k_feat: Float[Array, "B T K F"], q: Float[Array, "B T H D"],
                    k: Float[Array, "B T K D"], v: Float[Array, "B T K Dv"], *, window: int,
                    eps: float = DEFAULT_BASED_EPS, scale: float | None = None, segment_ids=None, impl="auto",
                    window_impl="auto"):
    """Both BASED primitives on shared values: returns ``(o_linear, o_window)`` (see module docstring).

    ``impl``: the linear-attention engine form; ``window_impl``: the softmax-attention impl.
    """
    _check_pair(q_feat, k_feat, q, k, v)
    o_lin, _ = based_linear_attention(q_feat, k_feat, v, eps=eps, segment_ids=segment_ids, impl=impl)
    o_win = based_window_attention(q, k, v, window=window, scale=scale, segment_ids=segment_ids, impl=window_impl)
    return o_lin, o_win


def based_attention_reference(q_feat, k_feat, q, k, v, *, window: int, eps: float = DEFAULT_BASED_EPS,
                              scale: float | None = None, segment_ids=None):
    """Quadratic references of both parts: the direct linear-attention formula and masked softmax."""
    _check_pair(q_feat, k_feat, q, k, v)
    window = _check_window(window)
    o_lin, _ = linear_attention_reference(q_feat, k_feat, v, feature_map=taylor_exp, normalize=True, eps=eps,
                                          scale=1.0, causal=True, segment_ids=segment_ids)
    o_win = attention(q, k, v, mask=_window_mask(window, segment_ids), scale=scale, impl="reference")
    return o_lin, o_win


# ----------------------------------------------------------------------------- decode
class BasedCache(NamedTuple):
    """Decode state: float32 linear state ``[B, H, 1 + d' + d'², Dv + 1]`` and the window's ring."""

    linear_state: jnp.ndarray
    ring: RingKVCache


def init_based_cache(batch: int, *, heads: int, kv_heads: int, feature_dim: int, head_dim: int, value_dim: int,
                     window: int, dtype=jnp.float32) -> BasedCache:
    """Empty cache: zero linear state and an empty ring for ``window − 1`` past keys (the query itself is the ``w``-th)."""
    window = _check_window(window)
    for name, val in (("batch", batch), ("heads", heads), ("kv_heads", kv_heads), ("feature_dim", feature_dim),
                      ("head_dim", head_dim), ("value_dim", value_dim)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    state = jnp.zeros((batch, heads, taylor_exp_dim(feature_dim), value_dim + 1), jnp.float32)
    ring = RingKVCache.init(batch, window - 1, kv_heads, head_dim, dtype, value_dim=value_dim)
    return BasedCache(state, ring)


def based_prefill(q_feat, k_feat, q, k, v, cache: BasedCache, *, eps: float = DEFAULT_BASED_EPS,
                  scale: float | None = None, impl="auto", window_impl="auto"):
    """Append ``T`` tokens: returns ``((o_linear, o_window), new_cache)``; ``T = 1`` is a decode step."""
    _check_pair(q_feat, k_feat, q, k, v)
    if not isinstance(cache, BasedCache):
        raise TypeError(f"cache: expected a BasedCache (init_based_cache), got {type(cache).__name__}")
    o_lin, state = based_linear_attention(q_feat, k_feat, v, eps=eps, initial_state=cache.linear_state,
                                          return_final_state=True, impl=impl)
    o_win, ring = _ring_prefill(q, k, v, cache.ring, scale=scale, attention_impl=window_impl)
    return (o_lin, o_win), BasedCache(state, ring)


# ----------------------------------------------------------------------------- declaration
from attn_jax.core import recipe  # noqa: E402
from attn_jax.core.declaration import Declaration, Paper, Parity, declare  # noqa: E402


def _parity(impl, x, *, causal=True, segment_ids=None, initial_state=None):
    qf, kf = x["q"][..., :6], x["k"][..., :6]   # the small feature dim d' of the linear part
    if impl == "reference":
        o = based_attention_reference(qf, kf, x["q"], x["k"], x["v"], window=8, segment_ids=segment_ids)
    else:
        o = based_attention(qf, kf, x["q"], x["k"], x["v"], window=8, segment_ids=segment_ids, impl=impl)
    return o[0] + o[1]


DECLARATION = declare(Declaration(
    name="based", family="linear", title="BASED (Taylor-2 linear + sliding-window softmax)",
    papers=(Paper("Simple linear attention language models balance the recall-throughput tradeoff", 2024,
                  "2402.18668", "Arora et al."),),
    summary="o_i = φ(q_i) Σ_{j≤i} φ(k_j)ᵀ v_j / (φ(q_i)·Σ_{j≤i} φ(k_j) + eps) with φ(q)·φ(k) = 1 + t + t²/2, "
            "t = q·k/sqrt(d'), on d' = 16 features; plus sliding-window softmax attention",
    op=based_attention, forms=("chunk", "parallel", "recurrent"), directions=("causal", "bidirectional"),
    parity=Parity(_parity, directions=("causal",), initial_state=False),
    layer=recipe.LinearLayer(recipe.NormalizedRule("taylor"),
                             recipe.Projections(qk_activation="identity", v_activation="identity", scale="one",
                                                key_dim=16)),
    notes="the mixer is BASED's linear-attention layer; the paper's window layers are the 'sliding_window' mixer "
          "(mixer_pattern='based,sliding_window')"))
