"""Tests for attn_jax.positional.absolute (sinusoidal, arXiv:1706.03762 Sec. 3.5; learned table)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.positional import init_learned_absolute, learned_absolute_embedding, sinusoidal_embedding


def sinusoidal_numpy(positions, dim, base=10000.0):
    pe = np.zeros(np.shape(positions) + (dim,))
    pos = np.asarray(positions, np.float64)
    for i in range(dim // 2):
        pe[..., 2 * i] = np.sin(pos / base ** (2 * i / dim))
        pe[..., 2 * i + 1] = np.cos(pos / base ** (2 * i / dim))
    return pe


def test_sinusoidal_matches_formula():
    pos = np.arange(64)
    out = sinusoidal_embedding(jnp.asarray(pos), 16)
    assert out.shape == (64, 16) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), sinusoidal_numpy(pos, 16), atol=2e-5)
    out = sinusoidal_embedding(jnp.asarray(pos), 10, base=100.0)
    np.testing.assert_allclose(np.asarray(out), sinusoidal_numpy(pos, 10, base=100.0), atol=2e-5)


def test_sinusoidal_known_values():
    out = np.asarray(sinusoidal_embedding(jnp.array([0, 1]), 8))
    np.testing.assert_array_equal(out[0], [0, 1, 0, 1, 0, 1, 0, 1])  # sin 0, cos 0, ...
    np.testing.assert_allclose(out[1, :2], [math.sin(1.0), math.cos(1.0)], rtol=1e-6)
    np.testing.assert_allclose(out[1, 2:4], [math.sin(1e-1), math.cos(1e-1)], rtol=1e-6)  # 10000^(2/8) = 10
    np.testing.assert_allclose(out[1, 6], math.sin(1e-3), rtol=1e-5)


def test_sinusoidal_batched_and_jit():
    pos = jnp.asarray(np.random.default_rng(0).integers(0, 500, (3, 7)))
    out = jax.jit(sinusoidal_embedding, static_argnums=1)(pos, 12)
    assert out.shape == (3, 7, 12)
    np.testing.assert_allclose(np.asarray(out), sinusoidal_numpy(np.asarray(pos), 12), atol=1e-4)


def test_learned_gathers_rows_and_grads_scatter():
    table = init_learned_absolute(jax.random.key(0), 10, 4)
    pos = jnp.array([[0, 3, 3], [9, 1, 0]])
    out = learned_absolute_embedding(table, pos)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(table)[np.asarray(pos)])
    g = jax.grad(lambda t: jnp.sum(learned_absolute_embedding(t, pos)))(table)
    counts = np.bincount(np.asarray(pos).ravel(), minlength=10)
    np.testing.assert_array_equal(np.asarray(g), np.repeat(counts[:, None], 4, axis=1).astype(np.float32))


def test_learned_out_of_range_raises_eagerly_and_clips_under_jit():
    table = init_learned_absolute(jax.random.key(1), 6, 3)
    with pytest.raises(ValueError, match=r"positions.*\[0, 5\].*max 6"):
        learned_absolute_embedding(table, jnp.array([0, 6]))
    with pytest.raises(ValueError, match="positions"):
        learned_absolute_embedding(table, np.array([-1, 2]))
    out = jax.jit(learned_absolute_embedding)(table, jnp.array([0, 9]))  # documented: clipped
    np.testing.assert_array_equal(np.asarray(out), np.asarray(table)[[0, 5]])


def test_init_learned_absolute():
    init = jax.jit(init_learned_absolute, static_argnums=(1, 2))
    a = init(jax.random.key(2), 512, 64)
    b = init(jax.random.key(2), 512, 64)
    assert a.shape == (512, 64) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert abs(float(np.std(a)) - 0.02) < 0.001 and abs(float(np.mean(a))) < 0.001
    assert not np.array_equal(np.asarray(init(jax.random.key(3), 512, 64)), np.asarray(a))
    c = init_learned_absolute(jax.random.key(2), 8, 4, stddev=1.0, dtype=jnp.bfloat16)
    assert c.dtype == jnp.bfloat16


def test_bad_inputs():
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_embedding(jnp.arange(3), 7)
    with pytest.raises(TypeError, match="dim"):
        sinusoidal_embedding(jnp.arange(3), 8.0)
    with pytest.raises(TypeError, match="positions"):
        sinusoidal_embedding(jnp.zeros(3, bool), 8)
    with pytest.raises(ValueError, match="table"):
        learned_absolute_embedding(jnp.zeros(5), jnp.arange(2))
    with pytest.raises(TypeError, match="positions"):
        learned_absolute_embedding(jnp.zeros((5, 2)), jnp.arange(2.0))
    with pytest.raises(ValueError, match="max_len"):
        init_learned_absolute(jax.random.key(0), 0, 4)
