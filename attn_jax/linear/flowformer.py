"""Flow-Attention (Flowformer): linear attention with flow conservation.

Wu, Wu, Xu, Wang & Long, "Flowformer: Linearizing Transformers with Conservation Flows", 2022
(ICML), arXiv:2202.06258, §3.  With ``φ = sigmoid``, ``φq_i = φ(q_i)``,
``φk_j = φ(k_j)``, ``n = T`` sinks (queries) and ``m = S`` sources (keys):

    incoming flow of sink i      I_i = φq_i · Σ_j φk_j
    outgoing flow of source j    O_j = φk_j · Σ_i φq_i
    conserved incoming flow      Î_i = φq_i · Σ_j φk_j / O_j
    conserved outgoing flow      Ô_j = φk_j · Σ_i φq_i / I_i
    competition                  V̂_j = m · softmax_j(Ô)_j · v_j
    allocation                   o_i = sigmoid(Î_i · n/m) · (φq_i / I_i) · Σ_j φk_jᵀ V̂_j

(the ``m`` and ``n/m`` factors follow the authors' code, which keeps the competed values at
unit scale).  Causal form (the authors' ``Flow_Attention_Causal``): every sum runs over
``j <= i``, and, since a prefix holds ``t`` tokens (``t_i`` = tokens of the document up to and
including ``i``), the flows are rescaled by the token count ("approximate normal conservation"):

    I_i = φq_i·Σ_{j≤i} φk_j,  O_j = φk_j·Σ_{i≤j} φq_i
    Î_i = φq_i·Σ_{j≤i} φk_j (t_j/O_j) / t_i,   Ô_j = φk_j·Σ_{i≤j} φq_i (t_i/I_i) / t_j
    competition  c_j = t_j · exp(Ô_j) / Σ_{l≤j} exp(Ô_l)
    o_i = sigmoid(Î_i) · (φq_i / I_i) · Σ_{j≤i} φk_jᵀ (c_j v_j)

The causal form is a recurrence whose state (:class:`FlowState`) is every prefix sum above:
``Σφq``, ``Σφk``, ``Σ φk_j t_j/O_j``, ``Σ φq_i t_i/I_i`` (each ``[B, H, D]``), the running
log-sum-exp of ``Ô`` (``[B, H]``), the value state ``Σ φk_jᵀ (c_j v_j)`` (``[B, H, D, Dv]``) and
the token count ``t`` (``[B, H]``).  ``initial_state`` continues these sums (the count too:
``t_i`` includes the tokens already in the state), ``return_final_state`` returns them, and
:func:`flow_attention_step` is one decode step of the same recurrence (``prefill + steps ==``
one call over the whole sequence).

Packed sequences (:mod:`attn_jax.linear.common`): ``segment_ids: int [B, T]``, 0 = padding.
Padding is transparent (no contribution, zero output, does not advance ``t``); every sum (and
``t``) restarts at a document start; ``initial_state`` belongs to the first document of each
row and the final state is the state after the row's last document.  Non-causal with segments:
each document is its own non-causal flow problem (``n = m`` = document length, so the ``n/m``
factor is 1).  Non-causal without segments allows cross attention (``S != T``).

Deviations from the code, named: (1) the code adds ``eps`` inside every flow
(``(φq + eps)·(Σφk + eps)``); we add ``eps`` to the denominators ``I`` and ``O`` only;
(2) the code clamps ``Ô`` to ``[-1, 1]`` "for stability"; we do not — the softmax (and the causal
``exp/Σexp``, computed with a running log-sum-exp) is shift-invariant and stable without it.
The main sum ``Σ φk_jᵀ V̂_j`` runs on the linear-attention engine
(:func:`attn_jax.linear.gated.gated_linear_attention`; ``impl`` selects its form) except for
non-causal calls without segments (two einsums); the prefix sums are segmented associative
scans.  ``impl="recurrent"`` (causal) instead scans :func:`flow_attention_step` over the
sequence.  GQA: k/v heads are expanded to the query heads (flows are per query head).  Float32
compute (float64 stays float64), output in q's dtype, state in the compute dtype.
"""

from __future__ import annotations

