"""Flax adapters: attn_jax attention inside stock Flax modules, attn_jax mixers inside Linen models.

``attention_fn`` plugs :func:`attn_jax.attention` into ``flax.nnx.MultiHeadAttention`` and
Linen ``flax.linen.MultiHeadDotProductAttention`` (their ``attention_fn=`` argument)::

    from flax import nnx
from flax.core import FrozenDict
    import attn_jax
    mha = nnx.MultiHeadAttention(num_heads=8, in_features=512, decode=False,
                                 attention_fn=attn_jax.flax.attention_fn(), rngs=nnx.Rngs(0))

It takes Flax's exact call signature (``flax.nnx.dot_product_attention``'s):

* layout ``[batch..., length, heads, head_dim]`` (extra leading batch axes are folded);
* ``mask``: bool, int or float, broadcastable to ``[batch..., heads|1, q_len, kv_len]``,
  nonzero = attend (``nn.make_causal_mask`` gives float32); ``bias``: additive, the same shape;
* ``is_causal`` (nnx): top-left aligned causal mask, as jax.nn;
* ``dtype``: q, k, v are cast to it (default: their promoted dtype), and the output has it;
* ``deterministic``: no dropout when True (no ``dropout_rng`` needed then, whatever
  ``dropout_rate``); ``None`` means "dropout iff a ``dropout_rng`` is given";
* ``precision``: accepted; attn_jax computes float32 logits at ``HIGHEST`` precision and
  16-bit inputs with float32 accumulation, which meets or exceeds any requested precision;
  ``force_fp32_for_softmax`` (Linen) likewise: the softmax is always float32.

Differences from Flax's default attention, none silent:

* **Dropout** is attn_jax's counter-based dropout (:mod:`attn_jax.core.random`): each
  probability ``P[b, h, i, j]`` is kept independently, by a hash of ``(key, b, h, i, j)``, so
  every implementation (XLA tiles, Pallas kernels) drops the same entries.  It cannot share
  one mask across batch and heads, so ``broadcast_dropout=True`` (Flax's default) with active
  dropout raises ``ValueError``: build the module with ``broadcast_dropout=False``.  The
  random bits differ from Flax's ``jax.random.bernoulli`` ones (same distribution, different
  draws).
* Attention weights are never materialised, so ``sow_weights=True`` (``module=...``) and
  Linen's custom ``qk_attn_weights_einsum`` / ``attn_weights_value_einsum`` raise.
* A query row whose keys are all masked outputs zeros (Flax: ``mean(V)``).

``linen_mixer(name, d_model, num_heads, **kw)`` wraps any registered mixer
(:mod:`attn_jax.mixers`) as a Linen module through ``nnx.bridge.ToLinen``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from attn_jax import mixers
from attn_jax.core import masks as M
from attn_jax.core.layout import fold_broadcastable, normalize_qkv
from attn_jax.softmax.api import attention

__all__ = ["attention_fn", "linen_mixer", "MixerOutput"]

#: Keyword arguments of :func:`attn_jax.attention` that ``attention_fn(**fixed)`` may fix.
FIXED_KWARGS = ("scale", "softcap", "sinks", "mask")


def attention_fn(impl="auto", **fixed) -> Callable:
    """A Flax ``attention_fn`` computing with :func:`attn_jax.attention`.

    Args:
      impl: the attn_jax implementation (``"auto"``, ``"xla"``, ``"pallas"``, ``"cudnn"``,
        ``"reference"`` or a sequence tried in order).
      **fixed: arguments of :func:`attn_jax.attention` applied to every call: ``scale``,
        ``softcap``, ``sinks``, and ``mask`` (an :mod:`attn_jax.masks` object, combined with
        Flax's mask by ``&``; mask objects see the folded batch).

    Returns:
      ``fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
      dropout_rate=0.0, deterministic=None, dtype=None, precision=None, module=None,
      is_causal=False, force_fp32_for_softmax=False, qk_attn_weights_einsum=None,
      attn_weights_value_einsum=None) -> [batch..., q_len, heads, v_head_dim]``.
    """
    bad = sorted(set(fixed) - set(FIXED_KWARGS))
    if bad:
        raise TypeError(f"attention_fn: unexpected keyword argument(s) {bad}; fixed arguments may be "
                        f"{', '.join(FIXED_KWARGS)}")
    fixed_mask = fixed.pop("mask", None)
    if fixed_mask is not None and not isinstance(fixed_mask, M.Mask):
        raise TypeError(f"mask: attention_fn(mask=...) expects an attn_jax.masks.Mask, got {type(fixed_mask).__name__}")

    def fn(query, key, value, bias=None, mask=None, broadcast_dropout: bool = True, dropout_rng=None,
           dropout_rate: float = 0.0, deterministic: bool | None = None, dtype=None, precision=None,
           module: Any = None, is_causal: bool = False, force_fp32_for_softmax: bool = False,
           qk_attn_weights_einsum=None, attn_weights_value_einsum=None):
        if module is not None:
            raise ValueError("module: sowing attention weights (sow_weights=True) needs the weights, which "
                             "attn_jax never materialises; use Flax's default attention_fn to inspect them")
        for name, val in (("qk_attn_weights_einsum", qk_attn_weights_einsum),
                          ("attn_weights_value_einsum", attn_weights_value_einsum)):
            if val is not None:
                raise ValueError(f"{name}: custom einsums are not supported by attn_jax.flax.attention_fn "
                                 f"(got {val!r}); expected None")
        if deterministic is None:
            deterministic = dropout_rng is None
        rate = float(dropout_rate)
        active = rate > 0.0 and not deterministic
        if active and dropout_rng is None:
            raise ValueError("dropout_rng: a PRNG key is required when dropout_rate > 0 and deterministic=False")
        if active and broadcast_dropout:
            raise ValueError("broadcast_dropout: attn_jax's counter-based dropout draws every (batch, head, query, "
                             "key) entry independently and cannot share one mask across batch and heads; build "
                             "the Flax module with broadcast_dropout=False (or dropout_rate=0)")
        q, k, v = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
        dt = jnp.result_type(q, k, v) if dtype is None else jnp.dtype(dtype)
        q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)

        m = mask
        parts = [p for p in (fixed_mask, M.causal(offset=0) if is_causal else None) if p is not None]
        if parts:
            combined = parts[0]
            for p in parts[1:]:
                combined = combined & p
            if m is not None:
                # Flax's array mask joins the mask objects: fold it to [B|1, H|1, T, S] first.
                m = M.dense(fold_broadcastable("mask", m, normalize_qkv(q, k, v)[3])) & combined
            else:
                m = combined
        if bias is not None:
            bias = jnp.asarray(bias).astype(jnp.promote_types(dt, jnp.float32))
        return attention(q, k, v, bias, m, dropout_rate=rate if active else 0.0,
                         dropout_rng=dropout_rng if active else None, impl=impl, **fixed)

    return fn


class MixerOutput(nnx.Module):
    """A registered mixer returning only its output ``y`` (for ``nnx.bridge.ToLinen``).

    ``MixerOutput(name, d_model, num_heads, rngs=..., **mixer_kwargs)(x, *, positions=None,
    segment_ids=None, deterministic=True) -> y``.  Decode caches are not carried through
    Linen: use the NNX mixer (``attn_jax.mixers.get(name)``) for cached decoding.
    """

    def __init__(self, name: str, d_model: int, num_heads: int, *, rngs: nnx.Rngs, **mixer_kwargs):
        self.mixer = mixers.get(name)(d_model, num_heads, rngs=rngs, **mixer_kwargs)

    def __call__(self, x, *, positions=None, segment_ids=None, deterministic: bool = True):
        y, _ = self.mixer(x, positions=positions, segment_ids=segment_ids, cache=None, deterministic=deterministic)
        return y


def linen_mixer(name: str, d_model: int, num_heads: int, *, module_name: str | None = None, **mixer_kwargs):
    """A Linen module running the registered mixer ``name`` (``nnx.bridge.ToLinen``).

    Call it as ``y = module(x, positions=None, segment_ids=None, deterministic=True)`` with
    ``x: [B, T, d_model]``; its parameters live in Linen's ``params`` collection.  Unknown
    names raise ``ValueError`` listing the registered mixers.
    """
    mixers.get(name)  # fail at construction, listing the registered names
    return nnx.bridge.ToLinen(MixerOutput, args=(name, d_model, num_heads), kwargs=FrozenDict(mixer_kwargs),
                              name=module_name)
