"""Lightning Attention (1 and 2): causal linear attention by intra-/inter-block tiling.

Qin, Sun, Li, Shen, Sun, Zhong, "Various Lengths, Constant Speed: Efficient Language Modeling
with Lightning Attention", 2024, arXiv:2405.17381, and Qin et al., "Lightning Attention-2: A
Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models", 2024,
arXiv:2401.04658.  With per-head decay ``λ`` (TransNormerLLM's decayed linear attention)::

    O_intra = [(Q_i K_i^T) ⊙ M] V_i,   M_ts = λ^{t-s} (t >= s)
    O_inter = Λ Q_i (KV),              KV <- λ^B KV + (λ^{B-s} K_i)^T V_i

which is exactly the ``"chunk"`` form of :mod:`attn_jax.linear.gated` with a scalar gate
``log λ`` per head (``decays=None`` gives Lightning-1, no decay).  The default decays are
TransNormerLLM's: ``λ_h = exp(-s_h)`` with ``s_h`` the ALiBi slopes of ``H`` heads, optionally
multiplied by the per-layer factor ``1 - l / (L - 1)`` (``layer_scale``).  No softmax scale
(``scale=1``) as in TransNormerLLM; the layer normalises the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from attn_jax.core.array_types import ArrayLike, Float, InitialState, RecurrentOutput, SegmentIds
from attn_jax.linear.common import fixed_decay_log_gates
from attn_jax.linear.gated import DEFAULT_CHUNK, gated_linear_attention
from attn_jax.positional.alibi import alibi_slopes

__all__ = ["lightning_attention", "lightning_decays"]


def lightning_decays(num_heads: int, layer_scale: float = 1.0) -> np.ndarray:
    """``λ_h = exp(-slope_h * layer_scale)`` with ALiBi slopes (TransNormerLLM's default)."""
    with jax.ensure_compile_time_eval():  # static per-head constants, also under jit
        slopes = np.asarray(alibi_slopes(num_heads), np.float64)
    return np.exp(-slopes * float(layer_scale))


def lightning_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B T K Dk"],
                        v: Float[ArrayLike, "B T K Dv"], *,
                        decays: str | Float[ArrayLike, " H"] | Sequence[float] | None = "transnormer", scale: float | None = 1.0,
                        initial_state: InitialState = None, return_final_state: bool = False,
                        segment_ids: SegmentIds = None, impl="auto",
                        chunk_size: int = DEFAULT_CHUNK) -> RecurrentOutput:
    """``o, state = lightning_attention(q, k, v)``.

    ``decays``: ``"transnormer"`` (default, :func:`lightning_decays`), ``None`` (Lightning-1: no
    decay) or ``[H]`` values in ``(0, 1]``.
    """
    if decays is None:
        log_g = None
    else:
        lam = lightning_decays(q.shape[2]) if isinstance(decays, str) and decays == "transnormer" else decays
        if isinstance(lam, str):
            raise ValueError(f"decays: expected 'transnormer', None or [H] values, got {decays!r}")
        log_g = fixed_decay_log_gates(lam, q)
    return gated_linear_attention(q, k, v, log_g, scale=scale, initial_state=initial_state,
                                  return_final_state=return_final_state, segment_ids=segment_ids, impl=impl,
                                  chunk_size=chunk_size, mechanism="lightning", gate_name="decays")


# ----------------------------------------------------------------------------- declaration
from attn_jax.core import recipe  # noqa: E402
from attn_jax.core.declaration import Declaration, Paper, Parity, declare  # noqa: E402
from attn_jax.linear.parity import gated_call  # noqa: E402

DECLARATION = declare(Declaration(
    name="lightning", family="linear", title="Lightning attention 1/2 (intra/inter-block tiling)",
    papers=(Paper("Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language "
                  "Models", 2024, "2401.04658", "Qin et al."),
            Paper("TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer", 2023,
                  "2307.14995", "Qin et al.")),
    summary="S_t = λ_h S_{t-1} + k_tᵀ v_t, λ_h = exp(-slope_h) (ALiBi slopes), no scale; layer (TransNormerLLM "
            "§3.2): q, k = SiLU(x W), y = (SRMSNorm(o) ⊙ x W_U) W_O",
    op=lightning_attention, forms=("chunk", "parallel", "recurrent"), directions=("causal",),
    parity=Parity(gated_call(lightning_attention), kernel_gate="scalar"),
    layer=recipe.LinearLayer(recipe.GatedRule(), recipe.Projections(qk_activation="silu", scale="one"),
                             decay=recipe.FixedDecay(lightning_decays), output_gate=recipe.OutputGate("linear"),
                             output_norm=recipe.OutputNorm("srms_all"))))
