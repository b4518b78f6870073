"""Softmax variants: other score normalisers, gating, sinks, head mixing, CoPE and MLA.

Each mechanism is one file of this package ending with its ``declare(Declaration(...))``
(family ``"variants"``); ``aj.variants.<op>(q, k, v, *, mask=None, ...)`` takes the same
layouts, masks and GQA head grouping as :func:`attn_jax.attention`.  The README's variants
matrix and the mixer registry are read from those declarations.
"""

import types as _types

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
