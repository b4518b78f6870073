"""Scalar data-dependent per-head decay: the state-space-duality (SSD) form of Mamba-2.

Dao, Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured
State Space Duality", 2024, arXiv:2405.21060.  With a scalar ``A`` per head (§3-§6)::

    h_t = a_t h_{t-1} + B_t^T x_t,     y_t = C_t h_t,     a_t = exp(Δ_t A) ∈ (0, 1)

i.e. masked attention ``Y = (C B^T ⊙ L) X`` with the 1-semiseparable mask
``L_ts = a_{s+1} ... a_t``.  In attention notation ``C -> q``, ``B -> k``, ``x -> v`` (Mamba-2
feeds ``Δ_t x_t`` as the value; the layer does that) and ``log_g = Δ A`` is the ``[B, T, H]``
log decay.  No softmax scale (``scale=1``).  Forms and dispatch: :mod:`attn_jax.linear.gated`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn_jax.core.array_types import ArrayLike, Float, InitialState, RecurrentOutput, SegmentIds
from attn_jax.linear.gated import DEFAULT_CHUNK, gated_linear_attention

__all__ = ["ssd", "ssd_log_decay"]


def ssd_log_decay(dt_logits: Float[ArrayLike, "B T H"], A_log: Float[ArrayLike, " H"], *,
                  dt_bias: Float[ArrayLike, " H"] | None = None) -> Float[jax.Array, "B T H"]:
    """Mamba-2's ``log a_t = Δ_t A`` with ``Δ = softplus(dt_logits + dt_bias)``, ``A = -exp(A_log)``.

    ``dt_logits: [B, T, H]``, ``A_log: [H]``; returns float32 ``[B, T, H]`` (``<= 0``).
    """
    dt = dt_logits.astype(jnp.float32) + (0.0 if dt_bias is None else dt_bias.astype(jnp.float32))
    return jax.nn.softplus(dt) * -jnp.exp(A_log.astype(jnp.float32))


def ssd(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B T K Dk"], v: Float[ArrayLike, "B T K Dv"],
        log_g: Float[ArrayLike, "B T H"], *, scale: float | None = 1.0, initial_state: InitialState = None,
        return_final_state: bool = False, segment_ids: SegmentIds = None, impl="auto",
        chunk_size: int = DEFAULT_CHUNK) -> RecurrentOutput:
    """``o, state = ssd(C, B, X, log_g)`` with ``log_g: [B, T, H]`` (one decay per head and token)."""
    if log_g is None:
        raise ValueError("log_g: SSD needs per-head log decays [B, T, H]")
    return gated_linear_attention(q, k, v, log_g, scale=scale, initial_state=initial_state,
                                  return_final_state=return_final_state, segment_ids=segment_ids, impl=impl,
                                  chunk_size=chunk_size, mechanism="ssd", gate_name="log_g", allow_vector_gate=False)


# ----------------------------------------------------------------------------- declaration
from attn_jax.core import recipe  # noqa: E402
from attn_jax.core.declaration import Declaration, Paper, Parity, declare  # noqa: E402
from attn_jax.linear.parity import gated_call  # noqa: E402

DECLARATION = declare(Declaration(
    name="ssd", family="linear", title="Scalar data-dependent decay (Mamba-2 SSD)",
    papers=(Paper("Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State "
                  "Space Duality", 2024, "2405.21060", "Dao & Gu"),),
    summary="S_t = a_t S_{t-1} + B_tᵀ x_t, y_t = C_t S_t with log a_t = Δ_t A per head; layer: C, B, x through "
            "ShortConv + SiLU, Δ = softplus(x W_Δ + dt_bias), value Δ x, D skip, y = RMSNorm(o ⊙ SiLU(x W_z)) W_O",
    op=ssd, forms=("chunk", "parallel", "recurrent"), directions=("causal",),
    parity=Parity(gated_call(ssd, "log_g_scalar"), kernel_gate="scalar"),
    layer=recipe.LinearLayer(recipe.GatedRule(),
                             recipe.Projections(qk_activation="silu", v_activation="silu", scale="one",
                                                short_conv=True),
                             decay=recipe.DeltaGate(scale_values=True), output_gate=recipe.OutputGate("swish"),
                             output_norm=recipe.OutputNorm("rms_all", gated=True)),
    notes="not the full Mamba block: no expansion/MLP; q/k have heads instead of shared B/C groups"))
