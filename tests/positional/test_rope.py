"""Tests for attn_jax.positional.rope against a float64 NumPy reference built from rotation matrices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.positional import RopeScaling, rope_frequencies, yarn_attention_factor
from attn_jax.positional import apply_rope as apply_rope_eager

# Most tests go through jit: one compilation per configuration is much cheaper than eager
# dispatch of every primitive, and jit is the path users run.  Eager is covered below.
apply_rope = jax.jit(apply_rope_eager, static_argnames=("base", "rotary_fraction", "interleaved", "scaling"))


def _rotation_matrix(angles: np.ndarray, d: int, interleaved: bool) -> np.ndarray:
    """Block rotation acting on the pairs (a_i, b_i) of a d-vector (float64)."""
    R = np.zeros((d, d))
    for i, theta in enumerate(angles):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + d // 2)
        c, s = math.cos(theta), math.sin(theta)
        R[a, a], R[a, b] = c, -s
        R[b, a], R[b, b] = s, c
    return R


def rope_numpy(x, positions, *, base=10000.0, rotary_dim=None, interleaved=False):
    x = np.asarray(x, np.float64)
    B, T, H, D = x.shape
    d = D if rotary_dim is None else rotary_dim
    positions = np.broadcast_to(np.asarray(positions, np.float64), (B, T))
    theta = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    out = x.copy()
    for b in range(B):
        for t in range(T):
            R = _rotation_matrix(positions[b, t] * theta, d, interleaved)
            out[b, t, :, :d] = x[b, t, :, :d] @ R.T
    return out


def _x(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("D,fraction", [(8, 1.0), (12, 0.5), (10, 1.0)])
def test_matches_numpy_rotation_matrices(interleaved, D, fraction):
    x = _x((2, 7, 3, D))
    positions = np.random.default_rng(1).integers(0, 100, size=(2, 7))
    out = apply_rope(x, jnp.asarray(positions), rotary_fraction=fraction, interleaved=interleaved)
    ref = rope_numpy(x, positions, rotary_dim=int(D * fraction), interleaved=interleaved)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, atol=5e-5, rtol=1e-5)


def test_half_split_and_interleaved_differ_by_a_dim_permutation():
    D = 8
    x = _x((1, 5, 2, D))
    # half-split slot i holds interleaved dim 2i, slot i + D/2 holds dim 2i + 1.
    perm = np.concatenate([np.arange(0, D, 2), np.arange(1, D, 2)])
    half = apply_rope(x[..., perm], interleaved=False)
    inter = apply_rope(x, interleaved=True)
    np.testing.assert_allclose(np.asarray(half), np.asarray(inter)[..., perm], atol=1e-6)
    # The conventions are not the same map on unpermuted inputs.
    assert not np.allclose(np.asarray(apply_rope(x, interleaved=False)), np.asarray(inter), atol=1e-3)


@pytest.mark.parametrize("interleaved", [False, True])
def test_relative_property(interleaved):
    q, k = _x((1, 1, 1, 16), seed=2), _x((1, 1, 1, 16), seed=3)

    def score(m, n):
        qm = apply_rope(q, jnp.array([m]), interleaved=interleaved)
        kn = apply_rope(k, jnp.array([n]), interleaved=interleaved)
        return float(jnp.sum(qm * kn))

    same_offset = [score(m, m - 3) for m in (3, 40, 517)]
    np.testing.assert_allclose(same_offset, same_offset[0], rtol=1e-4, atol=1e-4)
    assert abs(score(10, 7) - score(10, 2)) > 1e-3


def test_partial_rotary_leaves_tail_unchanged():
    x = _x((2, 6, 2, 12))
    out = apply_rope(x, rotary_fraction=0.5)
    np.testing.assert_array_equal(np.asarray(out[..., 6:]), np.asarray(x[..., 6:]))
    np.testing.assert_allclose(np.asarray(out[..., :6]), np.asarray(apply_rope(x[..., :6])), atol=1e-6)
    assert not np.allclose(np.asarray(out[..., :6]), np.asarray(x[..., :6]))


def test_explicit_positions_equal_default():
    x = _x((2, 9, 2, 8))
    default = apply_rope(x)
    np.testing.assert_array_equal(np.asarray(apply_rope(x, jnp.arange(9))), np.asarray(default))
    np.testing.assert_array_equal(
        np.asarray(apply_rope(x, jnp.tile(jnp.arange(9), (2, 1)))), np.asarray(default)
    )
    # Packed sequences: a restart of positions equals applying RoPE to the document alone.
    packed = jnp.concatenate([jnp.arange(4), jnp.arange(5)])
    out = apply_rope(x, packed)
    np.testing.assert_allclose(np.asarray(out[:, 4:]), np.asarray(apply_rope(x[:, 4:])), atol=1e-6)


def test_linear_scaling_equals_divided_positions():
    x = _x((1, 11, 2, 8))
    pos = jnp.arange(11) * 7
    scaled = apply_rope(x, pos, scaling=RopeScaling("linear", 4.0))
    divided = apply_rope(x, pos.astype(jnp.float32) / 4.0)
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(divided), atol=2e-5)


def test_ntk_base_formula():
    d, base, factor = 64, 10000.0, 8.0
    got = rope_frequencies(d, base=base, scaling=RopeScaling("ntk", factor))
    new_base = base * factor ** (d / (d - 2))
    expected = new_base ** (-np.arange(0, d, 2) / d)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
    assert got[0] == 1.0  # the highest frequency is untouched
    # The lowest frequency is interpolated by exactly `factor` relative to base (NTK's design).
    plain = rope_frequencies(d, base=base)
    np.testing.assert_allclose(float(plain[-1] / got[-1]), factor, rtol=1e-5)


def test_yarn_frequencies_three_regimes():
    d, base, factor, L = 128, 10000.0, 16.0, 4096
    plain = np.asarray(rope_frequencies(d, base=base))
    scaling = RopeScaling("yarn", factor, original_max_position=L)
    got = np.asarray(rope_frequencies(d, base=base, scaling=scaling))
    # Independent evaluation of the paper's definition: r_i = L / lambda_i rotations over L.
    rotations = L / (2 * np.pi / plain.astype(np.float64))
    high_freq = rotations > 32  # beyond beta_fast: extrapolate (keep theta)
    low_freq = rotations < 1  # below beta_slow: interpolate (theta / factor)
    assert high_freq.sum() > 3 and low_freq.sum() > 3 and (~high_freq & ~low_freq).sum() > 3
    np.testing.assert_allclose(got[high_freq], plain[high_freq], rtol=1e-6)
    np.testing.assert_allclose(got[low_freq], plain[low_freq] / factor, rtol=1e-6)
    mid = ~high_freq & ~low_freq
    ratio = got[mid] / plain[mid]
    assert np.all(ratio <= 1 + 1e-6) and np.all(ratio >= 1 / factor - 1e-6)
    assert np.all(np.diff(ratio) <= 1e-6)  # the ramp moves monotonically towards interpolation
    assert np.any((ratio < 1 - 1e-3) & (ratio > 1 / factor + 1e-3))


def test_yarn_frequencies_hand_values():
    # d=8, base=1e4, L=2048: pair index of 32 rotations = 8 ln(2048 / 64 pi) / (2 ln 1e4) = 1.008
    # -> floor 1; of 1 rotation = 2.513 -> ceil 3.  Ramp over i = 0..3: [0, 0, 0.5, 1].
    scaling = RopeScaling("yarn", 4.0, original_max_position=2048)
    got = np.asarray(rope_frequencies(8, scaling=scaling))
    np.testing.assert_allclose(got, [1.0, 0.1, 0.01 * (0.5 / 4 + 0.5), 0.001 / 4], rtol=1e-6)


def test_yarn_attention_factor_and_application():
    assert yarn_attention_factor(1.0) == 1.0
    assert yarn_attention_factor(0.5) == 1.0
    assert yarn_attention_factor(8.0) == pytest.approx(0.1 * math.log(8.0) + 1.0)
    x = _x((1, 3, 2, 12))
    scaling = RopeScaling("yarn", 8.0, original_max_position=64)
    out = apply_rope(x, jnp.zeros(3, jnp.int32), rotary_fraction=0.5, scaling=scaling)
    # Position 0: cos = 1, sin = 0, so the rotated dims are scaled by sqrt(1/t) only.
    expected = np.asarray(x[..., :6]) * yarn_attention_factor(8.0)
    np.testing.assert_allclose(np.asarray(out[..., :6]), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out[..., 6:]), np.asarray(x[..., 6:]))


def test_bf16_in_bf16_out():
    x32 = _x((2, 5, 2, 16))
    out = apply_rope(x32.astype(jnp.bfloat16), jnp.arange(5) * 13)
    assert out.dtype == jnp.bfloat16
    ref = apply_rope(x32.astype(jnp.bfloat16).astype(jnp.float32), jnp.arange(5) * 13)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2, rtol=1e-2)


def test_jit_grad_vmap():
    x = _x((2, 6, 2, 8))
    pos = jnp.asarray(np.random.default_rng(5).integers(0, 50, (2, 6)))
    f = lambda x, p: apply_rope_eager(x, p, rotary_fraction=0.5, interleaved=True)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x, pos)), np.asarray(f(x, pos)), atol=1e-6)
    f = jax.jit(f)
    # RoPE is orthogonal: its VJP is the rotation by the negated angles.
    ct = _x(x.shape, seed=9)
    _, vjp = jax.vjp(lambda x: f(x, pos), x)
    (dx,) = vjp(ct)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(f(ct, -pos)), atol=1e-5)
    xs = jnp.stack([x, 2 * x])
    out = jax.vmap(lambda x: f(x, pos))(xs)
    np.testing.assert_allclose(np.asarray(out[1]), 2 * np.asarray(f(x, pos)), atol=1e-5)


def test_bad_inputs():
    apply_rope = apply_rope_eager
    x = _x((1, 4, 2, 6))
    with pytest.raises(ValueError, match="rotary_fraction.*3"):
        apply_rope(x, rotary_fraction=0.5)  # int(6 * 0.5) = 3 is odd
    with pytest.raises(ValueError, match="positions"):
        apply_rope(x, jnp.arange(5))
    with pytest.raises(ValueError, match="positions"):
        apply_rope(x, jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(TypeError, match="positions"):
        apply_rope(x, jnp.zeros(4, bool))
    with pytest.raises(ValueError, match="rank 4"):
        apply_rope(x[0])
    with pytest.raises(TypeError, match="floating"):
        apply_rope(jnp.zeros((1, 4, 2, 6), jnp.int32))
    with pytest.raises(ValueError, match="rotary_dim"):
        rope_frequencies(7)
    with pytest.raises(ValueError, match="kind"):
        RopeScaling("dynamic", 2.0)
    with pytest.raises(ValueError, match="original_max_position"):
        RopeScaling("yarn", 2.0)
    with pytest.raises(ValueError, match="factor"):
        RopeScaling("linear", 0.0)
    with pytest.raises(TypeError, match="scaling"):
        apply_rope(x, scaling="linear")
