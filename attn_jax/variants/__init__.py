"""Softmax variants: other score normalisers, gating, sinks, head mixing, CoPE and MLA.

Each mechanism is one file of this package ending with its ``declare(Declaration(...))``
(family ``"variants"``); ``aj.variants.<op>(q, k, v, *, mask=None, ...)`` takes the same
layouts, masks and GQA head grouping as :func:`attn_jax.attention`.  The README's variants
matrix and the mixer registry are read from those declarations.
"""

import types as _types

from attn_jax.variants.mla import (LatentKVCache, mha_to_mla, mla_attention, mla_prefill, mla_reference,
                                   select_rope_pairs)
from attn_jax.variants.sigmoid import sigmoid_attention, sigmoid_attention_reference
from attn_jax.variants.relu import rela_output, relu_attention, relu_attention_reference
from attn_jax.variants.softplus import softplus_attention, softplus_attention_reference
from attn_jax.variants.clipped_softmax import clipped_softmax, clipped_softmax_reference
from attn_jax.variants.entmax import (entmax_attention, entmax_attention_reference, entmax_bisect, sparsemax,
                                      sparsemax_attention, sparsemax_attention_reference)
from attn_jax.variants.cog import cog_attention, cog_attention_reference
from attn_jax.variants.cope import cope_attention, cope_attention_reference, cope_position_logits, cope_positions
from attn_jax.variants.gated import gated_attention, gated_attention_reference, output_gate
from attn_jax.variants.mixture_of_heads import (head_gates, mixture_of_heads_attention,
                                               mixture_of_heads_attention_reference)
from attn_jax.variants.persistent_memory import persistent_memory_attention, persistent_memory_attention_reference
from attn_jax.variants.selective import (selection_scores, selective_attention, selective_attention_reference,
                                        selective_keep)
from attn_jax.variants.stability import attention_statistics, sigma_reparam, spectral_norm
from attn_jax.variants.talking_heads import talking_heads_attention, talking_heads_attention_reference

# the public names are the ones imported above (each module's own file lists its functions once)
__all__ = sorted(_n for _n, _v in dict(globals()).items()
                 if not _n.startswith("_") and not isinstance(_v, _types.ModuleType))
