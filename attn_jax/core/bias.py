"""Structured additive biases that can be evaluated one tile at a time.

A dense bias array ``[B|1, H|1, T, S]`` is the simplest way to add logits, but
it costs ``T*S`` memory.  Positional schemes such as ALiBi or T5 relative
buckets are functions of the (query, key) positions, so fast paths evaluate
them per tile instead.  Any object implementing :class:`StructuredBias` can be
passed as ``bias=`` to :func:`attn_jax.attention`:

* ``tile(q_idx, k_idx, T, S)`` returns the bias for the query indices
  ``q_idx: int32[tq]`` and key indices ``k_idx: int32[tk]`` as a float32
  array broadcastable to ``[B, H, tq, tk]`` (always rank 4).  Indices are
  absolute positions in the query / key sequences of lengths ``T`` and ``S``;
  they may be traced values (fast paths pass dynamic tile offsets).
* ``materialize(T, S)`` returns the dense bias (references and tests only).

Query/key alignment follows the masks: unless a subclass says otherwise, query
``i`` sits at absolute position ``i + (S - T)`` (bottom-right alignment, which
is what decoding and chunked prefill need).
"""

from __future__ import annotations

import jax.numpy as jnp


class StructuredBias:
    """Base class for biases computed from positions (see module docstring)."""

    #: number of heads the bias is defined for, or None if head-independent.
    num_heads: int | None = None

    def tile(self, q_idx, k_idx, T: int, S: int):  # pragma: no cover - interface
        raise NotImplementedError

    def materialize(self, T: int, S: int):
        return self.tile(jnp.arange(T, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32), T, S)

    def parameters(self):
        """Arrays the bias depends on (for gradients); default none."""
        return ()


def query_positions(q_idx, T: int, S: int):
    """Absolute positions of queries under bottom-right alignment."""
    return q_idx + (S - T)
