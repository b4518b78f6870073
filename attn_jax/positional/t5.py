"""T5 relative position bias with log-spaced buckets.

Paper: Raffel, Shazeer, Roberts, Lee, Narang, Matena, Zhou, Li, Liu, "Exploring the Limits of
Transfer Learning with a Unified Text-to-Text Transformer", 2019, arXiv:1910.10683 (Sec. 2.1,
"a scalar ... added to the corresponding logit"; 32 buckets, offsets up to 128).  The logit of
query ``i`` and key ``j`` gets ``table[bucket(j - i), h]``, a learned scalar per bucket and head,
shared across layers in T5.

Bucketing follows the reference ``_relative_position_bucket`` of Mesh TensorFlow
(``mesh_tensorflow/transformer/transformer_layers.py``), which Hugging Face T5 ports
unchanged.  With ``d = key_pos - query_pos`` and ``N = num_buckets``:

* bidirectional: half the buckets for ``d <= 0`` and half (offset by ``N/2``) for ``d > 0``;
  ``n = |d|`` and ``N <- N / 2``.  Unidirectional (causal decoders): ``n = max(-d, 0)``, so all
  keys after the query fall in bucket 0.
* ``max_exact = N // 2``; ``n < max_exact`` is its own bucket ``n``;
* otherwise ``max_exact + int(ln(n / max_exact) / ln(max_distance / max_exact) * (N - max_exact))``
  clipped to ``N - 1`` (so every ``n >= max_distance`` shares the last bucket).

The log is evaluated in float32 as in the reference (the bucket edges are the reference's).

Alignment is bottom-right, as for every :class:`~attn_jax.core.bias.StructuredBias`: query ``i``
of ``T`` sits at ``i + (S - T)`` among ``S`` keys.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.core.bias import StructuredBias, query_positions
from attn_jax.positional.alibi import check_index

__all__ = ["relative_position_bucket", "T5RelativeBias"]


def _check_config(bidirectional, num_buckets, max_distance) -> None:
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional: expected a bool, got {type(bidirectional).__name__}")
    for name, value in (("num_buckets", num_buckets), ("max_distance", max_distance)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    min_buckets = 4 if bidirectional else 2
    if num_buckets < min_buckets:
        raise ValueError(
            f"num_buckets: expected >= {min_buckets} (bidirectional={bidirectional}), got {num_buckets}"
        )
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_distance <= max_exact:
        raise ValueError(
            f"max_distance: expected > max_exact = {max_exact} for num_buckets={num_buckets}, "
            f"got {max_distance}"
        )


def relative_position_bucket(
    relative_position: Int[Array, "..."],
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Int[Array, "..."]:
    """T5 bucket (int32, same shape) of ``relative_position = key_pos - query_pos``."""
    _check_config(bidirectional, num_buckets, max_distance)
    if not hasattr(relative_position, "dtype"):
        relative_position = np.asarray(relative_position)
    if not jnp.issubdtype(relative_position.dtype, jnp.integer):
        raise TypeError(f"relative_position: expected an integer dtype, got {relative_position.dtype}")
    rel = jnp.asarray(relative_position).astype(jnp.int32)
    n_buckets = num_buckets
    if bidirectional:
        n_buckets //= 2
        offset = (rel > 0).astype(jnp.int32) * n_buckets
        n = jnp.abs(rel)
    else:
        offset = jnp.zeros_like(rel)
        n = jnp.maximum(-rel, 0)
    max_exact = n_buckets // 2
    # Clamp before the log so the unused branch of `where` stays finite (log(0) = -inf).
    n_large = jnp.maximum(n, max_exact).astype(jnp.float32)
    log_ratio = jnp.log(n_large / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (n_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, n_buckets - 1)
    return offset + jnp.where(n < max_exact, n, large)


@jax.tree_util.register_pytree_node_class
class T5RelativeBias(StructuredBias):
    """T5 relative bias as a :class:`~attn_jax.core.bias.StructuredBias` (pytree; ``table`` is its leaf).

    Args:
      table: learned ``[num_buckets, H]`` bias values (Hugging Face's ``relative_attention_bias``
        embedding weight has this layout).
      bidirectional: encoder-style (True) or causal decoder-style (False) bucketing.
      num_buckets: defaults to ``table.shape[0]``; if given it must match.
      max_distance: distance from which all offsets share the last bucket.
    """

    def __init__(
        self,
        table: Float[Array, "num_buckets H"],
        *,
        bidirectional: bool = True,
        num_buckets: int | None = None,
        max_distance: int = 128,
    ):
        if not hasattr(table, "shape"):
            table = np.asarray(table, dtype=np.float32)
        if table.ndim != 2:
            raise ValueError(f"table: expected shape [num_buckets, H], got {tuple(table.shape)}")
        if not jnp.issubdtype(table.dtype, jnp.floating):
            raise TypeError(f"table: expected a floating dtype, got {table.dtype}")
        if num_buckets is None:
            num_buckets = int(table.shape[0])
        elif num_buckets != table.shape[0]:
            raise ValueError(
                f"num_buckets: expected table.shape[0] = {table.shape[0]}, got {num_buckets}"
            )
        _check_config(bidirectional, num_buckets, max_distance)
        self.table = jnp.asarray(table)
        self.bidirectional = bidirectional
        self.num_buckets = int(num_buckets)
        self.max_distance = int(max_distance)
        self.num_heads = int(table.shape[1])

    def buckets(
        self, q_idx: Int[Array, " tq"], k_idx: Int[Array, " tk"], T: int, S: int
    ) -> Int[Array, "tq tk"]:
        """Bucket index of every (query, key) pair of the tile."""
        q_idx = check_index(q_idx, "q_idx")
        k_idx = check_index(k_idx, "k_idx")
        rel = k_idx[None, :] - query_positions(q_idx, T, S)[:, None]
        return relative_position_bucket(
            rel,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )

    def tile(
        self, q_idx: Int[Array, " tq"], k_idx: Int[Array, " tk"], T: int, S: int
    ) -> Float[Array, "1 H tq tk"]:
        values = jnp.take(self.table.astype(jnp.float32), self.buckets(q_idx, k_idx, T, S), axis=0)
        return jnp.transpose(values, (2, 0, 1))[None]  # [tq, tk, H] -> [1, H, tq, tk]

    def parameters(self):
        return (self.table,)

    def tree_flatten(self):
        aux = (self.bidirectional, self.num_buckets, self.max_distance, self.num_heads)
        return (self.table,), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.table, = children
        obj.bidirectional, obj.num_buckets, obj.max_distance, obj.num_heads = aux
        return obj

    def __repr__(self):
        return (
            f"T5RelativeBias(num_buckets={self.num_buckets}, num_heads={self.num_heads}, "
            f"bidirectional={self.bidirectional}, max_distance={self.max_distance})"
        )



# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="t5", family="positional", title="T5 relative bias (per tile, learned)",
    papers=(Paper("Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer", 2019,
                  "1910.10683", "Raffel et al."),),
    summary="bias_h(i, j) = w[bucket(j - i), h], log-spaced buckets beyond max_exact",
    op=T5RelativeBias, directions=("causal", "bidirectional"), notes="a StructuredBias: an attention feature (bias=)"))
