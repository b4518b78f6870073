"""Persistent memory: learned key/value slots every query attends to, next to the sequence.

"Augmenting Self-attention with Persistent Memory", Sukhbaatar, Grave, Lample, Jégou, Joulin, 2019,
arXiv:1907.01470 (§4).  Each head gets ``N`` learned vectors ``M_k, M_v`` that are concatenated to
the keys and values of the context; they are not tied to a position and are visible from every
query (the mask applies to the sequence keys only):

    K' = [K ; M_k],  V' = [V ; M_v]
    o_i = sum_{j in visible(i) ∪ memory} softmax_j(scale * q_i . k'_j) v'_j

Here the memory is per key/value head (``memory_k [N, K, Dk]``, ``memory_v [N, K, Dv]``; a GQA
group shares its slots), or per batch row with a leading ``B`` axis.  The paper's all-attention
layer also drops the feed-forward sublayer; that is a model choice, not part of this op.  Because
the memory is always visible, a query whose sequence keys are all masked still reads the memory.

Forms.  Softmax over a union of key sets is exactly the log-sum-exp merge of the softmaxes over
each set, so the op is two :func:`attn_jax.attention` calls — the sequence with its mask, the
memory with none — merged by :func:`attn_jax.merge_attention`: every backend, mask, bias and GQA
layout serves it, and nothing is materialised beyond what those calls do.  Learned sinks, when
given, are one more part with ``lse = sink`` and zero output.  The reference concatenates the
memory to the keys and values and extends the mask.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array

from attn_jax.core import masks as M
from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike, Float
from attn_jax.core.declaration import Declaration, Paper, declare
from attn_jax.softmax.api import attention, merge_attention
from attn_jax.softmax.reference import attention_reference
from attn_jax.variants.dense_scores import check_inputs

__all__ = ["persistent_memory_attention", "persistent_memory_attention_reference"]


def _memory(memory_k, memory_v, dims):
    out = []
    for name, m, D in (("memory_k", memory_k, dims.Dk), ("memory_v", memory_v, dims.Dv)):
        m = jnp.asarray(m)
        V.check_float_array(name, m)
        if m.ndim == 3:
            m = m[None]
        if m.ndim != 4 or m.shape[0] not in (1, dims.B) or m.shape[2:] != (dims.K, D):
            raise ValueError(f"{name}: expected [N, K={dims.K}, {D}] or [B={dims.B}, N, K, {D}], got "
                             f"{tuple(jnp.shape(m))}")
        out.append(jnp.broadcast_to(m, (dims.B,) + m.shape[1:]))
    if out[0].shape[1] != out[1].shape[1]:
        raise ValueError(f"memory_v: expected N={out[0].shape[1]} slots as memory_k, got {out[1].shape[1]}")
    return out


def persistent_memory_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                                v: Float[ArrayLike, "B S K Dv"], memory_k, memory_v, *, mask=None, bias=None,
                                scale: float | None = None, softcap: float | None = None,
                                sinks: Float[ArrayLike, " H"] | None = None, impl="auto") -> Float[Array, "B T H Dv"]:
    """Attention over the sequence plus ``N`` always-visible memory slots (module docstring).

    Args:
      q, k, v: ``[B, T, H, Dk]``, ``[B, S, K, Dk]``, ``[B, S, K, Dv]`` (``H % K == 0``).
      memory_k, memory_v: ``[N, K, Dk]`` and ``[N, K, Dv]`` (or with a leading ``B`` axis).
      mask, bias: as :func:`attn_jax.attention`, for the sequence keys only.
      scale, softcap, sinks, impl: as :func:`attn_jax.attention` (scale and softcap apply to the
        memory logits too).

    Returns:
      ``o [B, T, H, Dv]`` in ``q``'s dtype.
    """
    dims, mask = check_inputs(q, k, v, mask)
    mk, mv = _memory(memory_k, memory_v, dims)
    kw = dict(scale=scale, softcap=softcap, return_lse=True, impl=impl)
    parts = [attention(q, k, v, mask=mask, bias=bias, **kw),
             attention(q, mk.astype(q.dtype), mv.astype(q.dtype), **kw)]
    if sinks is not None:
        sinks = jnp.asarray(sinks, jnp.float32)
        parts.append((jnp.zeros_like(parts[0][0]), jnp.broadcast_to(sinks, parts[0][1].shape)))
    return merge_attention(parts)


def persistent_memory_attention_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                                          v: Float[ArrayLike, "B S K Dv"], memory_k, memory_v, *, mask=None,
                                          scale: float | None = None, softcap: float | None = None,
                                          sinks: Float[ArrayLike, " H"] | None = None) -> Float[Array, "B T H Dv"]:
    """Concatenate the memory to the keys and values, extend the mask with always-visible columns."""
    dims, mask = check_inputs(q, k, v, mask)
    mk, mv = _memory(memory_k, memory_v, dims)
    N = mk.shape[1]
    kk = jnp.concatenate([k, mk.astype(k.dtype)], axis=1)
    vv = jnp.concatenate([v, mv.astype(v.dtype)], axis=1)
    seq = jnp.ones((1, 1, dims.T, dims.S), bool) if mask is None else mask.materialize(dims.T, dims.S)
    seq = jnp.broadcast_to(seq, jnp.broadcast_shapes(seq.shape, (1, 1, dims.T, dims.S)))
    full = jnp.concatenate([seq, jnp.ones(seq.shape[:3] + (N,), bool)], axis=3)
    return attention_reference(q, kk, vv, mask=M.dense(full), scale=scale, softcap=softcap,
                               sinks=None if sinks is None else jnp.asarray(sinks))


DECLARATION = declare(Declaration(
    name="persistent_memory", family="variants", title="Persistent memory key/values (learned always-visible slots)",
    papers=(Paper("Augmenting Self-attention with Persistent Memory", 2019, "1907.01470", "Sukhbaatar et al."),),
    summary="K' = [K; M_k], V' = [V; M_v], memory visible from every query",
    op=persistent_memory_attention, forms=("auto",), directions=("causal", "bidirectional"),
    layer="attn_jax.nn.variant_attention:PersistentMemoryAttention",
    notes="two aj.attention calls (sequence with its mask, memory without) merged by LSE; tiled, any backend"))