from typing import Any

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from attn_jax.core.validation import check_float_array, check_qkv, shape_str
from attn_jax.linear.common import check_segment_ids, expand_kv_heads, segment_layout, segmented_cumlogsumexp, segmented_cumsum
from attn_jax.linear.gated import DEFAULT_CHUNK, gated_linear_attention

__all__ = ["flow_attention", "flow_attention_reference", "flow_attention_step", "FlowState", "init_flow_state"]


class FlowState(NamedTuple):
    """The causal Flow-Attention state (a pytree; every leaf float, compute dtype)."""

    sum_q: Any            # [B, H, D]      Σ φq_i
    sum_k: Any            # [B, H, D]      Σ φk_j
    flow_k: Any           # [B, H, D]      Σ φk_j t_j / O_j
    flow_q: Any           # [B, H, D]      Σ φq_i t_i / I_i
    lse: Any              # [B, H]         log Σ exp(Ô_j)   (-inf when empty)
    kv: Any               # [B, H, D, Dv]  Σ φk_jᵀ (c_j v_j)
    count: Any            # [B, H]         t, tokens of the current document so far


def init_flow_state(B: int, H: int, D: int, Dv: int, dtype=jnp.float32) -> FlowState:
    """The empty state (no tokens seen)."""
    z = jnp.zeros((B, H, D), dtype)
    return FlowState(z, z, z, z, jnp.full((B, H), -jnp.inf, dtype), jnp.zeros((B, H, D, Dv), dtype),
                     jnp.zeros((B, H), dtype))


def _check_state(state, B, H, D, Dv, dt, name="initial_state") -> FlowState:
    if not isinstance(state, FlowState):
        raise TypeError(f"{name}: expected a FlowState (see init_flow_state), got {type(state).__name__}")
    want = {"sum_q": (B, H, D), "sum_k": (B, H, D), "flow_k": (B, H, D), "flow_q": (B, H, D), "lse": (B, H),
            "kv": (B, H, D, Dv), "count": (B, H)}
    for f, shape in want.items():
        x = getattr(state, f)
        check_float_array(f"{name}.{f}", x)
        if x.shape != shape:
            raise ValueError(f"{name}.{f}: expected shape {list(shape)}, got {shape_str(x)}")
    return FlowState(*(x.astype(dt) for x in state))


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps: expected a non-negative Python float, got {eps!r}")
    return float(eps)


def _prepare(q, k, v, causal, eps, segment_ids, initial_state, return_final_state):
    """Validation, features (zeroed at padding so NaN there cannot leak), layout, state."""
    dims = check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    if causal and dims.S != dims.T:
        raise ValueError(f"k: causal flow attention needs S == T = {dims.T}, got S = {dims.S}")
    eps = _check_eps(eps)
    B, T, H = dims.B, dims.T, dims.H
    check_segment_ids(segment_ids, B, T)
    if segment_ids is not None:
        if dims.S != T:
            raise ValueError(f"segment_ids: packed segments need S == T = {T}, got S = {dims.S}")
    if not causal and initial_state is not None:
        raise ValueError("initial_state: only defined for causal=True")
    if not causal and return_final_state:
        raise ValueError("return_final_state: only defined for causal=True")
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    s0 = None if initial_state is None else _check_state(initial_state, B, H, dims.Dk, dims.Dv, dt)
    lay = segment_layout(segment_ids, B, T) if dims.S == T else None
    fq = jax.nn.sigmoid(q.astype(dt))
    fk = jax.nn.sigmoid(expand_kv_heads(k, H).astype(dt))
    vv = expand_kv_heads(v, H).astype(dt)
    if segment_ids is not None:
        m = lay.valid[:, :, None, None]
        feat = lambda x: jnp.where(m, jax.nn.sigmoid(jnp.where(m, x, 0.0)), 0.0)
        fq, fk = feat(q.astype(dt)), feat(expand_kv_heads(k, H).astype(dt))
        vv = jnp.where(m, vv, 0.0)
    return dims, fq, fk, vv, lay, s0, eps, dt


# ----------------------------------------------------------------------------- decode step
def _safe(d):
    return jnp.where(d > 0, d, 1.0)


