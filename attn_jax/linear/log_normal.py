"""Linear Log-Normal (LLN) attention.

Nahshan, Kampeas & Haleva, "Linear Log-Normal Attention with Unbiased Concentration", 2023
(ICLR 2024), arXiv:2311.13541: linear attention with exponential feature maps

    Φ_Q(q) = exp(α q),   Φ_K(k) = exp(β k)          (elementwise)
    o_i = Σ_j Φ_Q(q_i)·Φ_K(k_j) v_j / Σ_j Φ_Q(q_i)·Φ_K(k_j)

whose attention entries are log-normal, like those of softmax attention.  α and β are chosen by
moment matching: for Gaussian q, k with per-entry standard deviations σ_q, σ_k, the log of the
softmax attention entries has variance σ²_SM = σ_q² σ_k² (logits ``q·k/√d``), while the log of
the LLN entries has variance ≈ ``2a σ̃² + b`` with ``σ̃ = α σ_q = β σ_k`` and constants ``a, b``
fitted by the authors.  Equating the two:

    σ̃² = (σ_q² σ_k² − b) / (2a),   α = σ̃ / σ_q,   β = σ̃ / σ_k
    a = 0.14855178144710912,  b = −0.35487039130661086

(the constants and this formula are those of a public LLN implementation, ``LLNAttention``; the
paper's text could not be consulted here to confirm the digits).

:func:`lln_moment_matching` gives ``(α, β)``.  :func:`log_normal_attention` estimates σ_q, σ_k
from the batch (standard deviation over every valid entry, gradient stopped, as that implementation
does under ``no_grad``) unless ``alpha``/``beta`` are given.  **Causality caveat**: batch
statistics include future tokens; for a strictly causal model (and for decoding) pass fixed
``alpha`` and ``beta``.

Numerics: ``exp(α q_i − max_f α q_if)`` per query (a per-token factor that cancels in the
normalised ratio) and, non-causal only, ``exp(β k − max β k)`` with the max over the row's
valid keys (a per-row factor, also cancelling).  The causal form does not shift keys (a shift
depending on future keys would break causality and decode consistency).  Up to ``eps`` the
output equals the unshifted formula.  The op is :func:`attn_jax.linear.linear_attention` with
this feature-map pair; the block-diagonal softmax term of the paper's "LLN+Diag" variant is not
included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attn_jax.core.validation import check_qkv
from attn_jax.linear.common import segment_layout
from attn_jax.linear.gated import DEFAULT_CHUNK
from attn_jax.linear.linear_attention import linear_attention, linear_attention_reference

__all__ = ["log_normal_attention", "log_normal_attention_reference", "lln_moment_matching", "LLN_A", "LLN_B"]

LLN_A = 0.14855178144710912
LLN_B = -0.35487039130661086


def lln_moment_matching(sigma_q, sigma_k):
    """``(α, β)`` from the entry standard deviations of q and k (module docstring)."""
    sig_t = jnp.sqrt((sigma_q ** 2 * sigma_k ** 2 - LLN_B) / (2 * LLN_A))
    return sig_t / sigma_q, sig_t / sigma_k


def _std(x, valid):
    w = jnp.broadcast_to(valid[:, :, None, None], x.shape).astype(x.dtype)
    n = jnp.maximum(w.sum(), 1.0)
    mean = jnp.sum(x * w) / n
    return jnp.sqrt(jnp.sum(w * (x - mean) ** 2) / n)


def _alpha_beta(q, k, alpha, beta, segment_ids):
    for name, val in (("alpha", alpha), ("beta", beta)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float)) or not val > 0):
            raise ValueError(f"{name}: expected a positive Python float or None, got {val!r}")
    if (alpha is None) != (beta is None):
        raise ValueError("alpha, beta: give both or neither (neither = moment matching on the batch)")
    if alpha is not None:
        return float(alpha), float(beta)
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    valid = segment_layout(segment_ids, q.shape[0], q.shape[1]).valid
    qz = jnp.where(valid[:, :, None, None], q.astype(dt), 0.0)
    kz = jnp.where(valid[:, :, None, None], k.astype(dt), 0.0)
    a, b = lln_moment_matching(_std(qz, valid), _std(kz, valid))
    return jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)


def log_normal_attention(q: Float[Array, "B T H D"], k: Float[Array, "B T K D"], v: Float[Array, "B T K Dv"], *,
                         alpha: float | None = None, beta: float | None = None, causal: bool = True,
                         eps: float = 1e-6, segment_ids: Int[Array, "B T"] | None = None, initial_state=None,
                         return_final_state: bool = False, impl="auto", chunk_size: int = DEFAULT_CHUNK):
    """LLN attention (arXiv:2311.13541); returns ``(o, state)`` as :func:`linear_attention`.

    ``state``: ``[B, H, D, Dv + 1]`` (normaliser in the last column), only with fixed
    ``alpha``/``beta`` is it meaningful across calls.
    """
    check_qkv(q, k, v)
    a, b = _alpha_beta(q, k, alpha, beta, segment_ids)
    valid = segment_layout(segment_ids, q.shape[0], q.shape[1]).valid[:, :, None, None]

    def phi_q(x):
        z = a * x.astype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)
        return jnp.exp(z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True)))

    def phi_k(x):
        z = b * x.astype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)
        if causal:
            return jnp.exp(z)
        zv = jnp.where(valid, z, -jnp.inf)
        shift = jax.lax.stop_gradient(jnp.max(zv, axis=(1, 3), keepdims=True))          # [B, 1, K, 1]
        return jnp.exp(jnp.where(valid, z - jnp.where(jnp.isfinite(shift), shift, 0.0), -jnp.inf))

    return linear_attention(q, k, v, feature_map=(phi_q, phi_k), normalize=True, eps=eps, scale=1.0,
                            causal=causal, initial_state=initial_state, return_final_state=return_final_state,
                            segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)


def log_normal_attention_reference(q, k, v, *, alpha=None, beta=None, causal: bool = True, eps: float = 1e-6,
                                   segment_ids=None):
    """The unshifted formula, quadratic (via :func:`linear_attention_reference`)."""
    check_qkv(q, k, v)
    a, b = _alpha_beta(q, k, alpha, beta, segment_ids)
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    o, _ = linear_attention_reference(q, k, v, feature_map=(lambda x: jnp.exp(a * x.astype(dt)),
                                                            lambda x: jnp.exp(b * x.astype(dt))),
                                      normalize=True, eps=eps, scale=1.0, causal=causal, segment_ids=segment_ids)
    return o


# ----------------------------------------------------------------------------- declaration
from attn_jax.core import recipe  # noqa: E402
from attn_jax.core.declaration import Declaration, Paper, Parity, declare  # noqa: E402
from attn_jax.linear.parity import feature_state, first  # noqa: E402


def _parity(impl, x, *, causal=True, segment_ids=None, initial_state=None):
    kw = dict(alpha=0.4, beta=0.4, causal=causal, segment_ids=segment_ids, eps=1e-15)  # the fast form shifts φ by its max, which rescales eps
    h0 = None if initial_state is None else feature_state(initial_state, x["q"].shape[-1])
    if impl == "reference":
        if h0 is None:
            return first(log_normal_attention_reference(x["q"], x["k"], x["v"], **kw))
        # log_normal_attention_reference has no initial_state: the same unshifted formula through
        # the dense linear-attention reference, which folds the state in explicitly
        return first(linear_attention_reference(
            x["q"], x["k"], x["v"], feature_map=(lambda z: jnp.exp(0.4 * z), lambda z: jnp.exp(0.4 * z)),
            normalize=True, eps=1e-15, scale=1.0, causal=causal, segment_ids=segment_ids, initial_state=h0))
    return first(log_normal_attention(x["q"], x["k"], x["v"], impl=impl, initial_state=h0, **kw))


DECLARATION = declare(Declaration(
    name="lln", family="linear", title="Linear log-normal attention",
    papers=(Paper("Linear Log-Normal Attention with Unbiased Concentration", 2023, "2311.13541", "Nahshan et al."),),
    summary="o_i = Σ_j exp(α q_i)·exp(β k_j) v_j / Σ_j exp(α q_i)·exp(β k_j), α, β by moment matching",
    op=log_normal_attention, forms=("chunk", "parallel", "recurrent"), directions=("causal", "bidirectional"),
    parity=Parity(_parity, notes="fixed alpha, beta (the mixer: RMS-normalised q, k and the unit-variance moment "
                                 "match)"),
    layer=recipe.LinearLayer(recipe.NormalizedRule(),
                             recipe.Projections(qk_activation="identity", v_activation="identity", scale="one"),
                             features=recipe.LogNormalMap()),
    notes="the layer RMS-normalises q, k per head and uses the fixed lln_moment_matching(1, 1) (causal, "
          "decode-consistent); no LLN+Diag term"))
