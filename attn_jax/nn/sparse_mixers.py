"""Mixers for the routed sparse attention of :mod:`attn_jax.sparse`: :class:`MultiHeadAttention` with
the attention replaced through its ``attention_fn`` hook.

* ``moba_mixer`` (registry ``"moba"``): :func:`attn_jax.sparse.moba` (Lu et al. 2025, arXiv:2502.13189)
  with the layer's projections, GQA, RoPE and qk-norm; parameter-free gate.  Decoding runs over a
  :class:`~attn_jax.softmax.kv_cache.KVCache`: the chunk is appended and MoBA runs over the whole
  cache with the cache lengths as query offsets -- the routing only ever compares complete past
  blocks, so prefill + decode equals the full forward.  Packed documents (``segment_ids``) are
  masked inside the selected blocks; the blocks are positions of the packed row (a deviation from
  running each document alone once a row packs several documents into one block range).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attn_jax.core.masks import Causal, KeyPadding, Segments
from attn_jax.nn.attention import MultiHeadAttention
from attn_jax.sparse.moba import moba

__all__ = ["MoBAAttentionFn", "moba_mixer"]

FEATURES = frozenset({"mha", "gqa", "dk_ne_dv", "causal", "segments", "key_padding", "rope", "bf16"})


class MoBAAttentionFn(nnx.Module):
    """``attention_fn`` of :class:`MultiHeadAttention` running :func:`attn_jax.sparse.moba`; reads the
    layer's mask (``causal`` with its offset, ``segments``, ``key_padding``) into MoBA's arguments."""

    def __init__(self, block_size: int, top_k: int, block_q: int | None = None, impl="auto"):
        self.block_size, self.top_k, self.block_q, self.impl = int(block_size), int(top_k), block_q, impl

    def __call__(self, q, k, v, *, mask, scale, x):
        B, T = q.shape[:2]
        S = k.shape[1]
        offset, q_ids, kv_ids, kv_pad, causal = None, None, None, None, False
        for m in (() if mask is None else mask.conjuncts()):
            if isinstance(m, Causal):
                causal, offset = True, m.offset
            elif isinstance(m, Segments):
                q_ids, kv_ids = m.q_ids, m.kv()
            elif isinstance(m, KeyPadding):
                kv_pad = (jnp.arange(S)[None, :] < m.lengths[:, None]).astype(jnp.int32)
            else:
                raise ValueError(f"mask: MoBA takes causal, segments and key padding masks, got {m!r}")
        if not causal:
            raise ValueError("causal: MoBA is causal (build the mixer with causal=True)")
        if kv_pad is not None:
            q_ids = jnp.ones((B, T), jnp.int32) if q_ids is None else q_ids
            kv_ids = jnp.broadcast_to(kv_pad, (B, S)) if kv_ids is None else kv_ids * kv_pad
        seg = None if q_ids is None else (jnp.broadcast_to(q_ids, (B, T)), jnp.broadcast_to(kv_ids, (B, S)))
        if offset is not None and not isinstance(offset, int):
            offset = jnp.broadcast_to(offset, (B,))
        return moba(q, k, v, block_size=self.block_size, top_k=self.top_k, scale=scale, block_q=self.block_q,
                    q_offset=offset, segment_ids=seg, impl=self.impl)


def moba_mixer(d_model: int, num_heads: int, *, rngs: nnx.Rngs, block_size: int = 64, top_k: int = 3,
               block_q: int | None = None, impl="auto", **kwargs) -> MultiHeadAttention:
    """MoBA mixer: ``block_size`` tokens per key block, ``top_k`` blocks per query (its own included)."""
    if kwargs.get("causal", True) is not True:
        raise ValueError("causal: MoBA is causal; moba_mixer takes causal=True only")
    if kwargs.get("window") is not None:
        raise ValueError("window: MoBA selects blocks itself; moba_mixer takes no sliding window")
    return MultiHeadAttention(d_model, num_heads, attention_fn=MoBAAttentionFn(block_size, top_k, block_q, impl),
                              rngs=rngs, **kwargs)


moba_mixer.SUPPORTED_FEATURES = FEATURES