def _step(fq, fk, v, s: FlowState, eps: float):
    """One token of the recurrence on features ``[B, H, D]`` (``v: [B, H, Dv]``)."""
    t = s.count + 1.0
    sum_q, sum_k = s.sum_q + fq, s.sum_k + fk
    inc = _safe(jnp.sum(fq * sum_k, -1) + eps)                                   # I_t
    out = _safe(jnp.sum(fk * sum_q, -1) + eps)                                   # O_t
    flow_k = s.flow_k + fk * (t / out)[..., None]
    flow_q = s.flow_q + fq * (t / inc)[..., None]
    sink = jnp.sum(fq * flow_k, -1) / t                                          # Î_t
    src = jnp.sum(fk * flow_q, -1) / t                                           # Ô_t
    lse = jnp.logaddexp(s.lse, src)
    comp = t * jnp.exp(src - lse)
    kv = s.kv + fk[..., :, None] * (comp[..., None] * v)[..., None, :]
    o = jax.nn.sigmoid(sink)[..., None] * jnp.einsum("bhd,bhdv->bhv", fq / inc[..., None], kv)
    return o, FlowState(sum_q, sum_k, flow_k, flow_q, lse, kv, t)


def flow_attention_step(q_t: Float[Array, "B H D"], k_t: Float[Array, "B K D"], v_t: Float[Array, "B K Dv"],
                        state: FlowState, *, eps: float = 1e-6):
    """One causal decode step: ``(o_t [B, H, Dv] in q's dtype, new_state)``.

    ``state`` from :func:`init_flow_state` or ``flow_attention(..., return_final_state=True)``;
    k/v heads (``K``) are expanded to the ``H`` query heads.
    """
    check_float_array("q_t", q_t)
    check_float_array("k_t", k_t)
    check_float_array("v_t", v_t)
    if q_t.ndim != 3 or k_t.ndim != 3 or v_t.ndim != 3:
        raise ValueError(f"q_t, k_t, v_t: expected [B, H, D], [B, K, D], [B, K, Dv], got {shape_str(q_t)}, "
                         f"{shape_str(k_t)}, {shape_str(v_t)}")
    B, H, D = q_t.shape
    K = k_t.shape[1]
    if k_t.shape != (B, K, D) or v_t.shape[:2] != (B, K) or H % K:
        raise ValueError(f"k_t, v_t: expected [B, K, D] = [{B}, K, {D}] and [B, K, Dv] with H % K == 0, got "
                         f"{shape_str(k_t)}, {shape_str(v_t)}")
    eps = _check_eps(eps)
    dt = jnp.float64 if q_t.dtype == jnp.float64 else jnp.float32
    s = _check_state(state, B, H, D, v_t.shape[-1], dt, name="state")
    rep = H // K
    fq = jax.nn.sigmoid(q_t.astype(dt))
    fk = jax.nn.sigmoid(jnp.repeat(k_t, rep, axis=1).astype(dt))
    o, s = _step(fq, fk, jnp.repeat(v_t, rep, axis=1).astype(dt), s, eps)
    return o.astype(q_t.dtype), s


# ----------------------------------------------------------------------------- fast forms
def _causal_recurrent(fq, fk, v, lay, s0: FlowState, eps):
    """:func:`_step` scanned over the sequence; resets to the empty state at document starts,
    padding keeps the state."""
    empty = jax.tree.map(jnp.zeros_like, s0)._replace(lse=jnp.full_like(s0.lse, -jnp.inf))

    def pick(c, a, b):
        return jax.tree.map(lambda x, y: jnp.where(c.reshape(c.shape + (1,) * (x.ndim - 1)), x, y), a, b)

    def body(s, xs):
        fq_t, fk_t, v_t, valid_t, reset_t = xs
        s = pick(reset_t, empty, s)
        o_t, s_new = _step(fq_t, fk_t, v_t, s, eps)
        return pick(valid_t, s_new, s), o_t

    tm = lambda x: jnp.moveaxis(x, 1, 0)
    s, o = lax.scan(body, s0, (tm(fq), tm(fk), tm(v), tm(lay.valid), tm(lay.reset)))
    return jnp.moveaxis(o, 0, 1), s


