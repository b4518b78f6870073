"""Structured biases evaluated at explicit per-row absolute positions (decode over caches)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn_jax.core.bias import StructuredBias, is_query_dependent

__all__ = ["PositionedBias", "positioned"]


@jax.tree_util.register_pytree_node_class
class PositionedBias(StructuredBias):
    """A structured bias evaluated at explicit per-row absolute positions.

    ``tile(q_idx, k_idx, T, S)`` of row ``r`` is ``inner`` evaluated for queries at
    absolute positions ``q_idx + q_offset[r]`` and keys at ``k_idx + k_offset[r]``
    (the inner bias sees ``query_positions(q', T, S) = q_idx + q_offset[r]``).
    ``batch_index[r]`` selects the row of a batch-dependent inner bias.  Output
    ``[R, H, tq, tk]``.  Assumes, like every bias in attn_jax, that the inner bias
    places queries with :func:`attn_jax.core.bias.query_positions`.
    """

    def __init__(self, inner: StructuredBias, q_offset, k_offset, batch_index):
        self.inner = inner
        self.q_offset = q_offset
        self.k_offset = k_offset
        self.batch_index = batch_index
        self.num_heads = inner.num_heads

    def tile(self, q_idx, k_idx, T: int, S: int):
        q_idx = jnp.asarray(q_idx, jnp.int32)
        k_idx = jnp.asarray(k_idx, jnp.int32)

        def one(qo, ko, bi):
            out = jnp.asarray(self.inner.tile(q_idx + (qo - (S - T)), k_idx + ko, T, S), jnp.float32)
            if out.ndim != 4:
                raise ValueError(f"bias: {type(self.inner).__name__}.tile must return rank 4, got {out.shape}")
            return out[0] if out.shape[0] == 1 else out[bi]

        return jax.vmap(one)(self.q_offset, self.k_offset, self.batch_index)

    @property
    def query_dependent(self) -> bool:
        """True when the inner bias reads the queries (then ``tile_q`` is the tile)."""
        return is_query_dependent(self.inner)

    def tile_q(self, q, q_idx, k_idx, T: int, S: int):
        """``inner.tile_q`` per row at the row's positions; ``q: [R, K, G, tq, Dk]`` (scaled queries)."""
        q_idx = jnp.asarray(q_idx, jnp.int32)
        k_idx = jnp.asarray(k_idx, jnp.int32)

        def one(qo, ko, q_row):
            return self.inner.tile_q(q_row[None], q_idx + (qo - (S - T)), k_idx + ko, T, S)[0]

        return jax.vmap(one)(self.q_offset, self.k_offset, q)

    def materialize_q(self, q, T: int, S: int):
        return self.tile_q(q, jnp.arange(T, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32), T, S)

    def parameters(self):
        return self.inner.parameters()

    def tree_flatten(self):
        return (self.inner, self.q_offset, self.k_offset, self.batch_index), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.inner, obj.q_offset, obj.k_offset, obj.batch_index = children
        obj.num_heads = getattr(obj.inner, "num_heads", None)
        return obj

    def __repr__(self):
        return f"PositionedBias({self.inner!r})"


def positioned(bias, q_offset, k_offset, batch_index):
    """``bias`` re-positioned per row (a :class:`PositionedBias`); non-structured biases pass through."""
    if not isinstance(bias, StructuredBias):
        return bias
    R = q_offset.shape[0]
    as_rows = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32), (R,))
    return PositionedBias(bias, as_rows(q_offset), as_rows(k_offset), as_rows(batch_index))
