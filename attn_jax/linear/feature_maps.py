"""Feature maps φ for kernelised (linear) attention, applied per head on the last axis.

Linear attention replaces ``exp(q·k)`` by ``φ(q)·φ(k)`` so that ``Σ_j φ(k_j)ᵀ v_j`` can be
summed once (:func:`attn_jax.linear.linear_attention`).  Every map here is a pure function of
``x: [..., D]`` returning ``[..., D']``; learnable maps take their parameters explicitly, random
maps take an explicit projection drawn from an explicit ``jax.random`` key.

* :func:`identity` — ``φ(x) = x``.
* :func:`elu_plus_one` — ``φ(x) = elu(x) + 1``.  Katharopoulos et al., "Transformers are RNNs:
  Fast Autoregressive Transformers with Linear Attention", 2020, arXiv:2006.16236, Eq. 7.
* :func:`relu` — ``φ(x) = max(x, 0)`` (the cosFormer map, Qin et al. 2022, arXiv:2202.08791).
* :func:`taylor_exp` — the 2nd-order Taylor map of BASED.  Arora et al., "Simple linear
  attention language models balance the recall-throughput tradeoff", 2024, arXiv:2402.18668
  (zoology/based ``TaylorExp``): ``φ(x) = [1, x/d^{1/4}, vec(x xᵀ)/(√2 √d)]`` with
  ``d = D``, so ``φ(q)·φ(k) = 1 + t + t²/2`` with ``t = q·k/√d`` — the Taylor expansion of
  ``exp(q·k/√d)``.  ``D' = 1 + D + D²`` (the full outer product; the symmetric half would give
  ``1 + D + D(D+1)/2`` with the same dot products — we keep the simple form).
* :func:`hedgehog` — Zhang et al., "The Hedgehog & the Porcupine: Expressive Linear Attentions
  with Softmax Mimicry", 2024, arXiv:2402.04347: a learnable per-head linear layer
  followed by a softmax over features, both signs: ``φ(x) = [softmax(xW + b), softmax(−(xW + b))]``
  (``D' = 2F``; each half is positive and sums to one).  The paper writes the unnormalised
  ``[exp(xW + b), exp(−(xW + b))]``; the per-half softmax (as in the authors' later LoLCATs code)
  differs from it by one positive factor per half and token, which keeps the weights bounded;
  zoology's variant, one softmax over ``[2z, −2z]``, is another per-token rescaling of the exp
  form.  :func:`hedgehog_distillation_loss` is the
  paper's training objective: the cross-entropy between the softmax attention weights and the
  normalised linear-attention weights ``φ(q_i)·φ(k_j) / Σ_l φ(q_i)·φ(k_l)``.
* :func:`performer_features` — FAVOR+ positive random features.  Choromanski et al., "Rethinking
  Attention with Performers", 2020, arXiv:2009.14794 (positive random features, FAVOR+):
  ``φ(x) = exp(W x − |x|²/2) / √m`` with ``W: [m, D]`` rows ``w ~ N(0, I)``, so that
  ``E[φ(q)·φ(k)] = exp(q·k)`` (unbiased).  :func:`orthogonal_random_projection` draws ``W`` as
  blocks of ``D`` exactly orthogonal directions (QR of a Gaussian matrix) with row norms drawn
  from the χ_D distribution (norms of Gaussian vectors), so each row is marginally ``N(0, I)``
  and the estimator stays unbiased with lower variance (the paper's orthogonal random features).  For softmax attention with
  the usual ``1/√D`` temperature pass ``x · D^{-1/4}``.  No stabilising max-shift is applied
  (a per-key shift cannot be expressed by a pure per-token map); keep ``|x|`` moderate.
* :func:`dpfp` — Deterministic Parameter-Free Projection.  Schlag, Irie & Schmidhuber, "Linear
  Transformers Are Secretly Fast Weight Programmers", 2021, arXiv:2102.11174 (DPFP):
  with ``r = [relu(x), relu(−x)]`` (``2D`` entries), ``φ_ν(x)_{i + 2D(j−1)} = r_i r_{i+j}``
  (cyclic index, ``j = 1..ν``), so ``D' = 2Dν``.  (The authors' code rolls by ``+j``, i.e. pairs
  ``r_i r_{i−j}``: the same features in another order, so identical dot products.)

Maps are computed in float32 (float64 inputs stay float64) and returned in that compute dtype;
the callers cast outputs back to the input dtype.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.core.array_types import ArrayLike
from attn_jax.core.validation import check_float_array, shape_str
from attn_jax.linear.common import segment_layout

__all__ = ["identity", "elu_plus_one", "relu", "taylor_exp", "taylor_exp_dim", "hedgehog",
           "hedgehog_distillation_loss", "performer_features", "orthogonal_random_projection", "dpfp",
           "FEATURE_MAPS", "resolve_feature_map"]


def _compute(x):
    check_float_array("x", x)
    return x.astype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)


def identity(x: Float[ArrayLike, "... D"]) -> Float[Array, "... D"]:
    """``φ(x) = x``."""
    return _compute(x)


def elu_plus_one(x: Float[ArrayLike, "... D"]) -> Float[Array, "... D"]:
    """``φ(x) = elu(x) + 1`` (Katharopoulos et al. 2020, arXiv:2006.16236, Eq. 7); always > 0."""
    return jax.nn.elu(_compute(x)) + 1.0


def relu(x: Float[ArrayLike, "... D"]) -> Float[Array, "... D"]:
    """``φ(x) = max(x, 0)``."""
    return jax.nn.relu(_compute(x))


def taylor_exp_dim(D: int) -> int:
    """Output dimension of :func:`taylor_exp` for input dimension ``D``: ``1 + D + D²``."""
    return 1 + D + D * D


def taylor_exp(x: Float[ArrayLike, "... D"], *, input_scale: float | None = None) -> Float[Array, "... F"]:
    """BASED's 2nd-order Taylor map: ``[1, s x, s² vec(x xᵀ)/√2]``, ``s = input_scale``.

    Default ``s = D^{-1/4}`` (zoology/based ``TaylorExp``), so ``φ(q)·φ(k) = 1 + t + t²/2`` with
    ``t = q·k/√D``.
    """
    x = _compute(x)
    D = x.shape[-1]
    s = D ** -0.25 if input_scale is None else float(input_scale)
    xs = x * s
    x2 = (xs[..., :, None] * xs[..., None, :]).reshape(*x.shape[:-1], D * D) / math.sqrt(2.0)
    return jnp.concatenate([jnp.ones((*x.shape[:-1], 1), x.dtype), xs, x2], axis=-1)


def _check_hedgehog_weights(x, W, b):
    check_float_array("W", W)
    D = x.shape[-1]
    if W.ndim == 2:
        if W.shape[0] != D:
            raise ValueError(f"W: expected shape [D, F] or [H, D, F] with D = {D}, got {shape_str(W)}")
    elif W.ndim == 3:
        if x.ndim < 2 or W.shape[0] != x.shape[-2] or W.shape[1] != D:
            raise ValueError(f"W: expected shape [H, D, F] = [{x.shape[-2] if x.ndim >= 2 else 'H'}, {D}, F] "
                             f"for x of shape {shape_str(x)}, got {shape_str(W)}")
    else:
        raise ValueError(f"W: expected rank 2 [D, F] or rank 3 [H, D, F], got shape {shape_str(W)}")
    if b is not None:
        check_float_array("b", b)
        if b.shape != W.shape[:-2] + W.shape[-1:]:
            raise ValueError(f"b: expected shape {list(W.shape[:-2] + W.shape[-1:])}, got {shape_str(b)}")


def hedgehog(x: Float[ArrayLike, "... H D"], W, b=None) -> Float[Array, "... H F2"]:
    """Hedgehog map ``[softmax(xW + b), softmax(−(xW + b))]`` over features (arXiv:2402.04347).

    ``W``: ``[D, F]`` (shared) or ``[H, D, F]`` (one layer per head; ``x`` is ``[..., H, D]``);
    ``b``: optional ``[F]`` / ``[H, F]``.  Output ``[..., 2F]``; both halves positive, each sums to 1.
    """
    x = _compute(x)
    _check_hedgehog_weights(x, W, b)
    W = W.astype(x.dtype)
    z = jnp.einsum("...d,df->...f", x, W) if W.ndim == 2 else jnp.einsum("...hd,hdf->...hf", x, W)
    if b is not None:
        z = z + b.astype(x.dtype)
    return jnp.concatenate([jax.nn.softmax(z, axis=-1), jax.nn.softmax(-z, axis=-1)], axis=-1)


def hedgehog_distillation_loss(q: Float[ArrayLike, "B T H D"], k: Float[ArrayLike, "B T K D"], W_q, W_k, b_q=None,
                               b_k=None, *, causal: bool = True, scale: float | None = None,
                               stop_target_gradient: bool = True, segment_ids=None) -> Float[Array, ""]:
    """Hedgehog's attention-distillation loss (arXiv:2402.04347).

    ``L = mean_{b,h,i} −Σ_j A_ij log Â_ij`` with the softmax weights
    ``A_ij = softmax_j(scale q_i·k_j)`` (the teacher; ``scale`` default ``D^{-1/2}``) and the
    linear-attention weights ``Â_ij = φ_q(q_i)·φ_k(k_j) / Σ_l φ_q(q_i)·φ_k(k_l)``, both over the
    keys visible to ``i`` (``j <= i`` when ``causal``; with ``segment_ids [B, T]`` only keys of
    ``i``'s document, padding id 0 excluded, and the mean runs over valid queries).
    ``φ_q = hedgehog(·, W_q, b_q)``,
    ``φ_k = hedgehog(·, W_k, b_k)``.  Quadratic in ``T`` (it trains the maps on short
    sequences, as in the paper).  ``stop_target_gradient``: the teacher weights are constants
    (only the feature maps learn), as in the paper's conversion setting.
    """
    check_float_array("q", q)
    check_float_array("k", k)
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] \
            or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"q, k: expected [B, T, H, D] and [B, T, K, D] with H % K == 0, got q {shape_str(q)}, "
                         f"k {shape_str(k)}")
    B, T, H, D = q.shape
    k = jnp.repeat(k, H // k.shape[2], axis=2)
    scale = D ** -0.5 if scale is None else float(scale)
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    logits = jnp.einsum("bihd,bjhd->bhij", q.astype(dt), k.astype(dt)) * scale
    lay = segment_layout(segment_ids, B, T)
    mask = (lay.doc[:, :, None] == lay.doc[:, None, :]) & lay.valid[:, None, :] & lay.valid[:, :, None]
    if causal:
        mask = mask & jnp.tril(jnp.ones((T, T), bool))
    mask = mask[:, None]                                                          # [B, 1, i, j]
    target = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1), 0.0)  # finite on padding rows
    if stop_target_gradient:
        target = jax.lax.stop_gradient(target)
    fq = hedgehog(q, W_q, b_q)
    fk = hedgehog(k, W_k, b_k)
    kern = jnp.where(mask, jnp.einsum("bihf,bjhf->bhij", fq, fk), 0.0)
    den = kern.sum(-1, keepdims=True)
    log_pred = jnp.log(jnp.where(mask, kern, 1.0)) - jnp.log(jnp.where(den > 0, den, 1.0))
    ce = -jnp.sum(jnp.where(mask, target * log_pred, 0.0), axis=-1)               # [B, H, T]
    n_valid = jnp.maximum(jnp.sum(lay.valid), 1) * H
    return jnp.sum(jnp.where(lay.valid[:, None, :], ce, 0.0)) / n_valid


def orthogonal_random_projection(key, m: int, d: int, *, dtype=jnp.float32) -> Float[Array, "m d"]:
    """FAVOR+ projection ``W: [m, d]``: orthogonal blocks of ``d`` rows, row norms ~ χ_d.

    Rows within a block are exactly orthogonal; each row is marginally ``N(0, I_d)`` (uniform
    direction times an independent χ_d norm), which keeps :func:`performer_features` unbiased.
    """
    for name, val in (("m", m), ("d", d)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    n_blocks = -(-m // d)
    k_blocks, k_norms = jax.random.split(key)
    g = jax.random.normal(k_blocks, (n_blocks, d, d), jnp.float32)
    qmat, r = jnp.linalg.qr(g)
    # sign fix makes Q Haar-distributed (QR alone is biased towards positive diagonals)
    qmat = qmat * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    rows = jnp.swapaxes(qmat, -1, -2).reshape(n_blocks * d, d)[:m]
    norms = jnp.linalg.norm(jax.random.normal(k_norms, (m, d), jnp.float32), axis=-1)
    return (rows * norms[:, None]).astype(dtype)


def performer_features(x: Float[ArrayLike, "... D"], projection: Float[ArrayLike, "m D"]) -> Float[Array, "... m"]:
    """FAVOR+ positive random features ``exp(W x − |x|²/2)/√m`` (arXiv:2009.14794)."""
    x = _compute(x)
    check_float_array("projection", projection)
    if projection.ndim != 2 or projection.shape[1] != x.shape[-1]:
        raise ValueError(f"projection: expected shape [m, D] with D = {x.shape[-1]}, got {shape_str(projection)}")
    m = projection.shape[0]
    wx = jnp.einsum("...d,md->...m", x, projection.astype(x.dtype))
    return jnp.exp(wx - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)) / math.sqrt(m)


def dpfp(x: Float[ArrayLike, "... D"], *, nu: int = 1) -> Float[Array, "... F"]:
    """DPFP-ν (arXiv:2102.11174): ``r_i r_{i+j}``, ``r = [relu(x), relu(−x)]``, ``D' = 2Dν``."""
    if isinstance(nu, bool) or not isinstance(nu, int) or nu < 1:
        raise ValueError(f"nu: expected a positive int, got {nu!r}")
    x = _compute(x)
    r = jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)
    if nu > r.shape[-1] - 1:
        raise ValueError(f"nu: at most 2D - 1 = {r.shape[-1] - 1} for D = {x.shape[-1]}, got {nu}")
    return jnp.concatenate([r * jnp.roll(r, -j, axis=-1) for j in range(1, nu + 1)], axis=-1)


FEATURE_MAPS: dict[str, Callable] = {
    "identity": identity,
    "elu": elu_plus_one,
    "elu+1": elu_plus_one,
    "relu": relu,
    "taylor": taylor_exp,
    "based": taylor_exp,
    "dpfp": dpfp,
}


def resolve_feature_map(feature_map, name: str = "feature_map") -> Callable:
    """A name from :data:`FEATURE_MAPS` or a callable ``[..., D] -> [..., D']``."""
    if callable(feature_map):
        return feature_map
    if isinstance(feature_map, str) and feature_map in FEATURE_MAPS:
        return FEATURE_MAPS[feature_map]
    raise ValueError(f"{name}: expected a callable or one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
