"""RetNet retention: multi-scale, fixed per-head exponential decay.

Sun, Dong, Huang, Ma, Xia, Xue, Wang, Wei, "Retentive Network: A Successor to Transformer for
Large Language Models", 2023, arXiv:2307.08621.  Eq. (5)-(8): the parallel form
``Retention(X) = (Q K^T ⊙ D) V`` with ``D_nm = γ^{n-m}`` for ``n >= m`` (0 otherwise), the
recurrent form ``S_n = γ S_{n-1} + K_n^T V_n``, ``o_n = Q_n S_n``, and the chunkwise form; the
multi-scale heads use ``γ_h = 1 - 2^{-5-h}`` for ``h = 0..H-1`` (§2.2).  The ``xPos`` rotation
and the GroupNorm / swish gate of the full layer live in the mixer
(:mod:`attn_jax.nn.linear_mixers`); the scale follows the paper's ``K / sqrt(d)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attn_jax.core.array_types import ArrayLike, Float, InitialState, RecurrentOutput, SegmentIds
from attn_jax.linear.common import fixed_decay_log_gates
from attn_jax.linear.gated import DEFAULT_CHUNK, gated_linear_attention

__all__ = ["retention", "retnet_decays"]


def retnet_decays(num_heads: int) -> np.ndarray:
    """``γ_h = 1 - 2^{-5-h}`` (float64 numpy, one per head)."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    return 1.0 - 2.0 ** (-5.0 - np.arange(num_heads, dtype=np.float64))


def retention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B T K Dk"], v: Float[ArrayLike, "B T K Dv"], *,
              decays: Float[ArrayLike, " H"] | Sequence[float] | None = None, scale: float | None = None,
              initial_state: InitialState = None, return_final_state: bool = False, segment_ids: SegmentIds = None,
              impl="auto", chunk_size: int = DEFAULT_CHUNK) -> RecurrentOutput:
    """``o, state = retention(q, k, v)`` with per-head decays ``γ`` (default :func:`retnet_decays`).

    ``decays``: ``[H]`` values in ``(0, 1]``.
    """
    log_g = fixed_decay_log_gates(retnet_decays(q.shape[2]) if decays is None else decays, q)
    return gated_linear_attention(q, k, v, log_g, scale=scale, initial_state=initial_state,
                                  return_final_state=return_final_state, segment_ids=segment_ids, impl=impl,
                                  chunk_size=chunk_size, mechanism="retention", gate_name="decays")


# ----------------------------------------------------------------------------- declaration
from attn_jax.core import recipe  # noqa: E402
from attn_jax.core.declaration import Declaration, Paper, Parity, declare  # noqa: E402
from attn_jax.linear.parity import gated_call  # noqa: E402

DECLARATION = declare(Declaration(
    name="retnet", family="linear", title="RetNet retention (multi-scale decay)",
    papers=(Paper("Retentive Network: A Successor to Transformer for Large Language Models", 2023, "2307.08621",
                  "Sun et al."),),
    summary="S_t = γ_h S_{t-1} + k_tᵀ v_t with γ_h = 1 - 2^{-5-h}, o_t = q_t S_t / sqrt(Dk); layer (§2.2-2.3): "
            "y = (swish(x W_G) ⊙ GroupNorm_H(o)) W_O",
    op=retention, forms=("chunk", "parallel", "recurrent"), directions=("causal",),
    parity=Parity(gated_call(retention), kernel_gate="scalar"),
    layer=recipe.LinearLayer(recipe.GatedRule(), decay=recipe.FixedDecay(retnet_decays),
                             output_gate=recipe.OutputGate("swish"), output_norm=recipe.OutputNorm("group")),
    notes="no xPos rotation of q/k and no retention score normalisation (GroupNorm cancels it up to eps)"))
