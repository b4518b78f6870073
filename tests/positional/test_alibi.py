"""Tests for attn_jax.positional.alibi (ALiBi, arXiv:2108.12409)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_jax.core.bias import StructuredBias
from attn_jax.core.testing import check_structured_bias_tile
from attn_jax.positional import ALiBi, alibi, alibi_slopes

# Jitted with static lengths: one cached compilation per shape instead of eager op dispatch.
_tile = jax.jit(lambda b, q, k, T, S: b.tile(q, k, T, S), static_argnums=(3, 4))
_dense = jax.jit(lambda b, T, S: b.materialize(T, S), static_argnums=(1, 2))


def test_slopes_power_of_two():
    np.testing.assert_array_equal(np.asarray(alibi_slopes(8)), [2.0**-k for k in range(1, 9)])
    expected_16 = [2.0 ** (-k / 2) for k in range(1, 17)]
    np.testing.assert_allclose(np.asarray(alibi_slopes(16)), expected_16, rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(alibi_slopes(1)), [2.0**-8])
    assert alibi_slopes(8).dtype == jnp.float32


def test_slopes_non_power_of_two_follow_reference_rule():
    # n = 12: the 8 slopes of 8 heads, then slopes(16)[0::2][:4] = 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    expected_12 = [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    np.testing.assert_allclose(np.asarray(alibi_slopes(12)), expected_12, rtol=1e-7)
    # n = 6: slopes of 4 heads (2^-2 .. 2^-8), then slopes(8)[0::2][:2] = 2^-1, 2^-3.
    expected_6 = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    np.testing.assert_allclose(np.asarray(alibi_slopes(6)), expected_6, rtol=1e-7)
    assert len(set(np.asarray(alibi_slopes(12)).tolist())) == 12


def test_materialize_values_square():
    bias = alibi(4)
    assert isinstance(bias, StructuredBias) and bias.num_heads == 4 and bias.causal
    dense = np.asarray(bias.materialize(5, 5))
    assert dense.shape == (1, 4, 5, 5) and dense.dtype == np.float32
    slopes = np.asarray(alibi_slopes(4))
    i, j = np.arange(5)[:, None], np.arange(5)[None, :]
    np.testing.assert_allclose(dense[0], -slopes[:, None, None] * np.abs(i - j)[None], rtol=1e-7)
    # The paper's causal row: [-(i-1), ..., -1, 0] * m on and before the diagonal.
    np.testing.assert_allclose(dense[0, 0, 3, :4], -slopes[0] * np.array([3, 2, 1, 0]))


def test_bottom_right_alignment_when_T_differs_from_S():
    bias = alibi(2)
    T, S = 2, 5
    dense = np.asarray(_dense(bias, T, S))
    slopes = np.asarray(alibi_slopes(2))
    qpos = np.arange(T)[:, None] + (S - T)
    np.testing.assert_allclose(dense[0], -slopes[:, None, None] * np.abs(qpos - np.arange(S))[None])
    # Decoding one token sees the last row of the full square bias.
    decode_row = np.asarray(_dense(bias, 1, S))[0, :, 0]
    np.testing.assert_array_equal(decode_row, np.asarray(_dense(bias, S, S))[0, :, -1])


# A handful of (T, S) keeps compilations few; hypothesis explores the index subsets.
@settings(max_examples=20, deadline=None)
@given(TS=st.sampled_from([(1, 9), (5, 5), (9, 4), (3, 11)]), data=st.data())
def test_tile_equals_slice_of_materialize(TS, data):
    T, S = TS
    bias = alibi(3)
    # Arbitrary order, repeats allowed: fast paths may pass any index subset.
    q_idx = data.draw(st.lists(st.integers(0, T - 1), min_size=4, max_size=4))
    k_idx = data.draw(st.lists(st.integers(0, S - 1), min_size=5, max_size=5))
    assert _tile(bias, jnp.asarray(q_idx), jnp.asarray(k_idx), T, S).shape == (1, 3, 4, 5)
    check_structured_bias_tile(bias, T, S, q_idx, k_idx)


def test_pytree_round_trip_under_jit_and_grad():
    bias = ALiBi(alibi_slopes(4), causal=False)
    leaves, treedef = jax.tree_util.tree_flatten(bias)
    assert len(leaves) == 1
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.causal is False and rebuilt.num_heads == 4

    @jax.jit
    def f(b, q0):
        q_idx = q0 + jnp.arange(2, dtype=jnp.int32)  # traced tile offsets, as fast paths pass
        return b.tile(q_idx, jnp.arange(6, dtype=jnp.int32), 4, 6)

    np.testing.assert_array_equal(np.asarray(f(bias, 2)), np.asarray(_dense(bias, 4, 6))[:, :, 2:4])
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda b: b)(bias).slopes), np.asarray(bias.slopes))
    # Gradient reaches the slopes: d/dm_h sum(bias) = -sum |qpos - j|.
    g = jax.jit(jax.grad(lambda b: jnp.sum(b.materialize(3, 3))))(bias)
    assert isinstance(g, ALiBi)
    np.testing.assert_allclose(np.asarray(g.slopes), -np.full(4, 8.0))
    assert bias.parameters()[0] is bias.slopes


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)
    with pytest.raises(TypeError, match="num_heads"):
        alibi_slopes(4.0)
    with pytest.raises(ValueError, match="slopes"):
        ALiBi(jnp.ones((2, 2)))
    with pytest.raises(TypeError, match="slopes"):
        ALiBi(jnp.ones(2, jnp.int32))
    with pytest.raises(TypeError, match="causal"):
        ALiBi(jnp.ones(2), causal="yes")
    with pytest.raises(ValueError, match="q_idx"):
        alibi(2).tile(jnp.zeros((2, 2), jnp.int32), jnp.arange(3), 2, 3)
    with pytest.raises(TypeError, match="k_idx"):
        alibi(2).tile(jnp.arange(2), jnp.arange(3.0), 2, 3)