def _causal_scans(fq, fk, v, lay, s0: FlowState, eps, impl, chunk_size, segment_ids, given_state, final):
    """Prefix sums as segmented scans; the value sum on the gated engine."""
    B, T, H = fq.shape[:3]
    valid = lay.valid[:, :, None]                                                 # [B, T, 1]
    first = (lay.doc == 0)[:, :, None]                                            # sees the initial state

    def carry_in(x, x0):                                                          # x: [B, T, H, ...]
        f = first.reshape(first.shape + (1,) * (x.ndim - 3))
        return x + jnp.where(f, x0[:, None], 0.0)

    D = fq.shape[-1]
    # the prefix sums in two batched segmented scans (channels concatenated: fewer, wider scans)
    ones = jnp.broadcast_to(valid[..., None], (B, T, H, 1)).astype(fq.dtype)
    c1 = segmented_cumsum(jnp.concatenate([ones, fq, fk], -1), lay)
    t = carry_in(c1[..., 0], s0.count)                                            # [B, T, H]
    sum_q, sum_k = carry_in(c1[..., 1:D + 1], s0.sum_q), carry_in(c1[..., D + 1:], s0.sum_k)
    t_s = jnp.where(valid, t, 1.0)
    inc = jnp.where(valid, _safe(jnp.sum(fq * sum_k, -1) + eps), 1.0)
    out = jnp.where(valid, _safe(jnp.sum(fk * sum_q, -1) + eps), 1.0)
    c2 = segmented_cumsum(jnp.concatenate([fk * (t_s / out)[..., None], fq * (t_s / inc)[..., None]], -1), lay)
    flow_k, flow_q = carry_in(c2[..., :D], s0.flow_k), carry_in(c2[..., D:], s0.flow_q)
    sink = jnp.sum(fq * flow_k, -1) / t_s
    src = jnp.sum(fk * flow_q, -1) / t_s
    lse = segmented_cumlogsumexp(jnp.where(valid, src, -jnp.inf), lay)
    lse = jnp.where(first, jnp.logaddexp(lse, s0.lse[:, None]), lse)
    comp = jnp.where(valid, t_s * jnp.exp(jnp.where(valid, src - jnp.where(valid, lse, 0.0), 0.0)), 0.0)
    o, kv = gated_linear_attention(fq / inc[..., None], fk, v * comp[..., None], None, scale=1.0, causal=True,
                                   segment_ids=segment_ids, initial_state=s0.kv if given_state else None,
                                   return_final_state=final, impl=impl, chunk_size=chunk_size,
                                   mechanism="flow_attention")
    o = o * jax.nn.sigmoid(sink)[..., None]
    state = None
    if final:
        last = lambda x: x[:, -1]
        state = FlowState(last(sum_q), last(sum_k), last(flow_k), last(flow_q), last(lse), kv, last(t))
    return o, state


def _noncausal_segments(fq, fk, v, lay, eps, impl, chunk_size, segment_ids):
    """Each document its own non-causal flow problem (document totals by segment sums)."""
    B, T, H = fq.shape[:3]
    valid = lay.valid[:, :, None]
    ids = (lay.doc + T * jnp.arange(B, dtype=jnp.int32)[:, None]).reshape(-1)

    def total(x):
        s = jax.ops.segment_sum(x.reshape(B * T, *x.shape[2:]), ids, num_segments=B * T)
        return s[ids].reshape(x.shape)

    n = total(jnp.broadcast_to(valid, (B, T, H)).astype(fq.dtype))              # document length
    inc = jnp.where(valid, _safe(jnp.sum(fq * total(fk), -1) + eps), 1.0)
    out = jnp.where(valid, _safe(jnp.sum(fk * total(fq), -1) + eps), 1.0)
    sink = jnp.sum(fq * total(fk / out[..., None]), -1)
    src = jnp.sum(fk * total(fq / inc[..., None]), -1)
    src_m = jnp.where(valid, src, -jnp.inf)
    mx = jax.ops.segment_max(src_m.reshape(B * T, H), ids, num_segments=B * T)[ids].reshape(B, T, H)
    mx = lax.stop_gradient(jnp.where(jnp.isfinite(mx), mx, 0.0))
    e = jnp.where(valid, jnp.exp(jnp.where(valid, src - mx, 0.0)), 0.0)
    comp = e / jnp.where(valid, total(e), 1.0) * n
    o, _ = gated_linear_attention(fq / inc[..., None], fk, v * comp[..., None], None, scale=1.0, causal=False,
                                  segment_ids=segment_ids, impl=impl, chunk_size=chunk_size,
                                  mechanism="flow_attention")
    return o * jax.nn.sigmoid(sink)[..., None]


