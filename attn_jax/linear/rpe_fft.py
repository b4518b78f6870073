"""Kernelised attention with relative positional encoding, computed with the FFT.

Paper: Luo, Li, Cai, He, Peng, Zheng, Ke, Wang, Liu, "Stable, Fast and Accurate: Kernelized
Attention with Relative Positional Encoding", NeurIPS 2021, arXiv:2106.12566.

Softmax attention with an additive relative bias ``b_{j-i}`` is
``o_i = Σ_j exp(q_i·k_j + b_{j-i}) v_j / Σ_j exp(q_i·k_j + b_{j-i})``.  Kernelised attention
replaces ``exp(q_i·k_j)`` by ``φ(q_i)·φ(k_j)``; the relative term then stays a *multiplicative*
weight ``c_{j-i} = exp(b_{j-i}) > 0``::

    o_i = φ(q_i) Σ_j c_{j-i} φ(k_j)ᵀ v_j  /  (φ(q_i) · Σ_j c_{j-i} φ(k_j)  + eps)

The matrix ``C[i, j] = c_{j-i}`` is Toeplitz, so for every channel of ``A_j = φ(k_j)ᵀ [v_j, 1]``
(an ``m x (Dv + 1)`` matrix per key; the appended ones column carries the normaliser) the sum
``Y_i = Σ_j c_{j-i} A_j`` is a 1-D convolution along the sequence, evaluated with a real FFT of
length ``N >= 2T - 1`` (next power of two) in ``O(T log T · m · Dv)`` time and ``O(T · m · Dv)``
memory instead of the ``O(T² (m + Dv))`` of the materialised form.  ``causal=True`` sets
``c_r = 0`` for ``r > 0`` (key after the query).

Inputs: ``q [B, T, H, Dk]``, ``k [B, S, K, Dk]``, ``v [B, S, K, Dv]`` with ``T == S`` (the
relative offsets are token distances in one sequence), ``H`` a multiple of ``K`` (GQA), and
``rel_bias [H, 2T - 1]``: the log-weights ``b_r`` for ``r = j - i = -(T-1) .. T-1``
(``rel_bias[:, r + T - 1]``), as a learned table or a function of the offset (e.g. ALiBi-like
``-slope·|r|``).  ``feature_map`` is any map of :func:`attn_jax.linear.feature_maps.resolve_feature_map`
(the paper uses positive random features; ``"elu"`` (elu+1) is the default here, and ``φ`` must be
non-negative for the normaliser to be positive).  ``impl="fft"`` is the fast form,
``impl="reference"`` builds ``C`` and the ``T x T`` kernel matrix (float32/float64, for tests).
Deviation: the paper normalises inside the feature map of PRF; here the normaliser is the
explicit denominator above, as in :func:`attn_jax.linear.linear_attention`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attn_jax.core.array_types import ArrayLike
from attn_jax.core.declaration import Declaration, Paper, Parity, declare
from attn_jax.core.validation import check_qkv, shape_str
from attn_jax.linear.common import expand_kv_heads
from attn_jax.linear.feature_maps import resolve_feature_map

__all__ = ["kernelized_rpe_attention", "kernelized_rpe_attention_reference", "toeplitz_apply"]

IMPLS = ("auto", "fft", "reference")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def toeplitz_apply(log_weights: Float[ArrayLike, "*batch R"], x: Float[ArrayLike, "*batch T C"], *,
                   causal: bool = False) -> Float[Array, "*batch T C"]:
    """``y_i = Σ_j exp(log_weights[j - i + T - 1]) x_j`` for ``i, j < T``, by a real FFT.

    ``log_weights`` has ``R = 2T - 1`` entries per batch element (offsets ``-(T-1) .. T-1``);
    ``causal`` drops the offsets ``j > i``.  Exact up to the FFT's rounding (float32: ~1e-6
    relative to the largest term; float64 inputs are transformed in float64).
    """
    log_weights, x = jnp.asarray(log_weights), jnp.asarray(x)
    T = x.shape[-2]
    if log_weights.shape[-1] != 2 * T - 1:
        raise ValueError(f"log_weights: expected {2 * T - 1} offsets (2T - 1 for T = {T}) in the last axis, "
                         f"got {shape_str(log_weights)}")
    dt = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    c = jnp.exp(log_weights.astype(dt))                       # c[r + T - 1] = weight of offset r = j - i
    # y_i = Σ_j h[i - j] x_j with h[d] = c_{-d}: a convolution; d = i - j in -(T-1) .. T-1.
    h_pos = c[..., T - 1::-1]                                 # d = 0 .. T-1   <- r = 0 .. -(T-1)
    h_neg = c[..., :T - 1:-1] if T > 1 else c[..., :0]        # d = -(T-1) .. -1 <- r = T-1 .. 1
    if causal:
        h_neg = jnp.zeros_like(h_neg)
    N = _next_pow2(2 * T - 1)
    pad = jnp.zeros((*c.shape[:-1], N - (2 * T - 1)), dt)
    h = jnp.concatenate([h_pos, pad, h_neg], axis=-1)         # h[d mod N]
    H = jnp.fft.rfft(h, n=N, axis=-1)[..., :, None]           # [*batch, N//2+1, 1]
    X = jnp.fft.rfft(x.astype(dt), n=N, axis=-2)              # [*batch, N//2+1, C]
    return jnp.fft.irfft(H * X, n=N, axis=-2)[..., :T, :]


def _check(q, k, v, rel_bias, impl, eps):
    check_qkv(q, k, v)
    T, S, H = q.shape[1], k.shape[1], q.shape[2]
    if T != S:
        raise ValueError(f"k: kernelised RPE attention needs T == S (offsets are distances within one sequence); "
                         f"got q {shape_str(q)} and k {shape_str(k)}")
    if rel_bias.ndim != 2 or rel_bias.shape != (H, 2 * T - 1):
        raise ValueError(f"rel_bias: expected [H, 2T - 1] = [{H}, {2 * T - 1}] log-weights for offsets "
                         f"-(T-1) .. T-1, got {shape_str(rel_bias)}")
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps: expected a non-negative Python float, got {eps!r}")


def _features(q, k, v, feature_map):
    phi = resolve_feature_map(feature_map)
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    fq, fk = phi(q).astype(dt), phi(k).astype(dt)
    if fq.shape[:-1] != q.shape[:-1] or fk.shape[-1] != fq.shape[-1]:
        raise ValueError(f"feature_map: must map [..., D] -> [..., D'], got φ(q) {shape_str(fq)} from q {shape_str(q)}")
    H = q.shape[2]
    return fq, expand_kv_heads(fk, H), expand_kv_heads(v.astype(dt), H), dt


def _finish(num, den, eps, dtype):
    den = den + eps
    return (num / jnp.where(den == 0, 1.0, den)[..., None]).astype(dtype)


def kernelized_rpe_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B T K Dk"],
                             v: Float[ArrayLike, "B T K Dv"], rel_bias: Float[ArrayLike, "H R"], *,
                             feature_map="elu", causal: bool = False, eps: float = 1e-6,
                             impl: str = "auto") -> Float[Array, "B T H Dv"]:
    """Kernelised attention with relative-position weights ``exp(rel_bias)`` (module docstring).

    ``impl``: ``"auto"`` / ``"fft"`` (O(T log T)), or ``"reference"`` (materialised ``T x T``).
    Returns ``o [B, T, H, Dv]`` in the dtype of ``q``; gradients flow to q, k, v and ``rel_bias``.
    """
    q, k, v, rel_bias = (jnp.asarray(a) for a in (q, k, v, rel_bias))
    _check(q, k, v, rel_bias, impl, eps)
    if impl == "reference":
        return kernelized_rpe_attention_reference(q, k, v, rel_bias, feature_map=feature_map, causal=causal, eps=eps)
    fq, fk, vc, dt = _features(q, k, v, feature_map)
    B, T, H, m = fq.shape
    va = jnp.concatenate([vc, jnp.ones((*vc.shape[:-1], 1), dt)], axis=-1)      # [B, T, H, Dv + 1]
    a = jnp.einsum("bthm,bthe->bhtme", fk, va).reshape(B, H, T, m * va.shape[-1])
    y = toeplitz_apply(jnp.broadcast_to(rel_bias, (B, H, 2 * T - 1)), a, causal=causal)
    y = y.reshape(B, H, T, m, va.shape[-1])
    out = jnp.einsum("bthm,bhtme->bthe", fq, y)
    return _finish(out[..., :-1], out[..., -1], eps, q.dtype)


def kernelized_rpe_attention_reference(q, k, v, rel_bias, *, feature_map="elu", causal: bool = False,
                                       eps: float = 1e-6):
    """The materialised form: ``W = (φ(q) φ(k)ᵀ) ⊙ C`` with ``C[i, j] = exp(rel_bias[j - i + T - 1])``."""
    q, k, v, rel_bias = (jnp.asarray(a) for a in (q, k, v, rel_bias))
    _check(q, k, v, rel_bias, "reference", eps)
    fq, fk, vc, dt = _features(q, k, v, feature_map)
    T = q.shape[1]
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    c = jnp.exp(rel_bias.astype(dt))[:, j - i + T - 1]                           # [H, T, T]
    if causal:
        c = jnp.where(j <= i, c, 0.0)
    w = jnp.einsum("bihm,bjhm->bhij", fq, fk) * c
    return _finish(jnp.einsum("bhij,bjhe->bihe", w, vc), w.sum(-1).transpose(0, 2, 1), eps, q.dtype)


def _parity(impl, x, *, causal=True, segment_ids=None, initial_state=None):
    """Catalogue call: ALiBi-like decays plus a fixed random table as the relative log-weights."""
    q, k, v = x["q"], x["k"], x["v"]
    T, H = q.shape[1], q.shape[2]
    r = jnp.arange(-(T - 1), T, dtype=q.dtype)
    slopes = 0.5 ** jnp.arange(1, H + 1, dtype=q.dtype)
    rel = -slopes[:, None] * jnp.abs(r)[None, :] + 0.3 * jnp.sin(0.7 * r)[None, :]
    return kernelized_rpe_attention(q, k, v, rel, causal=causal, impl=impl)


DECLARATION = declare(Declaration(
    name="kernelized_rpe", family="linear", title="Kernelised attention with relative positions (FFT)",
    papers=(Paper("Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding", 2021,
                  "2106.12566", "Luo et al."),),
    summary="o_i = φ(q_i) Σ_j c_{j-i} φ(k_j)ᵀ v_j / φ(q_i)·Σ_j c_{j-i} φ(k_j);  Toeplitz sum by FFT",
    op=kernelized_rpe_attention, forms=("fft",), directions=("causal", "bidirectional"),
    parity=Parity(call=_parity, segments=False, initial_state=False),
    notes="T == S; no packed segments or carried state (a Toeplitz sum has no O(1) recurrent state); no mixer yet"))
