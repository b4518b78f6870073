"""Softmax attention with learned relative embeddings (Shaw et al. 2018; Music Transformer), as a mixer.

``RelativeAttention`` is :class:`~attn_jax.nn.attention.MultiHeadAttention` (projections, GQA,
qk-norm, output gate, caches) with the bias of :class:`attn_jax.positional.relative.RelativeEmbedding`:

    logits_ij = scale * (q_i · k_j + q_i · E[row(j - i)])

``E: [N, H, Dk]`` is a parameter (init normal(0.02)); ``N = R + 1`` rows of past distances when
causal (Music Transformer), ``2R + 1`` rows clipped at ``±R`` otherwise (Shaw),
``R = max_distance``.  The bias is evaluated per tile from the queries (``impl="xla"`` / ``"dense"``:
no ``T x S`` array); decoding over a :class:`KVCache` places it at the true positions through
:func:`attn_jax.softmax.decode.prefill`, so prefill + step decode equals the full forward.  No RoPE
by default (``positional="none"``; ``"rope"`` may be combined).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attn_jax.nn.attention import MultiHeadAttention
from attn_jax.nn.layers import param
from attn_jax.positional.relative import RelativeEmbedding

__all__ = ["RelativeAttention"]


class RelativeAttention(MultiHeadAttention):
    """Relative-embedding attention mixer (module docstring); the ``"relative"`` registry entry.

    Args:
      d_model, num_heads: as :class:`MultiHeadAttention` (every other keyword is passed to it).
      max_distance: ``R``, the largest distance with its own embedding.
      positional: ``"none"`` (default) or ``"rope"``; ALiBi and T5 would be a second bias.
    """

    SUPPORTED_FEATURES = frozenset({"mha", "gqa", "dk_ne_dv", "causal", "segments", "key_padding", "bf16",
                                    "bidirectional"})

    def __init__(self, d_model: int, num_heads: int, *, max_distance: int = 64, positional: str = "none",
                 param_dtype=jnp.float32, rngs: nnx.Rngs, **kwargs):
        if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 1:
            raise ValueError(f"max_distance: expected an int >= 1, got {max_distance!r}")
        if positional not in ("none", "rope"):
            raise ValueError(f"positional: expected 'none' or 'rope' with relative embeddings, got {positional!r}")
        if kwargs.get("cross"):
            raise ValueError("cross: relative embeddings need queries and keys on one axis (self-attention only)")
        super().__init__(d_model, num_heads, positional=positional, param_dtype=param_dtype, rngs=rngs, **kwargs)
        n = max_distance + 1 if self.causal else 2 * max_distance + 1
        self.max_distance = max_distance
        self.rel_table = param(rngs, nnx.initializers.normal(0.02), (n, num_heads, self.head_dim),
                               (None, "heads", "head_dim"), param_dtype)

    def _bias(self):
        """The relative embeddings as this layer's bias (the parent's hook for ALiBi / T5)."""
        return RelativeEmbedding(self.rel_table[...].astype(self.dtype), causal=self.causal)
