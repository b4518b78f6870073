"""Decoding over a KV cache sharded along the sequence axis (flash-decoding across devices).

The cache ``k, v [B, S, K, D]`` is split into ``n`` contiguous blocks of ``S / n`` positions over
``mesh``'s ``axis_name``; the new queries ``q [B, T, H, D]`` are replicated along it.  Device ``r``
attends its queries to the keys it holds (positions ``[r S/n, (r+1) S/n)``, visible iff
``j < lengths[b]`` and ``j <= offset[b] + t``), giving a partial ``(O_r, lse_r)``; the partials are
all-gathered over the axis (``n`` small ``[B, T, H, Dv]`` blocks, never the cache) and merged
exactly by their log-sum-exps (:func:`attn_jax.merge_attention`), as the split-K decode of
"Flash-Decoding for long-context inference" (Dao, Haziza, Massa & Sizov, 2023) does within one
device.  Equals ``attn_jax.softmax.decode.decode_attention(q, k, v, lengths=..., offset=...)``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, Float, Int

from attn_jax.parallel.mesh import check_mesh_inputs
from attn_jax.core import masks
from attn_jax.parallel.ring import AttentionOutput
from attn_jax.softmax import attention, merge_attention

__all__ = ["sharded_decode_attention"]


def _decode_body(q, k, v, lengths, offset, *, axis_name, n, scale, impl):
    r = lax.axis_index(axis_name)
    S_local = k.shape[1]
    start = r * S_local
    local_len = jnp.clip(lengths - start, 0, S_local)
    mask = masks.causal(offset=offset - start) & masks.key_padding(local_len)
    o, lse = attention(q, k, v, mask=mask, scale=scale, return_lse=True, impl=impl)
    os_ = lax.all_gather(o, axis_name, axis=0, tiled=False)       # [n, B, T, H, Dv]
    lses = lax.all_gather(lse, axis_name, axis=0, tiled=False)    # [n, B, T, H]
    return merge_attention([(os_[i], lses[i]) for i in range(n)], return_lse=True)


def sharded_decode_attention(q: Float[Array, "B T H Dk"], k: Float[Array, "B S K Dk"], v: Float[Array, "B S K Dv"],
                             *, lengths: Int[Array, " B"], offset: Int[Array, " B"] | None = None, mesh: Mesh,
                             axis_name: str = "sequence", scale: float | None = None, return_lse: bool = False,
                             impl="auto") -> AttentionOutput:
    """Causal attention of ``T`` new queries over a cache sharded along its sequence axis.

    Args:
      q: ``[B, T, H, Dk]`` (replicated over ``axis_name``).
      k, v: the cache ``[B, S, K, D]``, ``S`` divisible by the size of ``axis_name``.
      lengths: ``int [B]``, the valid cache entries per row.
      offset: ``int [B]``, position of query 0 (default ``lengths - T``: the last query is the last key).
      mesh, axis_name: the mesh and the axis the cache is split over.
      scale, impl: as :func:`attn_jax.attention`.
      return_lse: also return the float32 log-sum-exp ``[B, T, H]``.

    Returns ``o [B, T, H, Dv]`` (and ``lse``), replicated over ``axis_name``.
    """
    check_mesh_inputs(mesh, axis_name, q, k, v)
    B, T = q.shape[:2]
    n = mesh.shape[axis_name]
    if k.shape[1] % n or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k: expected the cache length S divisible by the {axis_name!r} axis size {n} (and v's "
                         f"[B, S] equal), got k {k.shape}, v {v.shape}")
    lengths = jnp.asarray(lengths)
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths: expected an integer array of shape [B] = ({B},), "
                         f"got {lengths.dtype}{lengths.shape}")
    offset = lengths - T if offset is None else jnp.asarray(offset)
    if offset.shape != (B,) or not jnp.issubdtype(offset.dtype, jnp.integer):
        raise ValueError(f"offset: expected an integer array of shape [B] = ({B},), "
                         f"got {offset.dtype}{offset.shape}")
    body = partial(_decode_body, axis_name=axis_name, n=n, scale=scale, impl=impl)
    cache = P(None, axis_name, None, None)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(), cache, cache, P(), P()), out_specs=(P(), P()),
                       check_vma=False)   # impl="auto" traces the Pallas branch (see ring.py)
    o, lse = fn(q, k, v, lengths.astype(jnp.int32), offset.astype(jnp.int32))
    return (o, lse) if return_lse else o
