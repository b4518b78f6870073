"""Sparsemax and α-entmax attention: sparse probability maps with exact zeros.

"From Softmax to Sparsemax: A Sparse Model of Attention and Multi-Label Classification",
Martins & Astudillo, 2016, arXiv:1602.02068::

    sparsemax(z) = argmin_{p ∈ Δ} ||p - z||²  =  [z - τ(z)]_+,   Σ_j [z_j - τ]_+ = 1

computed exactly by sorting: with ``z_(1) ≥ z_(2) ≥ ...``, the support size is
``k* = max{k : 1 + k z_(k) > Σ_{j≤k} z_(j)}`` and ``τ = (Σ_{j≤k*} z_(j) - 1) / k*``.  Its
Jacobian on the support ``S`` gives the exact gradient ``dz = 1_S ⊙ (g - mean_S g)``.

"Sparse Sequence-to-Sequence Models", Peters, Niculae & Martins, 2019, arXiv:1905.05702, and
"Adaptively Sparse Transformers", Correia, Niculae & Martins, 2019, arXiv:1909.00015 (α learned
per head)::

    α-entmax(z)_i = [(α - 1) z_i - τ]_+^{1/(α-1)},   τ such that Σ_i p_i = 1     (α > 1)

α → 1 is softmax, α = 2 is sparsemax.  The forward finds ``τ`` by bisection on
``[max (α-1)z - 1, max (α-1)z - n^{1-α}]`` (``n_iter`` halvings, then ``p / Σ p``).  The backward is
the exact implicit gradient: with ``s_i = p_i^{2-α}`` on the support (0 elsewhere),

    dz    = s ⊙ g - s (s·g) / Σ s
    dα    = Σ_i g_i [ -p_i log p_i + s_i (z_i - τ') ] / (α - 1),  τ' = (Σ s_i z_i - Σ p_i log p_i) / Σ s_i

(differentiating the closed form and ``Σ p = 1`` in α).  In attention, ``z`` are the logits
``scale q_i · k_j`` over the visible keys (hidden keys are ``-inf``: weight exactly 0) and
``o_i = Σ_j p_ij v_j``; a fully masked row gives 0.

Both need the row's threshold ``τ`` before any weight is known: they run materialised
(``[B, H, T, S]``), and :func:`attn_jax.explain` says so (the ``blockwise`` form is declared and
refused with that reason; a blockwise threshold search is not implemented).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attn_jax.core import validation as V
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.dispatch import Registry, register_explainer
from attn_jax.variants import rowwise as RW

__all__ = ["sparsemax", "entmax_bisect", "sparsemax_attention", "sparsemax_attention_reference",
           "entmax_attention", "entmax_attention_reference", "SPARSEMAX_ATTENTION", "ENTMAX_ATTENTION"]

SPARSEMAX_ATTENTION = Registry("variants.sparsemax_attention")
ENTMAX_ATTENTION = Registry("variants.entmax_attention")


# ----------------------------------------------------------------------------- row maps


@jax.custom_vjp
def sparsemax(z: Float[Array, "*rows n"]) -> Float[Array, "*rows n"]:
    """Sparsemax over the last axis; ``-inf`` entries are excluded (weight 0).  A row with no
    finite entry gives zeros."""
    return _sparsemax_fwd(z)[0]


def _sparsemax_fwd(z):
    n = z.shape[-1]
    valid = z > -jnp.inf
    srt = -jnp.sort(-z, axis=-1)                                  # descending, -inf last
    fin = srt > -jnp.inf
    srt0 = jnp.where(fin, srt, 0.0)
    cs = jnp.cumsum(srt0, axis=-1)
    kk = jnp.arange(1, n + 1, dtype=z.dtype)
    cond = fin & (1.0 + kk * srt0 > cs)
    k_star = jnp.max(jnp.where(cond, kk, 0.0), axis=-1, keepdims=True)
    idx = jnp.maximum(k_star.astype(jnp.int32) - 1, 0)
    tau = (jnp.take_along_axis(cs, idx, axis=-1) - 1.0) / jnp.maximum(k_star, 1.0)
    p = jnp.where(valid & (k_star > 0), jnp.maximum(jnp.where(valid, z, 0.0) - tau, 0.0), 0.0)
    return p, p


def _sparsemax_bwd(p, g):
    sup = (p > 0).astype(g.dtype)
    cnt = sup.sum(axis=-1, keepdims=True)
    mean = (sup * g).sum(axis=-1, keepdims=True) / jnp.maximum(cnt, 1.0)
    return (sup * (g - mean),)


sparsemax.defvjp(_sparsemax_fwd, _sparsemax_bwd)


def _entmax_forward(z, alpha, n_iter: int):
    am1 = alpha - 1.0
    valid = z > -jnp.inf
    zf = jnp.where(valid, z, 0.0)
    x = zf * am1
    n_valid = valid.sum(axis=-1, keepdims=True).astype(z.dtype)
    mx = jnp.max(jnp.where(valid, x, -jnp.inf), axis=-1, keepdims=True)
    mx = jnp.where(n_valid > 0, mx, 0.0)
    lo = mx - 1.0
    hi = mx - jnp.maximum(n_valid, 1.0) ** (-am1)

    def p_of(tau):
        return jnp.where(valid, jnp.maximum(x - tau, 0.0) ** (1.0 / am1), 0.0)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        big = p_of(mid).sum(axis=-1, keepdims=True) >= 1.0
        return jnp.where(big, mid, lo), jnp.where(big, hi, mid)

    lo, hi = jax.lax.fori_loop(0, n_iter, body, (lo, hi))
    p = p_of(lo)
    total = p.sum(axis=-1, keepdims=True)
    return jnp.where(n_valid > 0, p / jnp.where(total > 0, total, 1.0), 0.0)


@jax.custom_vjp
def _entmax(z, alpha, n_iter):
    return _entmax_forward(z, alpha, n_iter)


def _entmax_fwd(z, alpha, n_iter):
    p = _entmax_forward(z, alpha, n_iter)
    return p, (p, z, alpha, n_iter)


def _entmax_bwd(res, g):
    p, z, alpha, n_iter = res
    am1 = alpha - 1.0
    sup = p > 0
    psafe = jnp.where(sup, p, 1.0)
    s = jnp.where(sup, psafe ** (2.0 - alpha), 0.0)
    ssum = s.sum(axis=-1, keepdims=True)
    ssafe = jnp.where(ssum > 0, ssum, 1.0)
    dz = s * g - s * (s * g).sum(axis=-1, keepdims=True) / ssafe
    zf = jnp.where(sup, z, 0.0)
    plogp = jnp.where(sup, p * jnp.log(psafe), 0.0)
    tau_prime = ((s * zf).sum(axis=-1, keepdims=True) - plogp.sum(axis=-1, keepdims=True)) / ssafe
    dp_dalpha = (-plogp + s * (zf - tau_prime)) / am1
    dalpha = (g * dp_dalpha).sum(axis=-1, keepdims=True)
    dalpha = jnp.where(ssum > 0, dalpha, 0.0)
    # alpha broadcasts against the rows: sum the cotangent down to its shape
    dalpha = jnp.broadcast_to(dalpha, jnp.broadcast_shapes(dalpha.shape, jnp.shape(alpha)))
    axes = tuple(range(dalpha.ndim - jnp.ndim(alpha)))
    dalpha = dalpha.sum(axis=axes) if axes else dalpha
    keep = tuple(i for i, (a, b) in enumerate(zip(dalpha.shape, jnp.shape(alpha))) if b == 1 and a != 1)
    dalpha = dalpha.sum(axis=keep, keepdims=True) if keep else dalpha
    return dz, dalpha.astype(jnp.result_type(alpha)), None


_entmax.defvjp(_entmax_fwd, _entmax_bwd)


def entmax_bisect(z: Float[Array, "*rows n"], alpha: float | Float[ArrayLike, "..."], n_iter: int = 50
                  ) -> Float[Array, "*rows n"]:
    """α-entmax over the last axis by bisection (module docstring), differentiable in ``z`` and
    ``alpha`` (a float or an array broadcastable against ``z[..., :1]``, every value ``> 1``).
    ``-inf`` entries get weight 0; a row with no finite entry gives zeros."""
    alpha = jnp.asarray(alpha, z.dtype)
    return _entmax(z, alpha, int(n_iter))


# ----------------------------------------------------------------------------- attention


def _masked_logits(q, k, v, mask, scale):
    s, visible, v, _ = RW.scores_reference(q, k, v, mask, scale)
    return (s if visible is None else jnp.where(visible, s, -jnp.inf)), v


def sparsemax_attention_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                                  v: Float[ArrayLike, "B S K Dv"], *, mask=None,
                                  scale: float | None = None) -> Float[Array, "B T H Dv"]:
    """Materialised sparsemax attention (``scale`` the effective logit scale); inputs validated."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    z, v = _masked_logits(q, k, v, mask, scale)
    return RW.weighted_values(sparsemax(z), v, q.dtype)