def _noncausal_dense_sums(fq, fk, v, eps):
    n, m = fq.shape[1], fk.shape[1]
    sum_k, sum_q = fk.sum(1, keepdims=True), fq.sum(1, keepdims=True)            # [B, 1, H, D]
    inc = _safe(jnp.sum(fq * sum_k, -1) + eps)                                   # I: [B, T, H]
    out = _safe(jnp.sum(fk * sum_q, -1) + eps)                                   # O: [B, S, H]
    cons_sink = jnp.sum(fq * jnp.sum(fk / out[..., None], 1, keepdims=True), -1)
    cons_src = jnp.sum(fk * jnp.sum(fq / inc[..., None], 1, keepdims=True), -1)
    alloc = jax.nn.sigmoid(cons_sink * (n / m))
    comp = jax.nn.softmax(cons_src, axis=1) * m
    kv = jnp.einsum("bshd,bshv->bhdv", fk, v * comp[..., None])
    return jnp.einsum("bthd,bhdv->bthv", fq / inc[..., None], kv) * alloc[..., None]


def flow_attention(q: Float[Array, "B T H D"], k: Float[Array, "B S K D"], v: Float[Array, "B S K Dv"], *,
                   causal: bool = False, eps: float = 1e-6, segment_ids: Int[Array, "B T"] | None = None,
                   initial_state: FlowState | None = None, return_final_state: bool = False, impl="auto",
                   chunk_size: int = DEFAULT_CHUNK):
    """Flow-Attention (arXiv:2202.06258); see the module docstring.  Returns ``(o, state)``.

    ``o`` in q's dtype; ``state`` is the causal :class:`FlowState` after the row's last document
    (``None`` unless ``return_final_state``).  ``impl``: the engine form of the value sum, or
    ``"recurrent"`` (causal) for a scan of :func:`flow_attention_step`.
    """
    dims, fq, fk, v, lay, s0, eps, dt = _prepare(q, k, v, causal, eps, segment_ids, initial_state,
                                                 return_final_state)
    if not causal:
        if impl == "recurrent":
            raise ValueError("impl: 'recurrent' is a causal form")
        if segment_ids is None:
            o = _noncausal_dense_sums(fq, fk, v, eps)
        else:
            o = _noncausal_segments(fq, fk, v, lay, eps, impl, chunk_size, segment_ids)
        return o.astype(q.dtype), None
    given = s0 is not None
    if s0 is None:
        s0 = init_flow_state(dims.B, dims.H, dims.Dk, dims.Dv, dt)
    if impl == "recurrent":
        o, s = _causal_recurrent(fq, fk, v, lay, s0, eps)
    else:
        o, s = _causal_scans(fq, fk, v, lay, s0, eps, impl, chunk_size, segment_ids, given, bool(return_final_state))
    o = jnp.where(lay.valid[:, :, None, None], o, 0.0).astype(q.dtype)
    return o, (s if return_final_state else None)


