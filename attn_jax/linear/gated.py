"""The gated linear-attention engine: one recurrence, four forms, one dispatch registry.

Every decayed / gated linear-attention mechanism in :mod:`attn_jax.linear` (plain linear
attention, RetNet retention, Lightning attention, Mamba-2's scalar-decay SSD form, GLA)
is an instance of

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t          S_t: [Dk, Dv] per (batch, head), float32
    o_t = scale * q_t S_t

with log-space gates ``g_t <= 0`` that are absent (no decay), one per head (``[B, T, H]``,
scalar decay) or one per key channel (``[B, T, H, Dk]``, GLA's vector gates).  Yang et al.,
"Gated Linear Attention Transformers with Hardware-Efficient Training", 2023,
arXiv:2312.06635 (Eq. 1-4 and §4).  The non-causal form (no gates) is
``o_i = scale * q_i sum_j k_j^T v_j`` over the document of ``i``.

Forms (``impl`` names, registered in :data:`GATED`):

* ``"reference"``: a token-by-token ``lax.scan`` of the recurrence (the spec tests trust).
* ``"recurrent"``: the decode step :func:`recurrent_step` scanned over the sequence.
* ``"parallel"``: the materialised quadratic form ``O = (Q K^T ⊙ D) V`` with the decay mask
  ``D_ij = exp(G_i - G_j)`` (``G`` the cumulative log gate; a ``[T, T, Dk]`` tensor for vector
  gates), plus the initial-state term.
* ``"chunk"``: chunkwise-parallel (Lightning attention / GLA §4): within a chunk of ``C``
  tokens the quadratic form, across chunks a scan over float32 states.  All exponents are
  differences ``G_i - G_j <= 0`` with ``i`` after ``j``, so nothing overflows however strong the
  gates.  Vector gates use GLA's secondary chunking: sub-blocks of ``c`` tokens; off-diagonal
  sub-blocks factor through the last position ``r`` of the earlier sub-block
  (``exp(G_i - G_r) exp(G_r - G_j)``, both ``<= 1``), diagonal sub-blocks are computed
  elementwise (``[c, c, Dk]``).
* ``"pallas"``: the fused chunked kernel of :mod:`pallas_kernels.chunked_gla` on GPU/TPU.

Packed segments, padding and initial state follow :mod:`attn_jax.linear.common`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from attn_jax.core import checks
from attn_jax.core.array_types import ArrayLike, Float, InitialState, RecurrentOutput, SegmentIds
from attn_jax.core.dispatch import Registry, register_explainer
from attn_jax.linear.common import (RecurrentCall, compute_dtype, default_scale, expand_kv_heads, finish, init_state,
                                    segment_layout, validate)

__all__ = ["GATED", "GatedCall", "gated_linear_attention", "explain_gated", "recurrent_step", "DEFAULT_CHUNK",
           "DEFAULT_SUBCHUNK"]

DEFAULT_CHUNK = 64
DEFAULT_SUBCHUNK = 16

GATED = Registry("linear.gated")


GatedCall = RecurrentCall


# ----------------------------------------------------------------------------- shared preparation
def _prepare(call: GatedCall, q, k, v, g, segment_ids):
    p = call.problem
    f32 = compute_dtype(p)
    lay = segment_layout(segment_ids, p.B, p.T)
    m = lay.valid[:, :, None, None]
    q = jnp.where(m, q.astype(f32), 0.0)  # NaN in a padded query must not reach dS (and so dk, dv)
    k = jnp.where(m, expand_kv_heads(k, p.H).astype(f32), 0.0)
    v = jnp.where(m, expand_kv_heads(v, p.H).astype(f32), 0.0)
    if g is not None:
        g = jnp.where(lay.valid[:, :, None] if g.ndim == 3 else m, g.astype(f32), 0.0)
    return q, k, v, g, lay


def _decay(g_t, ndim_state: int = 4):
    """exp(g) shaped to scale a state ``[B, H, Dk, Dv]`` (g: ``[B, H]`` or ``[B, H, Dk]``)."""
    e = jnp.exp(g_t)
    return e[:, :, None, None] if e.ndim == 2 else e[:, :, :, None]


def recurrent_step(q_t, k_t, v_t, g_t, state, *, scale: float | None = None):
    """One decode step of the gated recurrence.

    ``q_t: [B, H, Dk]``, ``k_t: [B, K, Dk]``, ``v_t: [B, K, Dv]``, ``g_t``: ``None``, ``[B, H]``
    or ``[B, H, Dk]`` log gates, ``state: [B, H, Dk, Dv]`` float32.  Returns ``(o_t [B, H, Dv]``
    in q's dtype, ``new_state)``.
    """
    B, H, Dk = q_t.shape
    scale = default_scale(scale, Dk)
    if state.shape != (B, H, Dk, v_t.shape[-1]):
        raise ValueError(f"state: expected shape [B, H, Dk, Dv] = {[B, H, Dk, v_t.shape[-1]]}, got {list(state.shape)}")
    rep = H // k_t.shape[1]
    dt = jnp.float64 if q_t.dtype == jnp.float64 else jnp.float32
    k_t = jnp.repeat(k_t, rep, axis=1).astype(dt)
    v_t = jnp.repeat(v_t, rep, axis=1).astype(dt)
    s = state.astype(dt)
    if g_t is not None:
        checks.check_log_gates("g_t", g_t)
        s = s * _decay(g_t.astype(dt))
    s = s + k_t[..., :, None] * v_t[..., None, :]
    o = scale * jnp.einsum("bhk,bhkv->bhv", q_t.astype(dt), s)
    return o.astype(q_t.dtype), s


# ----------------------------------------------------------------------------- reference
def _dense_noncausal(call, q, k, v, lay):
    same = (lay.doc[:, :, None] == lay.doc[:, None, :]) & lay.valid[:, None, :]
    a = jnp.einsum("bihd,bjhd->bhij", q, k) * call.scale
    a = jnp.where(same[:, None], a, 0.0)
    return jnp.einsum("bhij,bjhv->bihv", a, v)


def _reference(call: GatedCall, q, k, v, g, h0, segment_ids):
    q, k, v, g, lay = _prepare(call, q, k, v, g, segment_ids)
    if not call.problem.causal:
        return finish(call, _dense_noncausal(call, q, k, v, lay), lay, None)

    def step(s, xs):
        q_t, k_t, v_t, g_t, reset_t = xs
        s = jnp.where(reset_t[:, None, None, None], 0.0, s)
        if g_t is not None:
            s = s * _decay(g_t)
        s = s + k_t[..., :, None] * v_t[..., None, :]
        return s, call.scale * jnp.einsum("bhk,bhkv->bhv", q_t, s)

    tm = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
    s, o = lax.scan(step, init_state(call, h0), (tm(q), tm(k), tm(v), tm(g), tm(lay.reset)))
    return finish(call, jnp.moveaxis(o, 0, 1), lay, s)


def _recurrent(call: GatedCall, q, k, v, g, h0, segment_ids):
    """The public decode step scanned over the sequence (tests the decode path end to end)."""
    q, k, v, g, lay = _prepare(call, q, k, v, g, segment_ids)
    if not call.problem.causal:
        raise ValueError("impl: 'recurrent' is a causal form")

    def step(s, xs):
        q_t, k_t, v_t, g_t, reset_t = xs
        s = jnp.where(reset_t[:, None, None, None], 0.0, s)
        o_t, s = recurrent_step(q_t, k_t, v_t, g_t, s, scale=call.scale)
        return s, o_t

    tm = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
    s, o = lax.scan(step, init_state(call, h0), (tm(q), tm(k), tm(v), tm(g), tm(lay.reset)))
    return finish(call, jnp.moveaxis(o, 0, 1), lay, s)


# ----------------------------------------------------------------------------- parallel
def _parallel(call: GatedCall, q, k, v, g, h0, segment_ids):
    q, k, v, g, lay = _prepare(call, q, k, v, g, segment_ids)
    p = call.problem
    if not p.causal:
        return finish(call, _dense_noncausal(call, q, k, v, lay), lay, None)
    T = p.T
    tril = jnp.tril(jnp.ones((T, T), bool))
    same = (lay.doc[:, :, None] == lay.doc[:, None, :]) & tril                     # [B, T, T]
    first_doc = lay.doc == 0                                                       # sees h0
    last_doc = lay.doc == lay.doc[:, -1:]                                          # writes the final state
    if g is None:
        G = jnp.zeros((p.B, T, p.H, 1), q.dtype)
        a = jnp.einsum("bihd,bjhd->bhij", q, k)
    else:
        G = jnp.cumsum(g if g.ndim == 4 else g[..., None], axis=1)                 # [B, T, H, Dg]
        if g.ndim == 3:
            diff = G[:, :, None, :, 0] - G[:, None, :, :, 0]                        # [B, i, j, H]
            w = jnp.exp(jnp.where(same[..., None], diff, -jnp.inf))
            a = jnp.einsum("bihd,bjhd->bhij", q, k) * jnp.moveaxis(w, 3, 1)
        else:
            diff = G[:, :, None] - G[:, None, :]                                    # [B, i, j, H, Dk]
            w = jnp.exp(jnp.where(same[..., None, None], diff, -jnp.inf))
            a = jnp.einsum("bihd,bjhd,bijhd->bhij", q, k, w)
    a = jnp.where(same[:, None], a, 0.0) * call.scale
    o = jnp.einsum("bhij,bjhv->bihv", a, v)
    G_last = G[:, -1:]
    if h0 is not None:
        qg = q * jnp.exp(G) * call.scale
        o = o + jnp.where(first_doc[:, :, None, None], jnp.einsum("bthd,bhdv->bthv", qg, h0.astype(G.dtype)), 0.0)
    state = None
    if call.return_final_state:
        kg = jnp.where(last_doc[:, :, None, None], k * jnp.exp(G_last - G), 0.0)
        state = jnp.einsum("bthd,bthv->bhdv", kg, v)
        if h0 is not None:
            carry = (lay.doc[:, -1] == 0)[:, None, None, None]
            state = state + jnp.where(carry, jnp.exp(G_last[:, 0])[..., None] * h0.astype(G.dtype), 0.0)
    return finish(call, o, lay, state)


# ----------------------------------------------------------------------------- chunk
def _to_chunks(x, N: int, C: int):
    """``[B, N*C, H, ...] -> [B, H, N, C, ...]``."""
    B, _, H = x.shape[:3]
    x = x.reshape(B, N, C, H, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def _intra_scalar(q, k, G, same, scale):
    """``A_ij = scale (q_i . k_j) exp(G_i - G_j)`` on ``same`` pairs; G: [B, H, N, C]."""
    diff = G[..., :, None] - G[..., None, :]
    w = jnp.exp(jnp.where(same, diff, -jnp.inf))
    return jnp.einsum("bhncd,bhnsd->bhncs", q, k) * w * scale


def _intra_vector(q, k, G, same, scale, c: int):
    """Vector gates with secondary chunking (sub-blocks of ``c``); G: [B, H, N, C, Dk]."""
    B, H, N, C, Dk = q.shape
    ns = C // c
    sub = lambda x: x.reshape(B, H, N, ns, c, Dk)
    qs, ks, Gs = sub(q), sub(k), sub(G)
    sub_idx = jnp.arange(C) // c
    same_sub = same.reshape(*same.shape[:3], ns, c, ns, c)
    diag_mask = jnp.stack([same_sub[..., j, :, j, :] for j in range(ns)], axis=3)   # [B, 1, N, ns, c, c]
    # diagonal sub-blocks, elementwise in Dk
    e = Gs[..., :, None, :] - Gs[..., None, :, :]                                        # [B,H,N,ns,c,c,Dk]
    w = jnp.exp(jnp.where(diag_mask[..., None], e, -jnp.inf))
    a_diag = jnp.einsum("bhnsid,bhnsjd,bhnsijd->bhnsij", qs, ks, w)
    a = jnp.einsum("bhnsij,st->bhnsitj", a_diag, jnp.eye(ns, dtype=q.dtype)).reshape(B, H, N, C, C)
    if ns > 1:
        # off-diagonal sub-blocks (sub-block of j strictly before that of i), through the last
        # position r_J of j's sub-block: exp(G_i - G_r) * exp(G_r - G_j), both factors <= 1.
        Gr = Gs[..., -1, :]                                                              # [B,H,N,ns,Dk]
        qf = q[:, :, :, None] * jnp.exp(jnp.minimum(G[:, :, :, None] - Gr[..., None, :], 0.0))  # [B,H,N,ns,C,Dk]
        kf = ks * jnp.exp(Gr[..., None, :] - Gs)                                           # [B,H,N,ns,c,Dk]
        a_off = jnp.einsum("bhnJid,bhnJjd->bhniJj", qf, kf).reshape(B, H, N, C, C)
        off = same & (sub_idx[None, :] < sub_idx[:, None])
        a = a + jnp.where(off, a_off, 0.0)
    return a * scale


def _chunk_causal(call: GatedCall, q, k, v, g, h0, lay, chunk_size: int):
    p = call.problem
    B, T, H = q.shape[:3]
    C = min(chunk_size, max(16, 1 << (T - 1).bit_length()))
    N = -(-T // C)
    pad = N * C - T
    if pad:
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v = padt(q), padt(k), padt(v)
        g = None if g is None else padt(g)
        doc = jnp.concatenate([lay.doc, jnp.repeat(lay.doc[:, -1:], pad, axis=1)], axis=1)
    else:
        doc = lay.doc
    qc, kc, vc = _to_chunks(q, N, C), _to_chunks(k, N, C), _to_chunks(v, N, C)       # [B,H,N,C,D]
    if g is None:
        G = jnp.zeros((B, H, N, C, 1), q.dtype)
    else:
        gc = _to_chunks(g, N, C)
        G = jnp.cumsum(gc if gc.ndim == 5 else gc[..., None], axis=3)                 # [B,H,N,C,Dg]
    docc = doc.reshape(B, 1, N, C)
    doc_last = docc[..., -1]                                                          # [B,1,N]
    doc_before = jnp.concatenate([docc[:, :, :1, 0], doc_last[:, :, :-1]], axis=2)     # doc of the token before
    sees_state = docc == doc_before[..., None]                                        # [B,1,N,C]
    writes_state = docc == doc_last[..., None]
    carries = doc_last == doc_before                                                  # [B,1,N]
    tril = jnp.tril(jnp.ones((C, C), bool))
    same = (docc[..., :, None] == docc[..., None, :]) & tril                          # [B,1,N,C,C]

    if G.shape[-1] == 1:
        a = _intra_scalar(qc, kc, G[..., 0], same, call.scale)
    else:
        c = math.gcd(C, DEFAULT_SUBCHUNK)
        a = _intra_vector(qc, kc, G, same, call.scale, c)
    o = jnp.einsum("bhncs,bhnsv->bhncv", a, vc)

    G_last = G[..., -1:, :]                                                           # [B,H,N,1,Dg]
    kg = jnp.where(writes_state[..., None], kc * jnp.exp(G_last - G), 0.0)
    U = jnp.einsum("bhncd,bhncv->bhndv", kg, vc)                                       # [B,H,N,Dk,Dv]
    decay = jnp.exp(G_last[..., 0, :])[..., None]                                       # [B,H,N,Dg,1]

    def step(s, xs):
        u, d, cr = xs
        s_new = jnp.where(cr[:, :, None, None], d * s, 0.0) + u
        return s_new, s

    mv = lambda x: jnp.moveaxis(x, 2, 0)
    s_final, s_before = lax.scan(step, init_state(call, h0), (mv(U), mv(decay), mv(carries)))
    s_before = jnp.moveaxis(s_before, 0, 2)                                           # [B,H,N,Dk,Dv]
    qg = qc * jnp.exp(G) * call.scale
    o = o + jnp.where(sees_state[..., None], jnp.einsum("bhncd,bhndv->bhncv", qg, s_before), 0.0)
    o = jnp.moveaxis(o, 1, 3).reshape(B, N * C, H, -1)[:, :T]
    return o, s_final


def _chunk(call: GatedCall, q, k, v, g, h0, segment_ids):
    q, k, v, g, lay = _prepare(call, q, k, v, g, segment_ids)
    if call.problem.causal:
        o, s = _chunk_causal(call, q, k, v, g, h0, lay, call.chunk_size)
        return finish(call, o, lay, s)
    # non-causal = causal (j <= i) + anti-causal (j >= i, by reversing time) - diagonal
    fwd, _ = _chunk_causal(call, q, k, v, None, None, lay, call.chunk_size)
    flip = lambda x: jnp.flip(x, axis=1)
    lay_r = type(lay)(flip(lay.valid), flip(lay.reset), flip(lay.doc))
    bwd, _ = _chunk_causal(call, flip(q), flip(k), flip(v), None, None, lay_r, call.chunk_size)
    diag = call.scale * jnp.einsum("bthd,bthd->bth", q, k)[..., None] * v
    return finish(call, fwd + flip(bwd) - diag, lay, None)


# ----------------------------------------------------------------------------- pallas
def _pallas(call: GatedCall, q, k, v, g, h0, segment_ids, *, platform: str):
    from pallas_kernels.chunked_gla import chunked_gla
    p = call.problem
    k, v = expand_kv_heads(k, p.H), expand_kv_heads(v, p.H)
    if g is None:
        g = jnp.zeros((p.B, p.T, p.H), jnp.float32)
    o, s = chunked_gla(q, k, v, g.astype(jnp.float32), scale=call.scale, initial_state=h0, platform=platform,
                       segment_ids=segment_ids)  # the kernel resets at document starts, skips padding
    return o.astype(p.dtype), (s if call.return_final_state else None)


def _pallas_unsupported(platform: str, call: GatedCall) -> list[str]:
    if platform not in ("cuda", "tpu"):
        return [f"the chunked GLA Pallas kernel targets cuda and tpu, not {platform}"]
    p = call.problem
    reasons = []
    if not p.causal:
        reasons.append("non-causal linear attention has no kernel (it is two matmuls; 'chunk' serves it)")
    from pallas_kernels.chunked_gla import unsupported_reasons
    sds = jax.ShapeDtypeStruct
    gate_shape = (p.B, p.T, p.H) + ((p.Dk,) if p.gate == "vector" else ())
    return reasons + list(unsupported_reasons(
        sds((p.B, p.T, p.H, p.Dk), p.dtype), sds((p.B, p.T, p.H, p.Dk), p.dtype), sds((p.B, p.T, p.H, p.Dv), p.dtype),
        sds(gate_shape, jnp.float32), platform=platform))


def _always(platform, call):
    return []


def _causal_only(platform, call):
    return [] if call.problem.causal else ["a causal form (use 'chunk', 'parallel' or 'reference' for causal=False)"]


def _pallas_dispatch(call, *args):
    # The registry chose "pallas" for cuda and/or tpu; the kernel module differs per platform.
    return jax.lax.platform_dependent(
        *args, cuda=functools.partial(_pallas, call, platform="cuda"),
        tpu=functools.partial(_pallas, call, platform="tpu"),
        default=functools.partial(_chunk, call))


GATED.register("pallas", _pallas_dispatch, _pallas_unsupported)
GATED.register("chunk", _chunk, _always)
GATED.register("parallel", _parallel, _always, auto=False)
GATED.register("recurrent", _recurrent, _causal_only, auto=False)
GATED.register("reference", _reference, _always, auto=False)


# ----------------------------------------------------------------------------- public entry
def _make_call(mechanism, q, k, v, g, *, gate_name, allow_vector_gate, scale, initial_state, return_final_state,
               segment_ids, causal, chunk_size) -> GatedCall:
    problem = validate(mechanism, q, k, v, g, gate_name=gate_name, allow_vector_gate=allow_vector_gate,
                       initial_state=initial_state, segment_ids=segment_ids, causal=causal)
    if return_final_state and not causal:
        raise ValueError("return_final_state: only defined for causal=True")
    if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: expected a power of two >= 16, got {chunk_size!r}")
    return GatedCall(problem, default_scale(scale, problem.Dk), chunk_size, bool(return_final_state))


def gated_linear_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B T K Dk"],
                           v: Float[ArrayLike, "B T K Dv"],
                           log_g: Float[ArrayLike, "B T H *gate_dim"] | None = None, *, scale: float | None = None,
                           initial_state: InitialState = None, return_final_state: bool = False,
                           segment_ids: SegmentIds = None, causal: bool = True, impl="auto",
                           chunk_size: int = DEFAULT_CHUNK, mechanism: str = "gated", gate_name: str = "log_g",
                           allow_vector_gate: bool = True) -> RecurrentOutput:
    """``o, final_state = gated_linear_attention(q, k, v, log_g)`` (see the module docstring).

    ``q: [B, T, H, Dk]``, ``k: [B, T, K, Dk]``, ``v: [B, T, K, Dv]``; ``log_g``: ``None``,
    ``[B, T, H]`` or ``[B, T, H, Dk]`` log forget gates (``<= 0``); ``initial_state``:
    ``[B, H, Dk, Dv]``; ``segment_ids``: int ``[B, T]`` (0 = padding).  Returns ``o`` in q's dtype
    and the float32 final state (``None`` unless ``return_final_state``).
    """
    call = _make_call(mechanism, q, k, v, log_g, gate_name=gate_name, allow_vector_gate=allow_vector_gate,
                      scale=scale, initial_state=initial_state, return_final_state=return_final_state,
                      segment_ids=segment_ids, causal=causal, chunk_size=chunk_size)
    checks.check_log_gates(gate_name, log_g, segment_ids)
    return GATED.call(impl, call, q, k, v, log_g, initial_state, segment_ids)


def explain_gated(q, k, v, log_g=None, *, impl="auto", platform=None, **kw):
    """The dispatch decision (and every reason) for a :func:`gated_linear_attention` call."""
    call = _make_call(kw.pop("mechanism", "gated"), q, k, v, log_g, gate_name=kw.pop("gate_name", "log_g"),
                      allow_vector_gate=kw.pop("allow_vector_gate", True), scale=kw.pop("scale", None),
                      initial_state=kw.pop("initial_state", None),
                      return_final_state=kw.pop("return_final_state", False), segment_ids=kw.pop("segment_ids", None),
                      causal=kw.pop("causal", True), chunk_size=kw.pop("chunk_size", DEFAULT_CHUNK))
    if kw:
        raise TypeError(f"explain_gated: unexpected arguments {sorted(kw)}")
    return GATED.explain(impl, call, platform)


register_explainer(gated_linear_attention, explain_gated)   # aj.explain(gated_linear_attention, ...)


# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, Parity, declare  # noqa: E402
from attn_jax.linear.parity import gated_call  # noqa: E402

DECLARATION = declare(Declaration(
    name="linear_identity", family="linear", title="Linear attention, identity map, unnormalised",
    papers=(Paper("Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", 2020,
                  "2006.16236", "Katharopoulos et al."),),
    summary="S_t = diag(exp(log_g_t)) S_{t-1} + k_tᵀ v_t, o_t = scale q_t S_t (here without gates: S_t = Σ k_jᵀ v_j)",
    op=gated_linear_attention, forms=("chunk", "parallel", "recurrent"), directions=("causal", "bidirectional"),
    parity=Parity(gated_call(gated_linear_attention), kernel_gate="none"),
    notes="the engine every decayed mechanism wraps (gates in log space); no mixer of its own"))
