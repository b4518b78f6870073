"""Sparse and routed attention on one block-sparse engine.

* :mod:`attn_jax.sparse.patterns`: static patterns (BigBird, Longformer, Sparse Transformer strided
  and fixed, PowerAttention, generic :func:`block_mask`, :func:`per_head`) as masks that
  ``aj.attention(..., mask=...)`` runs on the XLA tile engine, visiting only their tiles.
"""

import types as _types

from attn_jax.sparse.patterns import (BlockMask, GlobalTokens, PerHead, StridedDistance, SummaryColumns, bigbird,
                                      block_mask, fixed, global_tokens, layout_of, longformer, per_head,
                                      power_attention, strided)

__all__ = sorted(_n for _n, _v in dict(globals()).items()
                 if not _n.startswith("_") and not isinstance(_v, _types.ModuleType))
