"""Low-rank additive attention biases folded into the queries and keys (FlashBias).

Paper: Wu, Guo, Ma, Sun, Wang, Matusik, Long, "FlashBias: Fast Computation of Attention with
Bias", 2025, arXiv:2505.12044.  A bias of rank ``r``, ``B = U Vᵀ`` (``U: T x r``, ``V: S x r``
per head), is computed by the attention matmul itself::

    softmax(scale q kᵀ + U Vᵀ) = softmax(scale [q, U / scale] [k, V]ᵀ)

so a fused kernel runs ``Dk + r`` channels and never reads a ``T x S`` bias
(:class:`attn_jax.core.bias.LowRankBias`; ``aj.attention(q, k, v, bias=LowRankBias(u, v))`` folds
it before dispatch, so every backend serves it).  Exact when the bias is exactly rank ``r``:

* causal ALiBi: ``-m_h (i' - j) = [-m_h i', m_h] · [1, j]`` (``i'`` the query's absolute
  position) is rank 2 under the causal mask (:func:`alibi_factors`; the symmetric non-causal
  ``-m_h |i' - j|`` is not low-rank, so these factors are for causal attention only);
* any other bias approximately, through a truncated SVD (:func:`low_rank_factors`), which also
  returns the relative Frobenius error of the approximation: report it, as the paper does for
  the biases that are only approximately low-rank (e.g. T5 buckets).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.core.array_types import ArrayLike
from attn_jax.core.bias import LowRankBias
from attn_jax.core.validation import shape_str

__all__ = ["LowRankBias", "low_rank_bias", "low_rank_factors", "alibi_factors"]


def low_rank_bias(u: Float[ArrayLike, "*b T Hu r"], v: Float[ArrayLike, "*b S Hv r"]) -> LowRankBias:
    """``bias[b, h, i, j] = Σ_r u[b, i, h, r] v[b, j, h', r]``: ``u`` laid out like q (heads ``H`` or
    1), ``v`` like k (heads 1, ``K`` or ``H``); pass it as ``bias=`` to :func:`attn_jax.attention`."""
    u, v = jnp.asarray(u), jnp.asarray(v)
    if u.ndim < 3 or v.ndim < 3 or u.shape[-1] != v.shape[-1] or u.shape[-1] < 1:
        raise ValueError(f"u, v: expected [..., T, H, r] and [..., S, Hv, r] with the same rank r >= 1, got "
                         f"u {shape_str(u)} and v {shape_str(v)}")
    return LowRankBias(u, v)


def low_rank_factors(bias: Float[ArrayLike, "*b H T S"], rank: int) -> tuple[LowRankBias, Float[Array, ""]]:
    """Truncated SVD of a dense bias ``[..., H, T, S]`` to rank ``rank`` (per head and batch element).

    Returns ``(LowRankBias(u [..., T, H, r], v [..., S, H, r]), relative_error)`` where
    ``relative_error = ||bias - U Vᵀ||_F / ||bias||_F`` (0 for an exactly rank-``rank`` bias, up to
    rounding).  The singular values are split evenly (``U = U_r Σ_r^½``, ``V = V_r Σ_r^½``).
    ``-inf`` entries (masking) are not low-rank: pass masks as ``mask=``.
    """
    bias = jnp.asarray(bias)
    if bias.ndim < 3:
        raise ValueError(f"bias: expected [..., H, T, S], got {shape_str(bias)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(bias.shape[-2:]):
        raise ValueError(f"rank: expected an int in [1, min(T, S) = {min(bias.shape[-2:])}], got {rank!r}")
    dt = jnp.float64 if bias.dtype == jnp.float64 else jnp.float32
    b = bias.astype(dt)
    U, s, Vh = jnp.linalg.svd(b, full_matrices=False)
    root = jnp.sqrt(s[..., :rank])
    u = U[..., :rank] * root[..., None, :]                        # [..., H, T, r]
    v = jnp.swapaxes(Vh[..., :rank, :], -1, -2) * root[..., None, :]   # [..., H, S, r]
    err = jnp.linalg.norm(b - u @ jnp.swapaxes(v, -1, -2)) / jnp.maximum(jnp.linalg.norm(b), jnp.finfo(dt).tiny)
    return LowRankBias(jnp.swapaxes(u, -3, -2), jnp.swapaxes(v, -3, -2)), err


def alibi_factors(slopes: Float[ArrayLike, " H"], T: int, S: int | None = None) -> LowRankBias:
    """Exact rank-2 factors of causal ALiBi (bottom-right aligned, as
    :class:`attn_jax.positional.ALiBi`): ``u [1, T, H, 2] = [-m_h i', m_h]``, ``v [1, S, 1, 2] = [1, j]``,
    so ``u·v = -m_h (i' - j)`` for the keys ``j <= i'`` a causal mask keeps.  Entries grow with the
    sequence length: in bfloat16, positions above 256 are not exact (use float32 inputs)."""
    slopes = jnp.asarray(slopes, jnp.float32)
    S = T if S is None else S
    if slopes.ndim != 1:
        raise ValueError(f"slopes: expected [H], got {shape_str(slopes)}")
    qpos = jnp.arange(T, dtype=jnp.float32) + (S - T)
    u = jnp.stack([-slopes[None, :] * qpos[:, None], jnp.broadcast_to(slopes, (T, slopes.shape[0]))], axis=-1)
    kpos = jnp.arange(S, dtype=jnp.float32)
    v = jnp.stack([jnp.ones_like(kpos), kpos], axis=-1)[:, None, :]
    return LowRankBias(u[None], v[None])


# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="low_rank_bias", family="positional", title="Low-rank bias folded into q/k (FlashBias)",
    papers=(Paper("FlashBias: Fast Computation of Attention with Bias", 2025, "2505.12044", "Wu et al."),),
    summary="softmax(scale q kᵀ + U Vᵀ) = softmax(scale [q, U/scale][k, V]ᵀ); SVD for general biases",
    op=low_rank_bias, directions=("causal", "bidirectional"),
    notes="an attention feature (bias=LowRankBias); not with softcap; not in decode_attention"))
