"""Tests for attn_jax.positional.xpos (xPos, arXiv:2212.10554)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.positional import apply_rope as apply_rope_eager
from attn_jax.positional import apply_xpos

xpos = jax.jit(apply_xpos, static_argnames=("is_key", "base", "scale_base", "gamma", "interleaved"))
apply_rope = jax.jit(apply_rope_eager)


def xpos_numpy(x, positions, *, is_key, base=10000.0, scale_base=512.0, gamma=0.4, interleaved=False):
    """Float64 xPos from the paper: zeta^(+-n/scale_base) * R_n x, pair by pair."""
    x = np.asarray(x, np.float64)
    B, T, H, D = x.shape
    half = D // 2
    positions = np.broadcast_to(np.asarray(positions, np.float64), (B, T))
    out = np.empty_like(x)
    for i in range(half):
        theta = base ** (-2.0 * i / D)
        zeta = (2.0 * i + gamma * D) / ((1.0 + gamma) * D)  # torchscale's form of the same base
        a_idx, b_idx = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        for b in range(B):
            for t in range(T):
                n = positions[b, t]
                s = zeta ** ((-n if is_key else n) / scale_base)
                c, sn = np.cos(n * theta), np.sin(n * theta)
                a, bb = x[b, t, :, a_idx], x[b, t, :, b_idx]
                out[b, t, :, a_idx] = s * (a * c - bb * sn)
                out[b, t, :, b_idx] = s * (bb * c + a * sn)
    return out


def _x(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("is_key", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
def test_matches_numpy_reference(is_key, interleaved):
    x = _x((2, 5, 2, 8))
    pos = np.random.default_rng(1).integers(0, 2000, (2, 5))
    out = xpos(x, jnp.asarray(pos), is_key=is_key, interleaved=interleaved)
    ref = xpos_numpy(x, pos, is_key=is_key, interleaved=interleaved)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-4, atol=1e-4)


def test_score_depends_only_on_relative_distance_and_decays():
    q, k = _x((1, 1, 1, 16), seed=2), _x((1, 1, 1, 16), seed=3)

    def score(n, m):
        qn = xpos(q, jnp.array([n]), is_key=False)
        km = xpos(k, jnp.array([m]), is_key=True)
        return float(jnp.sum(qn * km))

    same = [score(n, n - 6) for n in (6, 300, 2100)]
    np.testing.assert_allclose(same, same[0], rtol=1e-3)
    # Not plain RoPE: the same offset scores differently from RoPE's.
    rope = float(jnp.sum(apply_rope(q, jnp.array([6])) * apply_rope(k, jnp.array([0]))))
    assert abs(same[0] - rope) > 1e-4


def test_pair_norms_scale_by_zeta_to_the_n_over_scale_base():
    # A rotation keeps each pair's norm, so only the envelope zeta_i^(+-n/512) changes it.
    D, n = 8, 1024
    x = _x((1, 1, 1, D), seed=6)
    pair_norm = lambda y: np.hypot(np.asarray(y)[..., : D // 2], np.asarray(y)[..., D // 2 :])[0, 0, 0]
    zeta = (np.arange(D // 2) / (D // 2) + 0.4) / 1.4
    q = xpos(x, jnp.array([n]), is_key=False)
    k = xpos(x, jnp.array([n]), is_key=True)
    np.testing.assert_allclose(pair_norm(q), pair_norm(x) * zeta**2.0, rtol=1e-5)
    np.testing.assert_allclose(pair_norm(k), pair_norm(x) * zeta**-2.0, rtol=1e-5)


def test_reduces_to_rope_as_scale_goes_to_one():
    x = _x((1, 7, 2, 8))
    pos = jnp.arange(7) * 50
    np.testing.assert_allclose(
        np.asarray(xpos(x, pos, is_key=True, gamma=1e9)), np.asarray(apply_rope(x, pos)), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(xpos(x, pos, is_key=False, scale_base=1e12)), np.asarray(apply_rope(x, pos)), atol=1e-5
    )
    assert not np.allclose(np.asarray(xpos(x, pos, is_key=True)), np.asarray(apply_rope(x, pos)), atol=1e-3)


def test_shifting_positions_leaves_scores_unchanged():
    # The documented way to centre long sequences (as torchscale does) is exact up to rounding.
    q, k = _x((1, 9, 1, 8), seed=4), _x((1, 9, 1, 8), seed=5)
    pos = jnp.arange(9) * 100

    def scores(p):
        qp = xpos(q, p, is_key=False, interleaved=True)
        kp = xpos(k, p, is_key=True, interleaved=True)
        return np.asarray(jnp.einsum("bthd,bshd->ts", qp, kp))

    np.testing.assert_allclose(scores(pos - 400), scores(pos), rtol=1e-4, atol=1e-4)


def test_dtype_jit_grad():
    x = _x((2, 4, 2, 8))
    out = xpos(x.astype(jnp.bfloat16), is_key=False)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(xpos(x, is_key=False)), atol=3e-2, rtol=2e-2
    )
    g = jax.grad(lambda x: jnp.sum(xpos(x, jnp.arange(4) * 100, is_key=True) ** 2))(x)
    assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)


def test_bad_inputs():
    x = _x((1, 3, 2, 8))
    with pytest.raises(TypeError):
        apply_xpos(x)  # is_key is required
    with pytest.raises(TypeError, match="is_key"):
        apply_xpos(x, is_key=1)
    with pytest.raises(ValueError, match="even"):
        apply_xpos(_x((1, 3, 2, 7)), is_key=False)
    with pytest.raises(ValueError, match="gamma"):
        apply_xpos(x, is_key=False, gamma=0.0)
    with pytest.raises(ValueError, match="positions"):
        apply_xpos(x, jnp.arange(4), is_key=False)
    with pytest.raises(ValueError, match="rank 4"):
        apply_xpos(x[0], is_key=False)