# ----------------------------------------------------------------------------- reference
def flow_attention_reference(q, k, v, *, causal: bool = False, eps: float = 1e-6, segment_ids=None,
                             initial_state: FlowState | None = None, return_final_state: bool = False):
    """The equations written densely with an explicit ``[T, S]`` visibility matrix ``M`` (same
    document, both tokens real, ``j <= i`` if causal); the initial state is added explicitly to
    every sum of the tokens of each row's first document.  Returns ``(o, state)``."""
    dims, fq, fk, v, lay, s0, eps, dt = _prepare(q, k, v, causal, eps, segment_ids, initial_state,
                                                 return_final_state)
    B, T, S, H = dims.B, dims.T, dims.S, dims.H
    if segment_ids is None:
        valid_q, valid_k = jnp.ones((B, T), bool), jnp.ones((B, S), bool)
        M = jnp.ones((B, T, S), bool)
        Mkk = jnp.ones((B, S, S), bool)                                          # keys of one document
    else:
        valid_q = valid_k = lay.valid
        M = (lay.doc[:, :, None] == lay.doc[:, None, :]) & lay.valid[:, :, None] & lay.valid[:, None, :]
        Mkk = M
    if causal:
        M = M & jnp.tril(jnp.ones((T, S), bool))
    Mf = M.astype(dt)[:, None]                                                   # [B, 1, T, S]
    P = jnp.einsum("bihd,bjhd->bhij", fq, fk) * Mf                               # φq_i·φk_j on visible pairs
    vq, vk = valid_q[:, None].astype(dt), valid_k[:, None].astype(dt)             # [B, 1, T|S]
    safe = lambda x, ok: jnp.where(ok > 0, x, 1.0)
    if causal:
        if s0 is None:
            s0 = init_flow_state(B, H, dims.Dk, dims.Dv, dt)
        first = ((lay.doc == 0) & lay.valid)[:, None].astype(dt)                 # [B, 1, T]
        t = safe(Mf.sum(-1) + first * s0.count[..., None], vq)                   # [B, H, T]
        inc = safe(P.sum(-1) + first * jnp.einsum("bthd,bhd->bht", fq, s0.sum_k) + eps, vq)
        # O_j sums over the queries i <= j of j's document: P^T restricted by M[j, i]
        PT = jnp.einsum("bjhd,bihd->bhji", fk, fq) * Mf                          # [b,h,j,i] = φk_j·φq_i, i ≤ j
        out = safe(PT.sum(-1) + first * jnp.einsum("bthd,bhd->bht", fk, s0.sum_q) + eps, vk)
        sink = (jnp.einsum("bhij,bhj->bhi", P, t / out)
                + first * jnp.einsum("bthd,bhd->bht", fq, s0.flow_k)) / t
        src = (jnp.einsum("bhji,bhi->bhj", PT, t / inc)
               + first * jnp.einsum("bthd,bhd->bht", fk, s0.flow_q)) / t
        c = lax.stop_gradient(jnp.maximum(jnp.max(jnp.where(vk > 0, src, -jnp.inf), -1),
                                          jnp.where(jnp.isfinite(s0.lse), s0.lse, -jnp.inf)))
        c = jnp.where(jnp.isfinite(c), c, 0.0)[..., None]                        # [B, H, 1]
        e = jnp.where(vk > 0, jnp.exp(jnp.where(vk > 0, src - c, 0.0)), 0.0)
        Z = jnp.einsum("bhl,bjl->bhj", e, M.astype(dt)) + first * jnp.exp(s0.lse[..., None] - c)
        comp = jnp.where(vk > 0, t * e / safe(Z, vk), 0.0)
        alloc = jax.nn.sigmoid(sink)
        num = jnp.einsum("bhij,bjhv->bihv", P, v * jnp.moveaxis(comp, 1, 2)[..., None])
        num = num + jnp.moveaxis(first, 1, 2)[..., None] * jnp.einsum("bthd,bhdv->bthv", fq, s0.kv)
    else:
        if segment_ids is None:
            ratio = T / S
            m_j = jnp.full((B, 1, S), float(S), dt)
        else:
            ratio = 1.0
            m_j = Mkk.astype(dt).sum(-1)[:, None]                                # document length
        inc = safe(P.sum(-1) + eps, vq)
        out = safe(P.sum(-2) + eps, vk)
        sink = jnp.einsum("bhij,bhj->bhi", P, 1.0 / out)
        src = jnp.einsum("bhij,bhi->bhj", P, 1.0 / inc)
        alloc = jax.nn.sigmoid(sink * ratio)
        c = lax.stop_gradient(jnp.max(jnp.where(vk > 0, src, -jnp.inf), -1, keepdims=True))
        c = jnp.where(jnp.isfinite(c), c, 0.0)
        e = jnp.where(vk > 0, jnp.exp(jnp.where(vk > 0, src - c, 0.0)), 0.0)
        Z = jnp.einsum("bhl,bjl->bhj", e, Mkk.astype(dt))
        comp = jnp.where(vk > 0, m_j * e / safe(Z, vk), 0.0)
        num = jnp.einsum("bhij,bjhv->bihv", P, v * jnp.moveaxis(comp, 1, 2)[..., None])
    o = num / jnp.moveaxis(inc, 1, 2)[..., None] * jnp.moveaxis(alloc, 1, 2)[..., None]
    o = jnp.where(valid_q[:, :, None, None], o, 0.0).astype(q.dtype)
    if not return_final_state:
        return o, None
    # the state after the row's last document (plus the initial state if that is the first one)
    last = ((lay.doc == lay.doc[:, -1:]) & lay.valid).astype(dt)                # [B, T]
    carry = (lay.doc[:, -1] == 0).astype(dt)[:, None]                            # [B, 1]
    lw = last[:, :, None, None]
    cq = lambda x: carry[..., None] * x if x.ndim == 3 else carry * x
    tT, incT, outT = (jnp.moveaxis(x, 1, 2) for x in (t, inc, out))             # [B, T, H]
    state = FlowState(
        sum_q=jnp.sum(lw * fq, 1) + cq(s0.sum_q),
        sum_k=jnp.sum(lw * fk, 1) + cq(s0.sum_k),
        flow_k=jnp.sum(lw * fk * (tT / outT)[..., None], 1) + cq(s0.flow_k),
        flow_q=jnp.sum(lw * fq * (tT / incT)[..., None], 1) + cq(s0.flow_q),
        lse=jnp.log(jnp.einsum("bhj,bj->bh", e, last) + carry * jnp.exp(s0.lse - c[..., 0])) + c[..., 0],
        kv=jnp.einsum("bjhd,bjhv->bhdv", lw * fk, v * jnp.moveaxis(comp, 1, 2)[..., None])
        + carry[..., None, None] * s0.kv,
        count=jnp.sum(last, 1)[:, None] + carry * s0.count,
    )
    return o, state


