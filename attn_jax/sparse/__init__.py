"""Sparse and routed attention on one block-sparse engine.

* :mod:`attn_jax.sparse.patterns`: static patterns (BigBird, Longformer, Sparse Transformer strided
  and fixed, PowerAttention, generic :func:`block_mask`, :func:`per_head`) as masks that
  ``aj.attention(..., mask=...)`` runs on the XLA tile engine, visiting only their tiles.
* :mod:`attn_jax.sparse.engine`: :func:`block_sparse_attention` over traced (router-made) block lists
  of a fixed maximum count (gather + softmax per query block, custom VJP, GQA).
* :mod:`attn_jax.sparse.moba`: MoBA (per-token top-k block routing by mean-pooled keys) on that engine.
* :mod:`attn_jax.sparse.nsa`: NSA (compressed + selected + sliding-window branches, gated).
"""

import types as _types

from attn_jax.sparse.engine import (BLOCK_SPARSE, block_layout_from_indices, block_mask_from_indices,
                                    block_sparse_attention, block_sparse_reference, block_sparse_tile_count,
                                    selected_block_count)
from attn_jax.sparse.moba import moba, moba_gate, moba_lists, moba_reference
from attn_jax.sparse.nsa import nsa, nsa_compressed, nsa_reference, nsa_select
from attn_jax.sparse.patterns import (BlockMask, GlobalTokens, PerHead, StridedDistance, SummaryColumns, bigbird,
                                      block_mask, fixed, global_tokens, layout_of, longformer, per_head,
                                      power_attention, strided)

__all__ = sorted(_n for _n, _v in dict(globals()).items()
                 if not _n.startswith("_") and not isinstance(_v, _types.ModuleType))
