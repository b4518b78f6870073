"""Mixers for the score normalisers of :mod:`attn_jax.variants`: :class:`MultiHeadAttention` with
the softmax replaced through its ``attention_fn`` hook.

Each factory builds the usual projections (q/k/v/o, RoPE, GQA, qk-norm, output gate) around one
normaliser module below, which holds that normaliser's own parameters (registry names in
parentheses):

* ``sigmoid_attention`` (``"sigmoid"``): ``b = -log(train_length)`` (a fixed number, so prefill + decode over a
  cache equals the full forward; the op's ``"-log n"`` would follow the cache length instead).
* ``relu_attention`` (ReLA, ``"rela"``): RMSNorm of each head's output with a learned gain ``[H, Dv]``
  (init 1), and with ``gated=True`` (default) a sigmoid gate ``σ(x W_g)``, ``W_g: [d, H, Dv]``.
* ``softplus_attention``, ``sparsemax_attention``, ``cog_attention`` (``"softplus"``, ``"sparsemax"``,
  ``"cog"``): no parameters.
* ``clipped_softmax``: fixed ``gamma``, ``zeta``.
* ``entmax_attention`` (``"entmax"``): a learned ``α`` per head, ``α_h = 1 + sigmoid(a_h)`` in ``(1, 2)``
  (``a_h`` init 0: ``α = 1.5``), as in Correia et al. 2019.

The mixers claim the decoder features only (``"causal"``); ``causal=False`` works but the
encoder route is not registered for them (test time).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax import variants
from attn_jax.nn.attention import MultiHeadAttention
from attn_jax.nn.layers import default_kernel_init, param

__all__ = ["SigmoidNormaliser", "ReLANormaliser", "FixedNormaliser", "EntmaxNormaliser", "sigmoid_mixer",
           "relu_mixer", "softplus_mixer", "clipped_softmax_mixer", "entmax_mixer", "sparsemax_mixer", "cog_mixer"]

FEATURES = frozenset({"mha", "gqa", "dk_ne_dv", "causal", "sliding_window", "segments", "key_padding", "rope",
                      "bf16"})


class SigmoidNormaliser(nnx.Module):
    """``sigmoid_attention`` with the fixed bias ``b``."""

    def __init__(self, b: float, impl="auto"):
        self.b, self.impl = float(b), impl

    def __call__(self, q, k, v, *, mask, scale, x):
        return variants.sigmoid_attention(q, k, v, mask=mask, scale=scale, b=self.b, impl=self.impl)


class ReLANormaliser(nnx.Module):
    """ReLA: ReLU scores, RMSNorm per head with gain ``[H, Dv]``, optional gate ``σ(x W_g)``."""

    def __init__(self, d_model: int, num_heads: int, value_dim: int, *, gated: bool, rngs: nnx.Rngs,
                 param_dtype=jnp.float32, impl="auto"):
        self.gain = param(None, nnx.initializers.ones, (num_heads, value_dim), ("heads", "head_dim"), param_dtype)
        self.w_gate = (param(rngs, default_kernel_init, (d_model, num_heads, value_dim),
                             ("embed", "heads", "head_dim"), param_dtype, in_axis=0, out_axis=(1, 2))
                       if gated else None)
        self.impl = impl

    def __call__(self, q, k, v, *, mask, scale, x):
        gate = None
        if self.w_gate is not None and x is not None:
            gate = jax.nn.sigmoid(jnp.einsum("btd,dhf->bthf", x, self.w_gate[...].astype(x.dtype)))
        return variants.relu_attention(q, k, v, mask=mask, scale=scale, gain=self.gain[...], gate=gate,
                                       impl=self.impl)


class FixedNormaliser(nnx.Module):
    """An op of :mod:`attn_jax.variants` with fixed keyword options and no parameters."""

    def __init__(self, op_name: str, **options):
        self.op_name, self.options = op_name, dict(options)

    def __call__(self, q, k, v, *, mask, scale, x):
        return getattr(variants, self.op_name)(q, k, v, mask=mask, scale=scale, **self.options)


class EntmaxNormaliser(nnx.Module):
    """α-entmax with ``α_h = 1 + sigmoid(a_h)`` learned per head."""

    def __init__(self, num_heads: int, *, n_iter: int = 30, impl="auto"):
        self.alpha_logit = param(None, nnx.initializers.zeros, (num_heads,), ("heads",), jnp.float32)
        self.n_iter, self.impl = int(n_iter), impl

    def alpha(self):
        return 1.0 + jax.nn.sigmoid(self.alpha_logit[...])

    def __call__(self, q, k, v, *, mask, scale, x):
        return variants.entmax_attention(q, k, v, mask=mask, scale=scale, alpha=self.alpha(), n_iter=self.n_iter,
                                         impl=self.impl)


def _features(f):
    f.SUPPORTED_FEATURES = FEATURES
    return f


@_features
def sigmoid_mixer(d_model: int, num_heads: int, *, rngs: nnx.Rngs, train_length: int = 1024, impl="auto",
                  **kwargs) -> MultiHeadAttention:
    """Sigmoid-attention mixer, ``b = -log(train_length)``."""
    return MultiHeadAttention(d_model, num_heads, attention_fn=SigmoidNormaliser(-math.log(train_length), impl),
                              rngs=rngs, **kwargs)


@_features
def relu_mixer(d_model: int, num_heads: int, *, rngs: nnx.Rngs, gated: bool = True, impl="auto",
               **kwargs) -> MultiHeadAttention:
    """ReLA mixer (RMSNorm stabiliser; ``gated``: with the sigmoid gate)."""
    head_dim = kwargs.get("value_head_dim") or kwargs.get("head_dim") or d_model // num_heads
    fn = ReLANormaliser(d_model, num_heads, head_dim, gated=gated, rngs=rngs,
                        param_dtype=kwargs.get("param_dtype", jnp.float32), impl=impl)
    return MultiHeadAttention(d_model, num_heads, attention_fn=fn, rngs=rngs, **kwargs)


@_features
def softplus_mixer(d_model: int, num_heads: int, *, rngs: nnx.Rngs, impl="auto", **kwargs) -> MultiHeadAttention:
    """Softplus + l1 attention mixer."""
    return MultiHeadAttention(d_model, num_heads, attention_fn=FixedNormaliser("softplus_attention", impl=impl),
                              rngs=rngs, **kwargs)


@_features
def clipped_softmax_mixer(d_model: int, num_heads: int, *, rngs: nnx.Rngs, gamma: float = -0.03, zeta: float = 1.0,
                          **kwargs) -> MultiHeadAttention:
    """Clipped-softmax mixer (fixed ``gamma``, ``zeta``)."""
    return MultiHeadAttention(d_model, num_heads,
                              attention_fn=FixedNormaliser("clipped_softmax", gamma=gamma, zeta=zeta), rngs=rngs,
                              **kwargs)


@_features
def entmax_mixer(d_model: int, num_heads: int, *, rngs: nnx.Rngs, n_iter: int = 30, **kwargs) -> MultiHeadAttention:
    """α-entmax mixer with a learned α per head."""
    return MultiHeadAttention(d_model, num_heads, attention_fn=EntmaxNormaliser(num_heads, n_iter=n_iter), rngs=rngs,
                              **kwargs)


@_features
def sparsemax_mixer(d_model: int, num_heads: int, *, rngs: nnx.Rngs, **kwargs) -> MultiHeadAttention:
    """Sparsemax mixer."""
    return MultiHeadAttention(d_model, num_heads, attention_fn=FixedNormaliser("sparsemax_attention"), rngs=rngs,
                              **kwargs)


@_features
def cog_mixer(d_model: int, num_heads: int, *, rngs: nnx.Rngs, **kwargs) -> MultiHeadAttention:
    """Cog-attention mixer (signed weights)."""
    return MultiHeadAttention(d_model, num_heads, attention_fn=FixedNormaliser("cog_attention"), rngs=rngs, **kwargs)