def entmax_attention_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                               v: Float[ArrayLike, "B S K Dv"],
                               alpha: float | Float[ArrayLike, " H"] | Float[ArrayLike, ""], *, mask=None,
                               scale: float | None = None, n_iter: int = 50) -> Float[Array, "B T H Dv"]:
    """Materialised α-entmax attention, ``alpha [H]`` (or a scalar); inputs validated."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    z, v = _masked_logits(q, k, v, mask, scale)
    H = q.shape[2]
    a = jnp.broadcast_to(jnp.asarray(alpha, z.dtype), (H,)).reshape(1, H, 1, 1)
    return RW.weighted_values(entmax_bisect(z, a, n_iter), v, q.dtype)


_SPARSEMAX_KWARGS = ("mask", "scale", "length_scale", "impl")
_ENTMAX_KWARGS = ("mask", "scale", "alpha", "n_iter", "length_scale", "impl")


def sparsemax_attention(q: Float[ArrayLike, "*batch T H Dk"], k: Float[ArrayLike, "*batch S K Dk"],
                        v: Float[ArrayLike, "*batch S K Dv"], *, mask=None, scale: float | None = None,
                        length_scale: float | None = None, impl="auto", **unexpected) -> Float[Array, "*batch T H Dv"]:
    """Sparsemax attention (module docstring); arguments as :func:`attn_jax.variants.sigmoid_attention`
    (``impl``: ``"auto"`` / ``"reference"``; whole-row, materialised)."""
    V.check_no_unexpected_kwargs("sparsemax_attention", unexpected, _SPARSEMAX_KWARGS)
    return RW.normaliser_call(SPARSEMAX_ATTENTION, "sparsemax_attention", q, k, v, mask, scale, length_scale, impl,
                              {})


def _check_alpha(alpha, H: int):
    if isinstance(alpha, bool):
        raise TypeError("alpha: expected a float > 1 or a float array of shape [H], got a bool")
    if isinstance(alpha, (int, float, np.floating, np.integer)):
        if not alpha > 1:
            raise ValueError(f"alpha: expected alpha > 1 (1 is softmax, 2 sparsemax), got {alpha}")
        return jnp.full((H,), float(alpha), jnp.float32)
    V.check_float_array("alpha", alpha)
    if np.shape(alpha) not in ((), (H,), (1,)):
        raise ValueError(f"alpha: expected a scalar or shape [H] = [{H}] (one alpha per query head), got "
                         f"{V.shape_str(alpha)}")
    if not isinstance(alpha, jax.core.Tracer) and not bool(np.all(np.asarray(alpha) > 1)):
        raise ValueError("alpha: every alpha must be > 1 (1 is softmax, 2 sparsemax)")
    return jnp.broadcast_to(jnp.asarray(alpha), (H,))


def _check_n_iter(n_iter):
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise ValueError(f"n_iter: expected an int >= 1 (bisection steps), got {n_iter!r}")


def entmax_attention(q: Float[ArrayLike, "*batch T H Dk"], k: Float[ArrayLike, "*batch S K Dk"],
                     v: Float[ArrayLike, "*batch S K Dv"], *, mask=None, scale: float | None = None,
                     alpha: float | Float[ArrayLike, " H"] = 1.5, n_iter: int = 50,
                     length_scale: float | None = None, impl="auto", **unexpected) -> Float[Array, "*batch T H Dv"]:
    """α-entmax attention (module docstring); layouts, masks and GQA as :func:`attn_jax.attention`.

    Args:
      alpha: a float > 1, or ``[H]`` (one per query head; differentiable: learn it as
        ``1 + sigmoid(a)``).  1 → softmax, 2 = sparsemax.
      n_iter: bisection steps for the threshold (each halves the bracket, initially ``≤ 1``).
      mask, scale, length_scale, impl: as :func:`attn_jax.variants.sigmoid_attention`
        (``impl``: ``"auto"`` / ``"reference"``; whole-row, materialised).
    """
    V.check_no_unexpected_kwargs("entmax_attention", unexpected, _ENTMAX_KWARGS)
    _check_n_iter(n_iter)
    a = _check_alpha(alpha, np.shape(q)[-2])
    return RW.normaliser_call(ENTMAX_ATTENTION, "entmax_attention", q, k, v, mask, scale, length_scale, impl,
                              {"n_iter": int(n_iter)}, arrays=(a,))


def _sparsemax_ref(p, q, k, v):
    return sparsemax_attention_reference(q, k, v, mask=p.mask, scale=p.scale)


def _entmax_ref(p, q, k, v, alpha):
    return entmax_attention_reference(q, k, v, alpha, mask=p.mask, scale=p.scale, n_iter=p.param("n_iter"))


def _explain_sparsemax(q, k, v, *, mask=None, scale=None, length_scale=None, impl="auto", platform=None):
    return RW.normaliser_call(SPARSEMAX_ATTENTION, "sparsemax_attention", q, k, v, mask, scale, length_scale, impl,
                              {}, run=False, platform=platform)


def _explain_entmax(q, k, v, *, mask=None, scale=None, alpha=1.5, n_iter=50, length_scale=None, impl="auto",
                    platform=None):
    return RW.normaliser_call(ENTMAX_ATTENTION, "entmax_attention", q, k, v, mask, scale, length_scale, impl,
                              {"n_iter": n_iter}, run=False, platform=platform)


for _registry, _ref in ((SPARSEMAX_ATTENTION, _sparsemax_ref), (ENTMAX_ATTENTION, _entmax_ref)):
    _registry.register("blockwise", RW.refuse_whole_row, RW.whole_row_reasons)   # declared so explain says why not
    _registry.register("reference", _ref, RW.no_reasons)
register_explainer(sparsemax_attention, _explain_sparsemax)
register_explainer(entmax_attention, _explain_entmax)

# ----------------------------------------------------------------------------- declarations
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

SPARSEMAX_DECLARATION = declare(Declaration(
    name="sparsemax", family="variants", title="Sparsemax attention (exact, sort-based)",
    papers=(Paper("From Softmax to Sparsemax: A Sparse Model of Attention and Multi-Label Classification", 2016,
                  "1602.02068", "Martins & Astudillo"),),
    summary="p = [z - τ(z)]_+ (exact by sort), exact Jacobian on the support", op=sparsemax_attention,
    directions=("causal",), layer="attn_jax.nn.variant_mixers:sparsemax_mixer",
    notes="whole-row normaliser: materialised [B, H, T, S]; explain says so"))

ENTMAX_DECLARATION = declare(Declaration(
    name="entmax", family="variants", title="α-entmax attention (learnable α per head)",
    papers=(Paper("Sparse Sequence-to-Sequence Models", 2019, "1905.05702", "Peters et al."),
            Paper("Adaptively Sparse Transformers", 2019, "1909.00015", "Correia et al.")),
    summary="p_i = [(α-1) z_i - τ]_+^{1/(α-1)} (bisection), implicit gradients in z and α", op=entmax_attention,
    directions=("causal",), layer="attn_jax.nn.variant_mixers:entmax_mixer",
    notes="whole-row normaliser: materialised [B, H, T, S]; explain says so"))
