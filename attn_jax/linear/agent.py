"""Agent Attention: softmax attention through a small set of agent tokens.

Han, Ye, Han, Pan, Wan, Song & Huang, "Agent Attention: On the Integration of Softmax and
Linear Attention", 2024 (ECCV), arXiv:2312.08874: with ``n`` agent tokens ``A``,

    V_A = softmax(A Kᵀ · scale) V              (agent aggregation: agents query the keys)
    O   = softmax(Q Aᵀ · scale) V_A            (agent broadcast: queries read the agents)

i.e. the generalised linear attention ``O = φ_q(Q) φ_k(K)ᵀ V`` with ``φ_q(Q) = softmax(Q Aᵀ)``
and ``φ_k(K) = softmax(A Kᵀ)ᵀ``; cost ``O(n T)``.  ``scale`` defaults to ``Dk^{-1/2}`` (the
official code's ``head_dim ** -0.5``).  Agents are per head, ``[B, n, H, Dk]``: given, or pooled
from ``Q`` by adaptive average pooling over the sequence (the paper pools the query map; for a
1-D sequence agent ``a`` averages the queries at positions ``[⌊aL/n⌋, ⌈(a+1)L/n⌉)``, ``L`` the
row's valid length — PyTorch's ``adaptive_avg_pool1d`` bins).

Omitted (named deviations): the paper's agent bias (position biases added to both softmax
logits) and the depthwise-convolution term ``DWC(V)`` added to ``O`` — both are layer-level
parameters around this op.  Non-causal only (the agents summarise the whole sequence).
Key padding: ``lengths: int [B]`` — keys ``j >= lengths[b]`` are excluded from the aggregation
softmax, queries past the length output zero, and pooled agents average valid queries only.
(Packed multi-document rows are not meaningful here: agents are shared by the whole row.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attn_jax.core import masks
from attn_jax.core.validation import check_float_array, check_qkv, shape_str
from attn_jax.linear.common import expand_kv_heads
from attn_jax.softmax.api import attention

__all__ = ["agent_attention", "agent_attention_reference", "pool_agents"]


def _check_lengths(lengths, B):
    if lengths is None:
        return None
    if not jnp.issubdtype(getattr(lengths, "dtype", jnp.float32), jnp.integer):
        raise TypeError(f"lengths: expected an integer array [B], got {getattr(lengths, 'dtype', type(lengths))}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths: expected shape [B] = [{B}], got {shape_str(lengths)}")
    return lengths.astype(jnp.int32)


def pool_agents(q: Float[Array, "B T H D"], num_agents: int, lengths: Int[Array, "B"] | None = None):
    """Adaptive average pooling of ``q`` over the sequence into ``num_agents`` tokens ``[B, n, H, D]``."""
    check_float_array("q", q)
    if isinstance(num_agents, bool) or not isinstance(num_agents, int) or num_agents < 1:
        raise ValueError(f"num_agents: expected a positive int, got {num_agents!r}")
    B, T = q.shape[:2]
    lengths = _check_lengths(lengths, B)
    L = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.clip(lengths, 0, T)
    a = jnp.arange(num_agents, dtype=jnp.int32)[None, :]
    start = (a * L[:, None]) // num_agents                                   # floor(a L / n)
    end = -((-(a + 1) * L[:, None]) // num_agents)                           # ceil((a+1) L / n)
    t = jnp.arange(T, dtype=jnp.int32)[None, None, :]
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    w = ((t >= start[..., None]) & (t < end[..., None])).astype(dt)          # [B, n, T]
    w = w / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
    qz = jnp.where((t[0, 0] < L[:, None])[:, :, None, None], q.astype(dt), 0.0)   # NaN padding must not leak
    return jnp.einsum("bnt,bthd->bnhd", w, qz)


def _agents(q, agents, num_agents, lengths):
    if agents is None:
        if num_agents is None:
            raise ValueError("agents: give the agent tokens [B, n, H, Dk] or num_agents to pool them from q")
        return pool_agents(q, num_agents, lengths)
    if num_agents is not None:
        raise ValueError("num_agents: give either agents or num_agents, not both")
    check_float_array("agents", agents)
    B, _, H, D = q.shape
    if agents.ndim != 4 or agents.shape[0] != B or agents.shape[2] != H or agents.shape[3] != D:
        raise ValueError(f"agents: expected shape [B, n, H, Dk] = [{B}, n, {H}, {D}], got {shape_str(agents)}")
    return agents


def _scale(scale, D):
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale: expected a positive Python float or None, got {scale!r}")
    return float(scale)


def _prepare(q, k, v, agents, num_agents, scale, lengths, causal):
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    if causal:
        raise ValueError("causal: Agent Attention is non-causal (pooled agents summarise the whole sequence)")
    dims = check_qkv(q, k, v)
    lengths = _check_lengths(lengths, dims.B)
    if lengths is not None and dims.S != dims.T:
        raise ValueError(f"lengths: key padding by length needs S == T, got T={dims.T}, S={dims.S}")
    return dims, _agents(q, agents, num_agents, lengths), _scale(scale, dims.Dk), lengths


def agent_attention(q: Float[Array, "B T H Dk"], k: Float[Array, "B S K Dk"], v: Float[Array, "B S K Dv"], *,
                    agents: Float[Array, "B n H Dk"] | None = None, num_agents: int | None = None,
                    scale: float | None = None, lengths: Int[Array, "B"] | None = None, causal: bool = False,
                    impl="auto"):
    """Agent attention (arXiv:2312.08874): two :func:`attn_jax.attention` calls.

    ``impl`` is passed to both softmax-attention calls.  Output in the dtype of ``q``.
    """
    dims, A, scale, lengths = _prepare(q, k, v, agents, num_agents, scale, lengths, causal)
    A = A.astype(q.dtype)
    mask = None if lengths is None else masks.key_padding(lengths)
    v_agents = attention(A, k, v, mask=mask, scale=scale, impl=impl)             # [B, n, H, Dv]
    o = attention(q, A, v_agents, scale=scale, impl=impl)
    if lengths is not None:
        o = jnp.where((jnp.arange(dims.T)[None, :] < lengths[:, None])[:, :, None, None], o, 0).astype(q.dtype)
    return o


def agent_attention_reference(q, k, v, *, agents=None, num_agents=None, scale=None, lengths=None,
                              causal: bool = False):
    """Dense softmaxes written directly (float32, float64 stays float64)."""
    dims, A, scale, lengths = _prepare(q, k, v, agents, num_agents, scale, lengths, causal)
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    H = dims.H
    kk, vv = expand_kv_heads(k.astype(dt), H), expand_kv_heads(v.astype(dt), H)
    A = A.astype(q.dtype).astype(dt)
    key_ok = jnp.ones((dims.B, dims.S), bool) if lengths is None else jnp.arange(dims.S)[None] < lengths[:, None]
    vv = jnp.where(key_ok[:, :, None, None], vv, 0.0)
    s1 = jnp.einsum("bnhd,bshd->bhns", A, kk) * scale
    p1 = jax.nn.softmax(jnp.where(key_ok[:, None, None, :], s1, -jnp.inf), axis=-1)
    v_agents = jnp.einsum("bhns,bshv->bnhv", p1, vv)
    p2 = jax.nn.softmax(jnp.einsum("bthd,bnhd->bhtn", q.astype(dt), A) * scale, axis=-1)
    o = jnp.einsum("bhtn,bnhv->bthv", p2, v_agents)
    if lengths is not None:
        o = jnp.where((jnp.arange(dims.T)[None, :] < lengths[:, None])[:, :, None, None], o, 0.0)
    return o.astype(q.dtype)
