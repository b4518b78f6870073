"""Gated Linear Attention (GLA): data-dependent vector forget gates.

Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with Hardware-Efficient
Training", 2023, arXiv:2312.06635.  Eq. (3) of the paper, in log space:

    S_t = diag(α_t) S_{t-1} + k_t^T v_t,      α_t = exp(log_g_t) ∈ (0, 1]^{Dk}
    o_t = scale * q_t S_t

The paper parameterises ``α_t = sigmoid(x_t W_α1 W_α2 + b)^{1/τ}`` with ``τ = 16``; the layer
(:mod:`attn_jax.nn.linear_mixers`) computes ``log_g = log_sigmoid(·) / τ`` and this op takes the
log gates directly.  Forms and dispatch: :mod:`attn_jax.linear.gated` (chunk = the paper's
chunkwise form with secondary chunking, §4.2; Pallas kernel on GPU/TPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn_jax.core.array_types import ArrayLike, Float, InitialState, RecurrentOutput, SegmentIds
from attn_jax.core.dispatch import register_explainer
from attn_jax.linear.gated import DEFAULT_CHUNK, explain_gated, gated_linear_attention

__all__ = ["gla", "gla_log_gates"]


def gla(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B T K Dk"], v: Float[ArrayLike, "B T K Dv"],
        log_g: Float[ArrayLike, "B T H *gate_dim"], *, scale: float | None = None,
        initial_state: InitialState = None, return_final_state: bool = False, segment_ids: SegmentIds = None,
        impl="auto", chunk_size: int = DEFAULT_CHUNK) -> RecurrentOutput:
    """``o, state = gla(q, k, v, log_g)``; ``log_g: [B, T, H, Dk]`` (or ``[B, T, H]``) log forget gates.

    ``q: [B, T, H, Dk]``, ``k: [B, T, K, Dk]``, ``v: [B, T, K, Dv]``; state float32 ``[B, H, Dk, Dv]``.
    """
    if log_g is None:
        raise ValueError("log_g: GLA needs forget gates ([B, T, H, Dk] log-space); use linear_attention for none")
    return gated_linear_attention(q, k, v, log_g, scale=scale, initial_state=initial_state,
                                  return_final_state=return_final_state, segment_ids=segment_ids, impl=impl,
                                  chunk_size=chunk_size, mechanism="gla")


def _explain_gla(q, k, v, log_g, *, platform=None, **kw):
    return explain_gated(q, k, v, log_g, mechanism="gla", platform=platform, **kw)


register_explainer(gla, _explain_gla)   # aj.explain(aj.linear.gla, q, k, v, log_g)


def gla_log_gates(gate_logits: Float[ArrayLike, "*shape"], *, temperature: float = 16.0) -> Float[jax.Array, "*shape"]:
    """The paper's gate ``α = sigmoid(logits)^{1/τ}`` in log space: ``log_sigmoid(logits) / τ`` (float32)."""
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    return jax.nn.log_sigmoid(gate_logits.astype(jnp.float32)) / temperature


# ----------------------------------------------------------------------------- declaration
from attn_jax.core import recipe  # noqa: E402
from attn_jax.core.declaration import Declaration, Paper, Parity, declare  # noqa: E402
from attn_jax.linear.parity import gated_call  # noqa: E402

DECLARATION = declare(Declaration(
    name="gla", family="linear", title="GLA (vector gates, secondary chunking)",
    papers=(Paper("Gated Linear Attention Transformers with Hardware-Efficient Training", 2023, "2312.06635",
                  "Yang et al."),),
    summary="S_t = diag(exp(log_g_t)) S_{t-1} + k_tᵀ v_t, o_t = scale q_t S_t; layer (§4.4): "
            "log_g = log_sigmoid(x W_1 W_2 + b) / 16 (rank 16), Dk = d / 2H, y = (swish(x W_r) ⊙ RMSNorm_head(o)) W_O",
    op=gla, forms=("chunk", "parallel", "recurrent"), directions=("causal",),
    parity=Parity(gated_call(gla, "log_g"), kernel_gate="vector"),
    layer=recipe.LinearLayer(recipe.GatedRule(), recipe.Projections(expand_k=0.5),
                             decay=recipe.LowRankGate(rank=16, temperature=16.0),
                             output_gate=recipe.OutputGate("swish"), output_norm=recipe.OutputNorm("rms_head")),
    notes="fla's RMSNorm in place of the paper's LayerNorm"))
