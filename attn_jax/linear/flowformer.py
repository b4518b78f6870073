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
``j <= i``, and, since a prefix holds ``t`` tokens (``t = i + 1``), the flows are rescaled by
the token count ("approximate normal conservation"):

    I_i = φq_i·Σ_{j≤i} φk_j,  O_j = φk_j·Σ_{i≤j} φq_i
    Î_i = φq_i·Σ_{j≤i} φk_j (t_j/O_j) / t_i,   Ô_j = φk_j·Σ_{i≤j} φq_i (t_i/I_i) / t_j
    competition  c_j = t_j · exp(Ô_j) / Σ_{l≤j} exp(Ô_l)
    o_i = sigmoid(Î_i) · (φq_i / I_i) · Σ_{j≤i} φk_jᵀ (c_j v_j)

Deviations from the code, named: (1) the code adds ``eps`` inside every flow
(``(φq + eps)·(Σφk + eps)``); we add ``eps`` to the denominators ``I`` and ``O`` only;
(2) the code clamps ``Ô`` to ``[-1, 1]`` "for stability"; we do not — the softmax (and the causal
``exp/Σexp``, computed with a running log-sum-exp) is shift-invariant and stable without it.
The main sum ``Σ φk_jᵀ V̂_j`` runs on the linear-attention engine (causal) or as two einsums
(non-causal; ``S != T`` allowed).  GQA: k/v heads are expanded to the query heads (flows are per
query head).  No packed segments.  Float32 compute (float64 stays float64), output in q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attn_jax.core.validation import check_qkv
from attn_jax.linear.common import expand_kv_heads
from attn_jax.linear.gated import gated_linear_attention

__all__ = ["flow_attention", "flow_attention_reference"]


def _prepare(q, k, v, causal, eps):
    dims = check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    if causal and dims.S != dims.T:
        raise ValueError(f"k: causal flow attention needs S == T = {dims.T}, got S = {dims.S}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps: expected a non-negative Python float, got {eps!r}")
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    fq = jax.nn.sigmoid(q.astype(dt))
    fk = jax.nn.sigmoid(expand_kv_heads(k, dims.H).astype(dt))
    return dims, fq, fk, expand_kv_heads(v, dims.H).astype(dt)


def flow_attention(q: Float[Array, "B T H D"], k: Float[Array, "B S K D"], v: Float[Array, "B S K Dv"], *,
                   causal: bool = False, eps: float = 1e-6, impl="auto"):
    """Flow-Attention (arXiv:2202.06258); see the module docstring.  ``impl``: engine form (causal)."""
    dims, fq, fk, v = _prepare(q, k, v, causal, eps)
    if not causal:
        n, m = dims.T, dims.S
        sum_k, sum_q = fk.sum(1, keepdims=True), fq.sum(1, keepdims=True)        # [B, 1, H, D]
        inc = jnp.sum(fq * sum_k, -1) + eps                                       # I: [B, T, H]
        out = jnp.sum(fk * sum_q, -1) + eps                                       # O: [B, S, H]
        cons_sink = jnp.sum(fq * jnp.sum(fk / out[..., None], 1, keepdims=True), -1)
        cons_src = jnp.sum(fk * jnp.sum(fq / inc[..., None], 1, keepdims=True), -1)
        alloc = jax.nn.sigmoid(cons_sink * (n / m))
        comp = jax.nn.softmax(cons_src, axis=1) * m
        kv = jnp.einsum("bshd,bshv->bhdv", fk, v * comp[..., None])
        o = jnp.einsum("bthd,bhdv->bthv", fq / inc[..., None], kv) * alloc[..., None]
        return o.astype(q.dtype)
    t = jnp.arange(1, dims.T + 1, dtype=fq.dtype)[None, :, None]                 # tokens in the prefix
    inc = jnp.sum(fq * jnp.cumsum(fk, 1), -1) + eps
    out = jnp.sum(fk * jnp.cumsum(fq, 1), -1) + eps
    cons_sink = jnp.sum(fq * jnp.cumsum(fk * (t / out)[..., None], 1), -1) / t
    cons_src = jnp.sum(fk * jnp.cumsum(fq * (t / inc)[..., None], 1), -1) / t
    alloc = jax.nn.sigmoid(cons_sink)
    comp = jnp.exp(cons_src - lax.cumlogsumexp(cons_src, axis=1)) * t
    o, _ = gated_linear_attention(fq / inc[..., None], fk, v * comp[..., None], None, scale=1.0, causal=True,
                                  impl=impl, mechanism="flow_attention")
    return (o * alloc[..., None]).astype(q.dtype)


def flow_attention_reference(q, k, v, *, causal: bool = False, eps: float = 1e-6):
    """The equations written densely with an explicit ``[T, S]`` visibility matrix ``M``."""
    dims, fq, fk, v = _prepare(q, k, v, causal, eps)
    T, S = dims.T, dims.S
    M = jnp.tril(jnp.ones((T, S), fq.dtype)) if causal else jnp.ones((T, S), fq.dtype)
    P = jnp.einsum("bihd,bjhd->bhij", fq, fk)                                     # φq_i·φk_j
    inc = jnp.einsum("bhij,ij->bhi", P, M) + eps                                   # [B, H, T]
    # a source's outgoing flow sums over the queries up to it (causal: i <= j, the code's prefix sum)
    out = jnp.einsum("bhij,ji->bhj", P, M.T if not causal else M) + eps             # [B, H, S]
    if causal:
        t = jnp.arange(1, T + 1, dtype=fq.dtype)
        cons_sink = jnp.einsum("bhij,ij,bhj->bhi", P, M, t / out) / t
        cons_src = jnp.einsum("bhij,ji,bhi->bhj", P, M, t / inc) / t
        alloc = jax.nn.sigmoid(cons_sink)
        e = jnp.exp(cons_src)
        comp = e / jnp.einsum("bhl,jl->bhj", e, M) * t                         # Σ_{l ≤ j} exp(Ô_l)
    else:
        cons_sink = jnp.einsum("bhij,bhj->bhi", P, 1.0 / out)
        cons_src = jnp.einsum("bhij,bhi->bhj", P, 1.0 / inc)
        alloc = jax.nn.sigmoid(cons_sink * (T / S))
        comp = jax.nn.softmax(cons_src, axis=-1) * S
    A = P * M / inc[..., None]
    o = jnp.einsum("bhij,bjhv->bihv", A, v * jnp.moveaxis(comp, 1, 2)[..., None])
    return (o * jnp.moveaxis(alloc, 1, 2)[..., None]).astype(q.dtype)
