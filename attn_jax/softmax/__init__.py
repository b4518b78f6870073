"""Exact softmax attention: reference, XLA and kernel-backed implementations, decode."""

from attn_jax.softmax.api import ATTENTION, attention, explain, merge_attention
from attn_jax.softmax.problem import AttentionProblem
from attn_jax.softmax.jax_nn import dot_product_attention
from attn_jax.softmax.reference import attention_reference

__all__ = ["ATTENTION", "AttentionProblem", "attention", "explain", "merge_attention", "attention_reference",
           "dot_product_attention"]