# ----------------------------------------------------------------------------- declaration
from attn_jax.core import recipe  # noqa: E402
from attn_jax.core.declaration import Declaration, Paper, Parity, declare  # noqa: E402
from attn_jax.linear.parity import first  # noqa: E402


def _parity_state(h0):
    """A :class:`FlowState` derived deterministically (and differentiably) from the standard
    ``h0 [B, H, Dk, Dv]`` (``Dv >= 4``): positive prefix sums of a prefix of ``count`` tokens, the
    value state ``h0`` itself."""
    count = 4.0 + jnp.abs(h0[..., 0, 0])                                          # [B, H]
    part = lambda c: count[..., None] * jax.nn.sigmoid(h0[..., c])               # noqa: E731  [B, H, Dk]
    return FlowState(sum_q=part(0), sum_k=part(1), flow_k=part(2), flow_q=part(3),
                     lse=jnp.log(count) + 0.3 * h0[..., 1, 0], kv=h0, count=count)


def _parity(impl, x, *, causal=True, segment_ids=None, initial_state=None):
    kw = dict(causal=causal, segment_ids=segment_ids,
              initial_state=None if initial_state is None else _parity_state(initial_state))
    if impl == "reference":
        return first(flow_attention_reference(x["q"], x["k"], x["v"], **kw))
    return first(flow_attention(x["q"], x["k"], x["v"], impl=impl, **kw))


DECLARATION = declare(Declaration(
    name="flow", family="linear", title="Flowformer (flow conservation)",
    papers=(Paper("Flowformer: Linearizing Transformers with Conservation Flows", 2022, "2202.06258", "Wu et al."),),
    summary="Flow-Attention: sigmoid features, incoming/outgoing flows, competition over sources (softmax) and "
            "allocation over sinks (sigmoid); the causal form rescales the flows by the prefix length",
    op=flow_attention, forms=("chunk", "recurrent"), directions=("causal", "bidirectional"),
    parity=Parity(_parity, notes="recurrent = scan of flow_attention_step; non-causal S != T without segments"),
    layer=recipe.LinearLayer(recipe.FlowRule(),
                             recipe.Projections(qk_activation="identity", v_activation="identity", scale="one")),
    notes="decode state: a FlowState advanced by flow_attention_step"))
