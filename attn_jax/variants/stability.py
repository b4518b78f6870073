"""Training-stability tools for attention: σReparam and attention-logit / entropy statistics.

* σReparam — "Stabilizing Transformer Training by Preventing Attention Entropy Collapse", Zhai et
  al., 2023, arXiv:2303.06296 (§4): every linear layer is reparametrised as

      Ŵ = (γ / σ(W)) W

  with ``σ(W)`` the spectral norm (largest singular value), estimated by one power-iteration step
  per training step from a persistent right singular vector ``u``, and ``γ`` a learned scalar.
  Constants follow the authors' code (apple/ml-sigma-reparam, ``SNLinear``): ``u`` starts at the
  exact top right singular vector (SVD at init), the power step runs without gradient and ``σ =
  vᵀ W u`` keeps the gradient through ``W``; ``γ`` is initialised to ``σ(W_init)`` so that
  ``Ŵ = W`` at init.  The NNX layer is :class:`attn_jax.nn.stability.SigmaReparamLinear`.
* Attention statistics (the quantity σReparam is about: the paper bounds the attention entropy
  from below by a function decreasing exponentially in the spectral norm of the logits) — per
  query and head, the largest visible logit and the entropy ``-sum_j p_ij log p_ij`` of the
  attention row.  :class:`attn_jax.nn.MultiHeadAttention` exposes them, opt-in
  (``monitor=True``), as NNX intermediates (``sow``).  They need the materialised ``[B, H, T, S]``
  probabilities, so monitoring costs one dense attention pass.

qk-norm (Dehghani et al. 2023, arXiv:2302.05442) and QKNorm (Henry et al. 2020) are the
``qk_norm=`` option of :class:`attn_jax.nn.MultiHeadAttention`, inherited by every mixer of
:mod:`attn_jax.nn.variant_attention`; the output-logit z-loss (PaLM, arXiv:2204.02311) is the
``optim.z_loss`` option of ``experiments/common/losses.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike, Float
from attn_jax.core.bias import StructuredBias
from attn_jax.variants.dense_scores import check_inputs, masked_softmax, scores, visible_pairs

__all__ = ["spectral_norm", "sigma_reparam", "attention_statistics"]


def _as_matrix(name: str, w):
    w = jnp.asarray(w)
    V.check_float_array(name, w)
    if w.ndim < 2:
        raise ValueError(f"{name}: expected a weight of rank >= 2 ([in, out...]), got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1)


def spectral_norm(w: Float[ArrayLike, "m ..."], u: Float[ArrayLike, " n"], *,
                  n_iter: int = 1) -> tuple[Float[Array, ""], Float[Array, " n"]]:
    """``(σ, u')``: ``n_iter`` power-iteration steps on ``w`` viewed as ``[m, n]`` (trailing axes
    flattened) from the right vector ``u [n]`` (no gradient), then ``σ = vᵀ w u'`` (gradient
    through ``w``)."""
    W = _as_matrix("w", w)
    u = jnp.asarray(u)
    if u.shape != (W.shape[1],):
        raise ValueError(f"u: expected shape [n]=({W.shape[1]},) for w viewed as {tuple(W.shape)}, got "
                         f"{tuple(u.shape)}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter: expected a positive int, got {n_iter!r}")
    Wc = jax.lax.stop_gradient(W).astype(jnp.float32)
    u = u.astype(jnp.float32)

    def step(_, uv):
        v = Wc @ uv[0]
        v = v / jnp.maximum(jnp.linalg.norm(v), 1e-12)
        u = Wc.T @ v
        return u / jnp.maximum(jnp.linalg.norm(u), 1e-12), v

    u, v = jax.lax.fori_loop(0, n_iter, step, (u, jnp.zeros((W.shape[0],), jnp.float32)))
    return v @ W.astype(jnp.float32) @ u, u


def sigma_reparam(w: Float[ArrayLike, "m ..."], gamma, u: Float[ArrayLike, " n"], *,
                  n_iter: int = 1) -> tuple[Float[Array, "m ..."], Float[Array, " n"]]:
    """``(Ŵ, u')`` with ``Ŵ = (γ / σ(w)) w`` in ``w``'s dtype, ``σ`` from :func:`spectral_norm`."""
    sigma, u = spectral_norm(w, u, n_iter=n_iter)
    w = jnp.asarray(w)
    return (w.astype(jnp.float32) * (jnp.asarray(gamma, jnp.float32) / sigma)).astype(w.dtype), u


def attention_statistics(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"], *, mask=None,
                         bias=None, scale: float | None = None,
                         softcap: float | None = None) -> tuple[Float[Array, "B T H"], Float[Array, "B T H"]]:
    """``(max_logit, entropy)``, float32 ``[B, T, H]``: the largest visible logit (after softcap
    and bias) and the entropy of the attention row, 0 for rows with no visible key."""
    dims, mask = check_inputs(q, k, k, mask)
    scale = dims.Dk ** -0.5 if scale is None else scale
    s = scores(q, k, scale).astype(jnp.float32)
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if bias is not None:
        b = bias.materialize(dims.T, dims.S) if isinstance(bias, StructuredBias) else jnp.asarray(bias)
        s = s + b.astype(jnp.float32)
    visible = visible_pairs(mask, dims.B, dims.H, dims.T, dims.S)
    if visible is None:
        visible = jnp.ones(s.shape, bool)
    p = masked_softmax(s, visible)
    logp = jnp.where(visible & (p > 0), jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    entropy = -jnp.sum(p * logp, axis=-1)
    has = visible.any(axis=-1)
    max_logit = jnp.where(has, jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1), 0.0)
    return max_logit.transpose(0, 2, 1), entropy.transpose(0, 2, 1)
