"""DeltaNet and Gated DeltaNet: the delta-rule recurrence, four forms, one dispatch registry.

The delta rule (Schlag, Irie, Schmidhuber, "Linear Transformers Are Secretly Fast Weight
Programmers", 2021, arXiv:2102.11174) replaces the additive write of linear attention by an
online least-squares step: the value stored under ``k_t`` moves a fraction ``beta_t`` towards
``v_t``.  Gated DeltaNet (Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2
with Delta Rule", 2024, arXiv:2412.06464) adds Mamba-2's scalar decay ``alpha_t``.  In the
row-vector convention of :mod:`attn_jax.linear.gated` (``k_t`` a row ``[1, Dk]``, state
``S: [Dk, Dv]`` per batch and head, float32):

    S_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t
        = alpha_t S_{t-1} + k_t^T u_t,     u_t = beta_t (v_t - alpha_t k_t S_{t-1})
    o_t = scale * q_t S_t

``beta: [B, T, H]`` in ``(0, 1)``; ``log_g: [B, T, H]`` (``<= 0``, ``alpha = exp(log_g)``;
DeltaNet is ``alpha = 1``).  Keys are expected **L2-normalised by the caller** (the papers
normalise them; with ``|k_t| = 1`` and ``beta_t <= 1``, ``I - beta_t k_t^T k_t`` is a
contraction); this module does not normalise.  Gates are per query head; with GQA the ``K``
k/v heads are shared by ``H // K`` query heads.  Causal only (the recurrence needs an order).

Forms (``impl`` names, registered in :data:`DELTA`):

* ``"reference"``: a token-by-token ``lax.scan`` of the first line above, with the
  ``[Dk, Dk]`` matrix ``I - beta_t k_t^T k_t`` built explicitly (the spec tests trust).
* ``"recurrent"``: the decode step :func:`delta_rule_step` (rank-one update) scanned.
* ``"parallel"``: the whole sequence as one block of the UT form below (a ``T x T``
  triangular solve; ``O(T^2 (Dk + Dv) + T^3)``) -- for short sequences and tests.
* ``"chunk"``: the WY/UT representation of Yang, Wang, Zhang, Shen, Kim, "Parallelizing
  Linear Transformers with the Delta Rule over Sequence Length", 2024, arXiv:2406.06484 (§3),
  with the decay folded in as in arXiv:2412.06464 (§3.3).  Within a chunk of ``C`` tokens
  starting from state ``S`` (``G_i`` the within-chunk cumulative log decay, ``gamma_i =
  exp(G_i)``, ``Gamma_ij = exp(G_i - G_j)`` for ``j <= i``), unrolling ``u_i`` gives the unit
  lower-triangular system

      (I + A) U = diag(beta) V - diag(beta gamma) K S,   A = tril(diag(beta) (K K^T ⊙ Gamma), -1)

  so with ``T = (I + A)^{-1} diag(beta)`` (inverted by block doubling, matmuls only):
  ``W = T diag(gamma) K``, ``U = T V`` and

      U' = U - W S
      O  = scale (diag(gamma) Q S + (Q K^T ⊙ Gamma ⊙ M) U')
      S' = gamma_C S + (diag(Gamma_C) K)^T U'

  (``M`` the causal mask).  ``T``, ``W``, ``U`` and the intra-chunk products are batched over
  all chunks; only ``U' = U - W S`` and ``S'`` run in the ``lax.scan`` over float32 states.  All
  decay exponents are differences ``G_i - G_j <= 0`` with ``i`` after ``j``, so nothing
  overflows.  Gradients come from autodiff (the solve has a transpose rule).

Packed segments (``segment_ids``, 0 = padding) follow :mod:`attn_jax.linear.common`: padding is
transparent (``k = v = 0``, ``beta = 0``, ``alpha = 1``, zero output) and the state resets at
document starts.  Resets inside a chunk mask ``A`` and ``Q K^T`` to same-document pairs, and the
incoming state is seen / the chunk's state written / carried exactly as in the gated engine.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attn_jax.core import checks
from attn_jax.core.array_types import ArrayLike, InitialState, RecurrentOutput, SegmentIds
from attn_jax.core.dispatch import Registry, register_explainer
from attn_jax.core.validation import check_float_array, shape_str
from attn_jax.linear.common import (RecurrentCall, compute_dtype, default_scale, expand_kv_heads, finish, init_state,
                                    segment_layout, validate)

__all__ = ["DELTA", "DeltaCall", "delta_rule", "gated_delta_rule", "delta_rule_step", "explain_delta_rule",
           "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 64

DELTA = Registry("linear.delta_rule")


DeltaCall = RecurrentCall


# ----------------------------------------------------------------------------- shared preparation
def _prepare(call: DeltaCall, q, k, v, beta, log_g, segment_ids):
    """Expand GQA heads, cast to the compute dtype and make padding transparent.

    ``jnp.where`` (not a multiply) so NaN/Inf held by padding tokens cannot leak into values or
    gradients.
    """
    p = call.problem
    dt = compute_dtype(p)
    lay = segment_layout(segment_ids, p.B, p.T)
    m3, m4 = lay.valid[:, :, None], lay.valid[:, :, None, None]
    q = jnp.where(m4, q.astype(dt), 0.0)
    k = jnp.where(m4, expand_kv_heads(k, p.H).astype(dt), 0.0)
    v = jnp.where(m4, expand_kv_heads(v, p.H).astype(dt), 0.0)
    beta = jnp.where(m3, beta.astype(dt), 0.0)
    if log_g is not None:
        log_g = jnp.where(m3, log_g.astype(dt), 0.0)
    return q, k, v, beta, log_g, lay


def _time_major(x):
    return None if x is None else jnp.moveaxis(x, 1, 0)


# ----------------------------------------------------------------------------- decode step
def delta_rule_step(q_t: Float[Array, "B H Dk"], k_t: Float[Array, "B K Dk"], v_t: Float[Array, "B K Dv"],
                    beta_t: Float[Array, "B H"], state: Float[Array, "B H Dk Dv"], *,
                    log_g_t: Float[Array, "B H"] | None = None, scale: float | None = None):
    """One decode step: ``S = alpha S + beta k^T (v - alpha k S)``, ``o = scale q S``.

    Returns ``(o_t [B, H, Dv]`` in q's dtype, ``new_state [B, H, Dk, Dv])`` (float32; float64
    for float64 inputs).  Keys are expected L2-normalised.
    """
    B, H, Dk = q_t.shape
    scale = default_scale(scale, Dk)
    Dv = v_t.shape[-1]
    if state.shape != (B, H, Dk, Dv):
        raise ValueError(f"state: expected shape [B, H, Dk, Dv] = {[B, H, Dk, Dv]}, got {shape_str(state)}")
    if beta_t.shape != (B, H):
        raise ValueError(f"beta_t: expected shape [B, H] = {[B, H]}, got {shape_str(beta_t)}")
    if log_g_t is not None and log_g_t.shape != (B, H):
        raise ValueError(f"log_g_t: expected shape [B, H] = {[B, H]}, got {shape_str(log_g_t)}")
    if k_t.ndim != 3 or k_t.shape[0] != B or k_t.shape[2] != Dk or H % k_t.shape[1]:
        raise ValueError(f"k_t: expected shape [B, K, Dk] with H % K == 0 (B={B}, H={H}, Dk={Dk}), "
                         f"got {shape_str(k_t)}")
    if v_t.shape[:2] != k_t.shape[:2]:
        raise ValueError(f"v_t: expected shape [B, K, Dv] = {[*k_t.shape[:2], Dv]}, got {shape_str(v_t)}")
    rep = H // k_t.shape[1]
    dt = jnp.float64 if q_t.dtype == jnp.float64 else jnp.float32
    k_t = jnp.repeat(k_t, rep, axis=1).astype(dt)
    v_t = jnp.repeat(v_t, rep, axis=1).astype(dt)
    b = beta_t.astype(dt)[..., None]
    s = state.astype(dt)
    if log_g_t is not None:
        checks.check_log_gates("log_g_t", log_g_t)
        s = s * jnp.exp(log_g_t.astype(dt))[..., None, None]
    u = b * (v_t - jnp.einsum("bhk,bhkv->bhv", k_t, s))                      # rank-one delta write
    s = s + k_t[..., :, None] * u[..., None, :]
    o = scale * jnp.einsum("bhk,bhkv->bhv", q_t.astype(dt), s)
    return o.astype(q_t.dtype), s


# ----------------------------------------------------------------------------- reference
def _reference(call: DeltaCall, q, k, v, beta, log_g, h0, segment_ids):
    q, k, v, beta, log_g, lay = _prepare(call, q, k, v, beta, log_g, segment_ids)
    eye = jnp.eye(call.problem.Dk, dtype=q.dtype)

    def step(s, xs):
        q_t, k_t, v_t, b_t, la_t, reset_t = xs
        s = jnp.where(reset_t[:, None, None, None], 0.0, s)
        transition = eye - b_t[..., None, None] * k_t[..., :, None] * k_t[..., None, :]   # I - beta k^T k
        s = jnp.einsum("bhij,bhjv->bhiv", transition, s)
        if la_t is not None:
            s = jnp.exp(la_t)[..., None, None] * s
        s = s + b_t[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
        return s, call.scale * jnp.einsum("bhk,bhkv->bhv", q_t, s)

    xs = tuple(_time_major(x) for x in (q, k, v, beta, log_g, lay.reset))
    s, o = lax.scan(step, init_state(call, h0), xs)
    return finish(call, jnp.moveaxis(o, 0, 1), lay, s)


def _recurrent(call: DeltaCall, q, k, v, beta, log_g, h0, segment_ids):
    """The public decode step scanned over the sequence (tests the decode path end to end)."""
    q, k, v, beta, log_g, lay = _prepare(call, q, k, v, beta, log_g, segment_ids)

    def step(s, xs):
        q_t, k_t, v_t, b_t, la_t, reset_t = xs
        s = jnp.where(reset_t[:, None, None, None], 0.0, s)
        return tuple(reversed(delta_rule_step(q_t, k_t, v_t, b_t, s, log_g_t=la_t, scale=call.scale)))

    xs = tuple(_time_major(x) for x in (q, k, v, beta, log_g, lay.reset))
    s, o = lax.scan(step, init_state(call, h0), xs)
    return finish(call, jnp.moveaxis(o, 0, 1), lay, s)


# ----------------------------------------------------------------------------- UT transform
def _diagonal_blocks(m, size: int):
    """The diagonal ``[size, size]`` blocks of ``m: [..., n, n]`` as ``[..., n // size, size, size]``."""
    n = m.shape[-1]
    nb = n // size
    r = m.reshape(*m.shape[:-2], nb, size, nb, size)
    return jnp.moveaxis(jnp.diagonal(r, axis1=-4, axis2=-2), -1, -3)


def _unit_lower_inverse(lower):
    """``(I + A)^{-1}`` of a unit lower-triangular ``[..., C, C]`` by block doubling (matmuls only).

    ``[[P, 0], [B, Q]]^{-1} = [[P^{-1}, 0], [-Q^{-1} B P^{-1}, Q^{-1}]]`` from 1x1 blocks up: as
    stable as a triangular solve (every block is an exact inverse, no Neumann-series
    cancellation) and free of LAPACK calls (XLA:CPU's ``triangular_solve`` custom call was seen
    to hang intermittently under training loads).
    """
    C = lower.shape[-1]
    n = 1 << max(C - 1, 0).bit_length()
    if n != C:
        pad = [(0, 0)] * (lower.ndim - 2) + [(0, n - C), (0, n - C)]
        lower = jnp.pad(lower, pad) + jnp.diag(jnp.concatenate([jnp.zeros(C), jnp.ones(n - C)]).astype(lower.dtype))
    inv = jnp.ones((*lower.shape[:-2], n, 1, 1), lower.dtype)          # 1x1 blocks (unit diagonal)
    size = 1
    while size < n:
        blocks = _diagonal_blocks(lower, 2 * size)                        # [..., n/2s, 2s, 2s]
        p_inv, q_inv = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        b = blocks[..., size:, :size]
        low = -jnp.einsum("...ij,...jk,...kl->...il", q_inv, b, p_inv)
        top = jnp.concatenate([p_inv, jnp.zeros_like(p_inv)], axis=-1)
        bottom = jnp.concatenate([low, q_inv], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)
        size *= 2
    return inv[..., 0, :C, :C]


def _ut_block(q, k, v, beta, G, same, scale: float):
    """The WY/UT quantities of blocks of ``C`` tokens (any leading batch dims ``...``).

    ``q, k: [..., C, Dk]``, ``v: [..., C, Dv]``, ``beta: [..., C]``, ``G: [..., C]`` cumulative
    log decay within the block (``None``: no decay), ``same: [..., C, C]`` bool, causal
    same-document pairs (``j <= i``).  Returns ``U = T V``, ``W = T diag(gamma) K`` with
    ``T = (I + A)^{-1} diag(beta)``, and ``P = scale (Q K^T ⊙ Gamma ⊙ M)``.
    """
    C = k.shape[-2]
    if G is None:
        gamma = None
        decay = same.astype(k.dtype)
    else:
        gamma = jnp.exp(G)
        diff = G[..., :, None] - G[..., None, :]
        decay = jnp.exp(jnp.where(same, diff, -jnp.inf))                    # Gamma ⊙ M, every exponent <= 0
    strict = ~jnp.eye(C, dtype=bool)
    kk = jnp.einsum("...id,...jd->...ij", k, k)
    a = jnp.where(strict, beta[..., :, None] * kk * decay, 0.0)
    lower = a + jnp.eye(C, dtype=k.dtype)                                    # I + A, unit lower triangular
    kg = k if gamma is None else k * gamma[..., None]
    rhs = jnp.concatenate([beta[..., None] * v, beta[..., None] * kg], axis=-1)
    sol = jnp.einsum("...ij,...jd->...id", _unit_lower_inverse(lower), rhs)
    Dv = v.shape[-1]
    u, w = sol[..., :Dv], sol[..., Dv:]
    p = jnp.einsum("...id,...jd->...ij", q, k) * decay * scale
    return u, w, p, gamma


# ----------------------------------------------------------------------------- parallel
def _parallel(call: DeltaCall, q, k, v, beta, log_g, h0, segment_ids):
    """The whole sequence as one UT block (``T x T``): no chunking, no scan."""
    q, k, v, beta, log_g, lay = _prepare(call, q, k, v, beta, log_g, segment_ids)
    T = call.problem.T
    bh = lambda x: jnp.moveaxis(x, 2, 1)                                      # [B, T, H, ...] -> [B, H, T, ...]
    qh, kh, vh, bth = bh(q), bh(k), bh(v), bh(beta)
    G = None if log_g is None else jnp.cumsum(bh(log_g), axis=-1)      # [B, H, T]
    tril = jnp.tril(jnp.ones((T, T), bool))
    same = ((lay.doc[:, :, None] == lay.doc[:, None, :]) & tril)[:, None]      # [B, 1, T, T]
    u, w, p, gamma = _ut_block(qh, kh, vh, bth, G, same, call.scale)
    sees = (lay.doc == 0)[:, None, :, None]                                    # the first document sees h0
    writes = (lay.doc == lay.doc[:, -1:])[:, None, :, None]                    # the last one leaves the state
    s0 = init_state(call, h0)
    if h0 is not None:
        u = u - jnp.where(sees, jnp.einsum("bhtd,bhdv->bhtv", w, s0), 0.0)
    o = jnp.einsum("bhts,bhsv->bhtv", p, u)
    if h0 is not None:
        qg = qh if gamma is None else qh * gamma[..., None]
        o = o + jnp.where(sees, call.scale * jnp.einsum("bhtd,bhdv->bhtv", qg, s0), 0.0)
    state = None
    if call.return_final_state:
        kd = kh if G is None else kh * jnp.exp(G[..., -1:] - G)[..., None]
        state = jnp.einsum("bhtd,bhtv->bhdv", jnp.where(writes, kd, 0.0), u)
        if h0 is not None:
            carry = (lay.doc[:, -1] == 0)[:, None, None, None]
            g_last = 1.0 if gamma is None else gamma[..., -1][..., None, None]
            state = state + jnp.where(carry, g_last * s0, 0.0)
    return finish(call, jnp.moveaxis(o, 1, 2), lay, state)


# ----------------------------------------------------------------------------- chunk
def _to_chunks(x, N: int, C: int):
    """``[B, N*C, H, ...] -> [B, H, N, C, ...]``."""
    B, _, H = x.shape[:3]
    return jnp.moveaxis(x.reshape(B, N, C, H, *x.shape[3:]), 3, 1)


def _chunk_len(T: int, chunk_size: int) -> int:
    return min(chunk_size, max(16, 1 << (T - 1).bit_length()))


def _chunk(call: DeltaCall, q, k, v, beta, log_g, h0, segment_ids):
    q, k, v, beta, log_g, lay = _prepare(call, q, k, v, beta, log_g, segment_ids)
    B, T, H = q.shape[:3]
    C = _chunk_len(T, call.chunk_size)
    N = -(-T // C)
    pad = N * C - T
    doc = lay.doc
    if pad:
        # zeros are transparent padding: k = v = 0, beta = 0, log_g = 0 (alpha = 1)
        padt = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, beta, log_g = padt(q), padt(k), padt(v), padt(beta), padt(log_g)
        doc = jnp.concatenate([doc, jnp.repeat(doc[:, -1:], pad, axis=1)], axis=1)
    qc, kc, vc = _to_chunks(q, N, C), _to_chunks(k, N, C), _to_chunks(v, N, C)    # [B, H, N, C, D]
    bc = _to_chunks(beta, N, C)                                                     # [B, H, N, C]
    G = None if log_g is None else jnp.cumsum(_to_chunks(log_g, N, C), axis=-1)

    docc = doc.reshape(B, 1, N, C)
    doc_last = docc[..., -1]                                                        # [B, 1, N]
    doc_before = jnp.concatenate([docc[:, :, :1, 0], doc_last[:, :, :-1]], axis=2)   # doc of the token before
    sees_state = (docc == doc_before[..., None])[..., None]                         # [B, 1, N, C, 1]
    writes_state = (docc == doc_last[..., None])[..., None]
    carries = doc_last == doc_before                                                # [B, 1, N]
    tril = jnp.tril(jnp.ones((C, C), bool))
    same = (docc[..., :, None] == docc[..., None, :]) & tril                        # [B, 1, N, C, C]

    u, w, p, gamma = _ut_block(qc, kc, vc, bc, G, same, call.scale)
    w = jnp.where(sees_state, w, 0.0)
    kd = kc if G is None else kc * jnp.exp(G[..., -1:] - G)[..., None]
    kd = jnp.where(writes_state, kd, 0.0)
    g_last = jnp.ones((B, H, N), q.dtype) if G is None else gamma[..., -1]           # [B, H, N]
    keep = jnp.where(carries, g_last, 0.0)[..., None, None]                         # [B, H, N, 1, 1]

    def step(s, xs):
        u_n, w_n, kd_n, keep_n = xs
        u_new = u_n - jnp.einsum("bhcd,bhdv->bhcv", w_n, s)                           # U' = U - W S
        s_new = keep_n * s + jnp.einsum("bhcd,bhcv->bhdv", kd_n, u_new)
        return s_new, (s, u_new)

    mv = lambda x: jnp.moveaxis(x, 2, 0)
    s_final, (s_before, u_new) = lax.scan(step, init_state(call, h0), (mv(u), mv(w), mv(kd), mv(keep)))
    s_before, u_new = jnp.moveaxis(s_before, 0, 2), jnp.moveaxis(u_new, 0, 2)       # [B, H, N, ...]
    qg = qc if gamma is None else qc * gamma[..., None]
    o = jnp.einsum("bhncs,bhnsv->bhncv", p, u_new)
    o = o + jnp.where(sees_state, call.scale * jnp.einsum("bhncd,bhndv->bhncv", qg, s_before), 0.0)
    o = jnp.moveaxis(o, 1, 3).reshape(B, N * C, H, -1)[:, :T]
    return finish(call, o, lay, s_final)


def _always(platform, call):
    return []


DELTA.register("chunk", _chunk, _always)
DELTA.register("parallel", _parallel, _always, auto=False)
DELTA.register("recurrent", _recurrent, _always, auto=False)
DELTA.register("reference", _reference, _always, auto=False)


# ----------------------------------------------------------------------------- public entry
def _make_call(mechanism, q, k, v, beta, log_g, *, scale, initial_state, return_final_state, segment_ids,
               causal, chunk_size) -> DeltaCall:
    if not isinstance(causal, bool) or not causal:
        raise ValueError(f"causal: the delta rule is a causal recurrence (a state update needs an order); "
                         f"expected causal=True, got {causal!r}")
    problem = validate(mechanism, q, k, v, log_g, gate_name="log_g", allow_vector_gate=False,
                       initial_state=initial_state, segment_ids=segment_ids, causal=True)
    check_float_array("beta", beta)
    if beta.shape != (problem.B, problem.T, problem.H):
        raise ValueError(f"beta: expected shape [B, T, H] = {[problem.B, problem.T, problem.H]}, "
                         f"got {shape_str(beta)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 16 \
            or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: expected a power of two >= 16, got {chunk_size!r}")
    return DeltaCall(problem, default_scale(scale, problem.Dk), chunk_size, bool(return_final_state))


def delta_rule(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B T K Dk"], v: Float[ArrayLike, "B T K Dv"],
               beta: Float[ArrayLike, "B T H"], *, scale: float | None = None, initial_state: InitialState = None,
               return_final_state: bool = False, segment_ids: SegmentIds = None, causal: bool = True, impl="auto",
               chunk_size: int = DEFAULT_CHUNK) -> RecurrentOutput:
    """DeltaNet: ``o, final_state = delta_rule(q, k, v, beta)`` (see the module docstring).

    ``q: [B, T, H, Dk]``, ``k: [B, T, K, Dk]`` (L2-normalised by the caller), ``v: [B, T, K, Dv]``,
    ``beta: [B, T, H]`` write strengths in ``(0, 1)``; ``initial_state: [B, H, Dk, Dv]``;
    ``segment_ids``: int ``[B, T]`` (0 = padding).  Returns ``o`` in q's dtype and the float32
    final state (``None`` unless ``return_final_state``).
    """
    call = _make_call("delta_rule", q, k, v, beta, None, scale=scale, initial_state=initial_state,
                      return_final_state=return_final_state, segment_ids=segment_ids, causal=causal,
                      chunk_size=chunk_size)
    return DELTA.call(impl, call, q, k, v, beta, None, initial_state, segment_ids)


def gated_delta_rule(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B T K Dk"], v: Float[ArrayLike, "B T K Dv"],
                     beta: Float[ArrayLike, "B T H"], log_g: Float[ArrayLike, "B T H"], *,
                     scale: float | None = None, initial_state: InitialState = None, return_final_state: bool = False,
                     segment_ids: SegmentIds = None, causal: bool = True, impl="auto",
                     chunk_size: int = DEFAULT_CHUNK) -> RecurrentOutput:
    """Gated DeltaNet: as :func:`delta_rule` with per-head log decays ``log_g: [B, T, H]`` (``<= 0``)."""
    call = _make_call("gated_delta_rule", q, k, v, beta, log_g, scale=scale, initial_state=initial_state,
                      return_final_state=return_final_state, segment_ids=segment_ids, causal=causal,
                      chunk_size=chunk_size)
    checks.check_log_gates("log_g", log_g, segment_ids)
    return DELTA.call(impl, call, q, k, v, beta, log_g, initial_state, segment_ids)


def explain_delta_rule(q, k, v, beta, log_g=None, *, impl="auto", platform=None, scale=None,
                       initial_state=None, return_final_state=False, segment_ids=None, causal=True,
                       chunk_size=DEFAULT_CHUNK):
    """The dispatch decision (and every reason) for a :func:`delta_rule` / :func:`gated_delta_rule` call."""
    call = _make_call("delta_rule" if log_g is None else "gated_delta_rule", q, k, v, beta, log_g,
                      scale=scale, initial_state=initial_state, return_final_state=return_final_state,
                      segment_ids=segment_ids, causal=causal, chunk_size=chunk_size)
    return DELTA.explain(impl, call, platform)


register_explainer(delta_rule, explain_delta_rule)         # aj.explain(delta_rule, q, k, v, beta)
register_explainer(gated_delta_rule, explain_delta_rule)   # aj.explain(gated_delta_rule, q, k, v, beta, log_g)


# ----------------------------------------------------------------------------- declarations
from attn_jax.core import recipe  # noqa: E402
from attn_jax.core.declaration import Declaration, Paper, Parity, declare  # noqa: E402
from attn_jax.linear.parity import gated_call  # noqa: E402

_SCHLAG = Paper("Linear Transformers Are Secretly Fast Weight Programmers", 2021, "2102.11174", "Schlag et al.")
_DELTANET_PROJECTIONS = recipe.Projections(qk_activation="silu", v_activation="silu", qk_l2=True, short_conv=True)

DELTANET = declare(Declaration(
    name="deltanet", family="linear", title="DeltaNet (delta rule, WY/UT chunking)",
    papers=(_SCHLAG, Paper("Parallelizing Linear Transformers with the Delta Rule over Sequence Length", 2024,
                           "2406.06484", "Yang et al.")),
    summary="S_t = S_{t-1} (I - β_t k_tᵀ k_t) + β_t k_tᵀ v_t, o_t = scale q_t S_t; layer: q, k through ShortConv + "
            "SiLU + L2, β = sigmoid(x W_β), y = (RMSNorm_head(o) ⊙ swish(x W_g)) W_O",
    op=delta_rule, forms=("chunk", "parallel", "recurrent"), directions=("causal",),
    parity=Parity(gated_call(delta_rule, "beta", normalize_keys=True), notes="keys L2-normalised by the caller"),
    layer=recipe.LinearLayer(recipe.DeltaRule(), _DELTANET_PROJECTIONS, write_strength=recipe.WriteStrength(),
                             output_gate=recipe.OutputGate("swish"), output_norm=recipe.OutputNorm("rms_head")),
    notes="the Gated DeltaNet block's output gate (fla's DeltaNet has none: output_gate=False)"))

GATED_DELTANET = declare(Declaration(
    name="gated_deltanet", family="linear", title="Gated DeltaNet",
    papers=(Paper("Gated Delta Networks: Improving Mamba2 with Delta Rule", 2024, "2412.06464",
                  "Yang, Kautz, Hatamizadeh"),),
    summary="S_t = α_t S_{t-1} (I - β_t k_tᵀ k_t) + β_t k_tᵀ v_t with Mamba-2's decay "
            "log α = -exp(A_log) softplus(x W_a + dt_bias); layer as DeltaNet",
    op=gated_delta_rule, forms=("chunk", "parallel", "recurrent"), directions=("causal",),
    parity=Parity(gated_call(gated_delta_rule, "beta", "log_g_scalar", normalize_keys=True)),
    layer=recipe.LinearLayer(recipe.DeltaRule(), _DELTANET_PROJECTIONS, decay=recipe.DeltaGate(),
                             write_strength=recipe.WriteStrength(), output_gate=recipe.OutputGate("swish"),
                             output_norm=recipe.OutputNorm("rms_head"))))
