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

Packed documents: ``segment_ids: int [B, T]`` (``S == T``; 0 = padding, documents as in
:mod:`attn_jax.linear.common`: a document starts where the id of a real token differs from the
previous real token's).  Each document is its own agent-attention problem: it pools its own
``num_agents`` agents from its own queries (adaptive average pooling over the document's real
tokens in order, the bins of :func:`pool_agents` with ``L`` = document length), those agents
aggregate only that document's keys, and each query reads only its own document's agents;
padding outputs zero.  Given ``agents`` are shared by every document (each document aggregates
its own keys through them).  The documents of a row occupy static agent slots, so
``max_segments`` (documents per row, static) is required: the agent set is
``max_segments * num_agents`` tokens per row, computed by two :func:`attn_jax.attention` calls
with segment masks.  **A row with more than ``max_segments`` documents outputs NaN** (every
token of that row) rather than a silently wrong value.  ``lengths`` is the special case
``segment_ids = (t < lengths)``, ``max_segments = 1``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attn_jax.core import masks
from attn_jax.core.validation import check_float_array, check_qkv, shape_str
from attn_jax.linear.common import check_segment_ids, expand_kv_heads, segment_layout, segmented_cumsum
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


def _check_segments(segment_ids, max_segments, lengths, dims):
    if segment_ids is None:
        if max_segments is not None:
            raise ValueError("max_segments: only meaningful with segment_ids")
        return None
    if lengths is not None:
        raise ValueError("segment_ids: give either lengths or segment_ids, not both")
    check_segment_ids(segment_ids, dims.B, dims.T)
    if dims.S != dims.T:
        raise ValueError(f"segment_ids: packed documents need S == T, got T={dims.T}, S={dims.S}")
    if max_segments is None:
        raise ValueError("max_segments: required with segment_ids (the static number of agent slots per row: "
                         "each document gets its own num_agents agents; rows with more documents output NaN)")
    if isinstance(max_segments, bool) or not isinstance(max_segments, int) or max_segments < 1:
        raise ValueError(f"max_segments: expected a positive int, got {max_segments!r}")
    return segment_layout(segment_ids, dims.B, dims.T)


def _prepare(q, k, v, agents, num_agents, scale, lengths, causal, segment_ids=None, max_segments=None):
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    if causal:
        raise ValueError("causal: Agent Attention is non-causal (pooled agents summarise the whole sequence)")
    dims = check_qkv(q, k, v)
    lengths = _check_lengths(lengths, dims.B)
    if lengths is not None and dims.S != dims.T:
        raise ValueError(f"lengths: key padding by length needs S == T, got T={dims.T}, S={dims.S}")
    lay = _check_segments(segment_ids, max_segments, lengths, dims)
    if lay is not None:
        if agents is None and num_agents is None:
            raise ValueError("agents: give the agent tokens [B, n, H, Dk] or num_agents to pool them from q")
        A = None if agents is None else _agents(q, agents, None, None)
        if agents is not None and num_agents is not None:
            raise ValueError("num_agents: give either agents or num_agents, not both")
        if agents is None and (isinstance(num_agents, bool) or not isinstance(num_agents, int) or num_agents < 1):
            raise ValueError(f"num_agents: expected a positive int, got {num_agents!r}")
        return dims, A, _scale(scale, dims.Dk), lay
    return dims, _agents(q, agents, num_agents, lengths), _scale(scale, dims.Dk), lengths


def _pool_documents(q, lay, num_agents: int, max_segments: int):
    """Per-document adaptive average pooling: ``[B, max_segments * n, H, D]`` (slot ``d * n + a``)."""
    n, Dm = num_agents, max_segments
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    valid = lay.valid
    rank = segmented_cumsum(valid.astype(jnp.int32), lay) - 1                    # position in the document
    onehot = (lay.doc[:, :, None] == jnp.arange(Dm)[None, None, :]) & valid[:, :, None]   # [B, T, Dm]
    L = onehot.sum(1).astype(jnp.int32)                                           # [B, Dm] document lengths
    L_tok = jnp.take_along_axis(L, jnp.minimum(lay.doc, Dm - 1), axis=1)          # [B, T] own length
    a = jnp.arange(n, dtype=jnp.int32)[None, None, :]
    start = (a * L_tok[..., None]) // n
    end = -((-(a + 1) * L_tok[..., None]) // n)
    member = (rank[..., None] >= start) & (rank[..., None] < end)                 # [B, T, n]
    w = (onehot[..., None] & member[:, :, None, :]).astype(dt)                    # [B, T, Dm, n]
    w = w / jnp.maximum(w.sum(1, keepdims=True), 1.0)
    qz = jnp.where(valid[:, :, None, None], q.astype(dt), 0.0)                     # NaN padding must not leak
    A = jnp.einsum("btdn,bthe->bdnhe", w, qz)
    return A.reshape(q.shape[0], Dm * n, *q.shape[2:])


def _agent_segments(q, k, v, A, num_agents, scale, lay, max_segments, impl):
    B, T, H, _ = q.shape
    Dm = max_segments
    if A is None:
        A = _pool_documents(q, lay, num_agents, Dm)
        n = num_agents
    else:
        n = A.shape[1]
        A = jnp.tile(A, (1, Dm, 1, 1))                                           # the same agents per document
    A = A.astype(q.dtype)
    valid = lay.valid
    tok_ids = jnp.where(valid, lay.doc + 1, 0)
    agent_ids = jnp.broadcast_to(jnp.repeat(jnp.arange(1, Dm + 1, dtype=jnp.int32), n), (B, Dm * n))
    m = valid[:, :, None, None]
    k, v = jnp.where(m, k, 0).astype(k.dtype), jnp.where(m, v, 0).astype(v.dtype)   # NaN padding must not leak
    v_agents = attention(A, k, v, mask=masks.segments(agent_ids, tok_ids), scale=scale, impl=impl)
    o = attention(jnp.where(m, q, 0).astype(q.dtype), A, v_agents, mask=masks.segments(tok_ids, agent_ids),
                  scale=scale, impl=impl)
    o = jnp.where(m, o, 0)
    overflow = lay.doc[:, -1] >= Dm                                               # more documents than slots
    return jnp.where(overflow[:, None, None, None], jnp.nan, o).astype(q.dtype)


def agent_attention(q: Float[Array, "B T H Dk"], k: Float[Array, "B S K Dk"], v: Float[Array, "B S K Dv"], *,
                    agents: Float[Array, "B n H Dk"] | None = None, num_agents: int | None = None,
                    scale: float | None = None, lengths: Int[Array, "B"] | None = None,
                    segment_ids: Int[Array, "B T"] | None = None, max_segments: int | None = None,
                    causal: bool = False, impl="auto"):
    """Agent attention (arXiv:2312.08874): two :func:`attn_jax.attention` calls.

    ``impl`` is passed to both softmax-attention calls.  Output in the dtype of ``q``.  Packed
    documents: ``segment_ids`` with the static ``max_segments`` (see the module docstring; rows
    with more documents than ``max_segments`` output NaN).
    """
    dims, A, scale, lengths = _prepare(q, k, v, agents, num_agents, scale, lengths, causal, segment_ids,
                                       max_segments)
    if segment_ids is not None:
        return _agent_segments(q, k, v, A, num_agents, scale, lengths, max_segments, impl)
    A = A.astype(q.dtype)
    mask = None if lengths is None else masks.key_padding(lengths)
    v_agents = attention(A, k, v, mask=mask, scale=scale, impl=impl)             # [B, n, H, Dv]
    o = attention(q, A, v_agents, scale=scale, impl=impl)
    if lengths is not None:
        o = jnp.where((jnp.arange(dims.T)[None, :] < lengths[:, None])[:, :, None, None], o, 0).astype(q.dtype)
    return o


def _reference_segments(q, k, v, A_given, num_agents, scale, lay, max_segments):
    """A Python loop over document slots ``d < max_segments``, each a masked dense agent attention."""
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    B, T, H, _ = q.shape
    kk, vv = expand_kv_heads(k.astype(dt), H), expand_kv_heads(v.astype(dt), H)
    qq = q.astype(dt)
    o = jnp.zeros((B, T, H, v.shape[-1]), dt)
    for d in range(max_segments):
        mine = lay.valid & (lay.doc == d)                                         # [B, T] tokens of document d
        z = lambda x: jnp.where(mine[:, :, None, None], x, 0.0)
        if A_given is None:
            L = mine.sum(1)                                                       # [B]
            r = jnp.cumsum(mine, axis=1) - 1                                      # rank among the document's tokens
            bins = []
            for a in range(num_agents):
                lo, hi = (a * L) // num_agents, -((-(a + 1) * L) // num_agents)
                sel = mine & (r >= lo[:, None]) & (r < hi[:, None])
                cnt = jnp.maximum(sel.sum(1), 1).astype(dt)
                bins.append(jnp.einsum("bt,bthd->bhd", sel.astype(dt), z(qq)) / cnt[:, None, None])
            A = jnp.stack(bins, axis=1)                                           # [B, n, H, D]
        else:
            A = A_given
        A = A.astype(q.dtype).astype(dt)
        s1 = jnp.einsum("bnhd,bshd->bhns", A, z(kk)) * scale
        present = mine.any(1)[:, None, None, None]                               # absent document: no agents
        p1 = jax.nn.softmax(jnp.where(present, jnp.where(mine[:, None, None, :], s1, -jnp.inf), 0.0), axis=-1)
        p1 = jnp.where(present, p1, 0.0)
        v_agents = jnp.einsum("bhns,bshv->bnhv", p1, z(vv))
        p2 = jax.nn.softmax(jnp.einsum("bthd,bnhd->bhtn", z(qq), A) * scale, axis=-1)
        o = o + z(jnp.einsum("bhtn,bnhv->bthv", p2, v_agents))
    too_many = lay.doc[:, -1] >= max_segments
    return jnp.where(too_many[:, None, None, None], jnp.nan, o).astype(q.dtype)


def agent_attention_reference(q, k, v, *, agents=None, num_agents=None, scale=None, lengths=None,
                              segment_ids=None, max_segments=None, causal: bool = False):
    """Dense softmaxes written directly (float32, float64 stays float64)."""
    dims, A, scale, lengths = _prepare(q, k, v, agents, num_agents, scale, lengths, causal, segment_ids,
                                       max_segments)
    if segment_ids is not None:
        return _reference_segments(q, k, v, A, num_agents, scale, lengths, max_segments)
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


# ----------------------------------------------------------------------------- declaration
from attn_jax.core import recipe  # noqa: E402
from attn_jax.core.declaration import Declaration, Paper, Parity, declare  # noqa: E402
from attn_jax.linear.parity import first  # noqa: E402


def _parity(impl, x, *, causal=False, segment_ids=None, initial_state=None):
    kw = dict(num_agents=5)
    if segment_ids is not None:
        kw.update(segment_ids=segment_ids, max_segments=3)
    if impl == "reference":
        return first(agent_attention_reference(x["q"], x["k"], x["v"], **kw))
    return first(agent_attention(x["q"], x["k"], x["v"], impl=impl, **kw))


DECLARATION = declare(Declaration(
    name="agent", family="linear", title="Agent attention",
    papers=(Paper("Agent Attention: On the Integration of Softmax and Linear Attention", 2024, "2312.08874",
                  "Han et al."),),
    summary="A = pool(q) (n agents), V_A = softmax(A kᵀ/sqrt(Dk)) v, o = softmax(q Aᵀ/sqrt(Dk)) V_A",
    op=agent_attention, forms=("auto",), directions=("bidirectional",),
    parity=Parity(_parity, initial_state=False,
                  notes="packed documents via segment_ids + static max_segments (more documents: NaN row)"),
    layer=recipe.LinearLayer(recipe.AgentRule(),
                             recipe.Projections(qk_activation="identity", v_activation="identity")),
    notes="encoder-only; no agent bias and no DWC(v) term"))
