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

import jax
import jax.numpy as jnp


class StructuredBias:
    """Base class for biases computed from positions (see module docstring)."""

    #: number of heads the bias is defined for, or None if head-independent.
    num_heads: int | None = None

    def tile(self, q_idx, k_idx, T: int, S: int):  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must define tile(q_idx, k_idx, T, S) (the bias of one tile)")

    def materialize(self, T: int, S: int):
        return self.tile(jnp.arange(T, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32), T, S)

    def parameters(self):
        """Arrays the bias depends on (for gradients); default none."""
        return ()


def query_positions(q_idx, T: int, S: int):
    """Absolute positions of queries under bottom-right alignment."""
    return q_idx + (S - T)


@jax.tree_util.register_pytree_node_class
class LowRankBias:
    """An additive bias given by factors, ``bias[b, h, i, j] = Σ_r u[b, i, h, r] · v[b, j, h', r]``
    (``h' = h // (H / Hv)``; ``v`` has ``Hv`` = 1, the key/value heads ``K`` or the query heads ``H``).

    FlashBias (Wu et al., "FlashBias: Fast Computation of Attention with Bias", 2025,
    arXiv:2505.12044): a rank-``r`` bias is folded into the dot products,
    ``scale q·k + u·v = scale [q, u / scale]·[k, v]``, so every backend (the fused kernels
    included) runs it with ``Dk + r`` channels and never reads a ``T x S`` array.
    ``u``: ``[..., T, H|1, r]`` laid out like ``q``; ``v``: ``[..., S, Hv, r]`` laid out like ``k``.
    The factors are cast to the dtype of ``q`` (bfloat16 factors with large entries lose
    precision: keep them O(1)-scaled).  Gradients flow to ``u`` and ``v``.
    """

    def __init__(self, u, v):
        self.u, self.v = u, v

    def tree_flatten(self):
        return (self.u, self.v), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @property
    def rank(self) -> int:
        return int(self.u.shape[-1])

    def fold(self, q, k, v, scale: float | None, softcap):
        """``(q', k', v', scale)`` such that attention on them equals attention on ``q, k, v`` with
        this bias; ``k``/``v`` are repeated to ``H`` heads when ``self.v`` has per-query-head factors."""
        u, fv = jnp.asarray(self.u), jnp.asarray(self.v)
        if softcap is not None:
            raise ValueError("bias: a LowRankBias cannot be combined with softcap (the cap applies to the logits "
                             "before the bias; folded into q and k, the bias would be capped too)")
        if u.ndim != q.ndim or fv.ndim != k.ndim or u.shape[-1] != fv.shape[-1]:
            raise ValueError(f"bias: LowRankBias factors must be laid out like q and k with one rank axis: "
                             f"u {tuple(u.shape)} for q {tuple(q.shape)}, v {tuple(fv.shape)} for k {tuple(k.shape)}")
        T, H, S, K = q.shape[-3], q.shape[-2], k.shape[-3], k.shape[-2]
        if u.shape[-3] != T or u.shape[-2] not in (1, H):
            raise ValueError(f"bias: LowRankBias u must be [..., T={T}, H={H} or 1, r], got {tuple(u.shape)}")
        if fv.shape[-3] != S or fv.shape[-2] not in (1, K, H):
            raise ValueError(f"bias: LowRankBias v must be [..., S={S}, 1, K={K} or H={H}, r], got {tuple(fv.shape)}")
        if fv.shape[-2] == H and K != H:      # per-query-head key factors: keys and values per query head
            k, v = (jnp.repeat(x, H // K, axis=-2) for x in (k, v))
            K = H
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        lead = jnp.broadcast_shapes(q.shape[:-3], u.shape[:-3])
        u = jnp.broadcast_to(u / scale, (*lead, T, H, u.shape[-1])).astype(q.dtype)
        fv = jnp.broadcast_to(fv, (*jnp.broadcast_shapes(k.shape[:-3], fv.shape[:-3]), S, K, fv.shape[-1]))
        return (jnp.concatenate([q, u], axis=-1), jnp.concatenate([k, fv.astype(k.dtype)], axis=-1), v, scale)

    def materialize(self, num_heads: int):
        """The dense bias ``[B|1, H, T, S]`` (float32, or float64 factors' float64; references and tests)."""
        dt = jnp.promote_types(jnp.result_type(self.u, self.v), jnp.float32)
        u, fv = jnp.asarray(self.u, dt), jnp.asarray(self.v, dt)
        u = jnp.broadcast_to(u, (*u.shape[:-2], num_heads, u.shape[-1]))
        fv = jnp.repeat(fv, num_heads // fv.shape[-2], axis=-2)
        return jnp.einsum("...thr,...shr->...hts", u, fv)

    def __repr__(self):
        return f"LowRankBias(u={tuple(self.u.shape)}, v={tuple(self.v.shape)})"


class QueryDependentBias(StructuredBias):
    """A bias that reads the queries as well as the positions, evaluated per tile.

    Relative embeddings (Shaw et al. 2018; Music Transformer) add ``q_i · E_{r(i, j)}`` to the
    logits: a function of the query *vector* and of the positions, so it cannot be a position-only
    :class:`StructuredBias` tile, yet it needs no ``T x S`` array either.  Fast paths call

    * ``tile_q(q, q_idx, k_idx, T, S)`` with ``q: [B, K, G, tq, Dk]`` the **scaled** queries
      ``scale * q`` of the tile (grouped heads ``h = k * G + g``, compute dtype), ``q_idx``/``k_idx``
      contiguous ascending int32 runs (absolute indices, bottom-right alignment as for every
      structured bias); it returns the bias ``[B, K, G, tq, tk]`` in ``q``'s dtype;
    * ``materialize_q(q, T, S)`` (references and tests): the same for the whole ``[B, K, G, T, S]``;
      by default ``tile_q`` over all indices, a subclass may give a simpler independent form.

    Gradients: implementations differentiate ``tile_q`` with respect to the bias pytree *and*
    ``q`` and add the ``q`` part to ``dq``.  ``tile`` (position only) is undefined and raises.
    Backends that evaluate only position tiles (the Pallas kernels, cuDNN) refuse it.
    """

    query_dependent = True

    def tile(self, q_idx, k_idx, T: int, S: int):
        raise ValueError(f"bias: {type(self).__name__} depends on the queries; it has no position-only tile "
                         "(backends call tile_q(q, q_idx, k_idx, T, S))")

    def tile_q(self, q, q_idx, k_idx, T: int, S: int):  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must define tile_q(q, q_idx, k_idx, T, S) "
                                  "(the bias of one tile from its scaled queries)")

    def materialize_q(self, q, T: int, S: int):
        return self.tile_q(q, jnp.arange(T, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32), T, S)


def is_query_dependent(bias) -> bool:
    """Whether ``bias`` is a :class:`QueryDependentBias` (or wraps one: ``query_dependent`` is True)."""
    return bool(getattr(bias, "query_dependent", False))
