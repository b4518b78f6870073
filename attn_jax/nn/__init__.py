"""Flax NNX modules: parameters around the pure attn_jax ops, and the mixer protocol.

Mixers follow :mod:`attn_jax.nn.protocol`; they are registered by name in
:mod:`attn_jax.mixers`.
"""

from attn_jax.nn.attention import CrossAttentionCache, MultiHeadAttention, sliding_window_attention
from attn_jax.nn.layers import Embed, GeluMLP, LayerNorm, RMSNorm, SwiGLU, make_mlp, make_norm, param
from attn_jax.nn.protocol import FEATURE_KEYS, TokenMixer

__all__ = [
    "MultiHeadAttention", "CrossAttentionCache", "sliding_window_attention", "RMSNorm", "LayerNorm", "SwiGLU",
    "GeluMLP", "Embed", "make_norm", "make_mlp", "param", "TokenMixer", "FEATURE_KEYS",
]
