"""Positional schemes: rotary (RoPE, xPos), additive biases (ALiBi, T5, FIRE, low-rank factors, relative
embeddings q·E) and absolute embeddings.

Rotary schemes transform queries and keys ``[B, T, H, D]`` before attention; additive biases are
:class:`attn_jax.core.bias.StructuredBias` pytrees passed as ``bias=`` to attention; absolute
embeddings are added to token embeddings.
"""

from attn_jax.positional.absolute import (
    init_learned_absolute,
    learned_absolute_embedding,
    sinusoidal_embedding,
)
from attn_jax.positional.alibi import ALiBi, alibi, alibi_slopes
from attn_jax.positional.fire import FIRE, init_fire
from attn_jax.positional.low_rank import LowRankBias, alibi_factors, low_rank_bias, low_rank_factors
from attn_jax.positional.rope import RopeScaling, apply_rope, rope_frequencies, yarn_attention_factor
from attn_jax.positional.relative import RelativeEmbedding, relative_attention
from attn_jax.positional.t5 import T5RelativeBias, relative_position_bucket
from attn_jax.positional.xpos import apply_xpos

__all__ = [
    "apply_rope",
    "rope_frequencies",
    "RopeScaling",
    "yarn_attention_factor",
    "alibi_slopes",
    "ALiBi",
    "alibi",
    "LowRankBias",
    "low_rank_bias",
    "low_rank_factors",
    "alibi_factors",
    "relative_position_bucket",
    "T5RelativeBias",
    "RelativeEmbedding",
    "relative_attention",
    "FIRE",
    "init_fire",
    "sinusoidal_embedding",
    "learned_absolute_embedding",
    "init_learned_absolute",
    "apply_xpos",
]
