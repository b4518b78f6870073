"""Tests for attn_jax.positional.t5 (T5 relative position buckets, arXiv:1910.10683)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_jax.core.bias import StructuredBias
from attn_jax.core.testing import check_structured_bias_tile
from attn_jax.positional import T5RelativeBias
from attn_jax.positional import relative_position_bucket as relative_position_bucket_eager

relative_position_bucket = jax.jit(
    relative_position_bucket_eager, static_argnames=("bidirectional", "num_buckets", "max_distance")
)
_tile = jax.jit(lambda b, q, k, T, S: b.tile(q, k, T, S), static_argnums=(3, 4))
_dense = jax.jit(lambda b, T, S: b.materialize(T, S), static_argnums=(1, 2))


def bucket_numpy(rel, *, bidirectional=True, num_buckets=32, max_distance=128):
    """Port of Mesh TensorFlow's _relative_position_bucket, scalar by scalar, float64 log."""
    out = []
    for d in np.asarray(rel).ravel().tolist():
        nb, ret = num_buckets, 0
        if bidirectional:
            nb //= 2
            ret += nb if d > 0 else 0
            n = abs(d)
        else:
            n = max(-d, 0)
        max_exact = nb // 2
        if n < max_exact:
            ret += n
        else:
            log_ratio = math.log(n / max_exact) / math.log(max_distance / max_exact)
            large = max_exact + int(log_ratio * (nb - max_exact))
            ret += min(large, nb - 1)
        out.append(ret)
    return np.array(out).reshape(np.shape(rel))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (8, 20), (64, 512)])
def test_buckets_match_numpy_port(bidirectional, num_buckets, max_distance):
    rel = np.arange(-3 * max_distance, 3 * max_distance + 1, dtype=np.int32)
    kw = dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    got = np.asarray(relative_position_bucket(jnp.asarray(rel), **kw))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, bucket_numpy(rel, **kw))
    assert got.min() >= 0 and got.max() == num_buckets - 1


def _buckets_of(ds, **kw):
    out = np.asarray(relative_position_bucket(jnp.asarray(ds, jnp.int32), **kw))
    return dict(zip(ds, out.tolist()))


def test_bucket_hand_values_bidirectional():
    ds = list(range(-8, 9)) + [-16, -32, -64, -127, -128, -10_000, 128, 10_000]
    b = _buckets_of(ds)
    assert b[0] == 0
    assert [b[-d] for d in range(1, 8)] == list(range(1, 8))  # exact buckets for past keys
    assert [b[d] for d in range(1, 8)] == list(range(17, 24))  # future keys use the upper half
    assert b[-8] == 8  # first log-spaced bucket
    assert b[-16] == 10 and b[-32] == 12 and b[-64] == 14  # 8 + 8 * log(n/8) / log(16)
    assert b[-127] == 15 and b[-128] == 15 and b[-10_000] == 15
    assert b[128] == 31 and b[10_000] == 31


def test_bucket_hand_values_unidirectional_and_monotone():
    b = _buckets_of([0, 5, -15, -16, -32, -64, -128, -5000], bidirectional=False)
    assert b[0] == 0 and b[5] == 0  # future keys all share bucket 0
    assert b[-15] == 15 and b[-16] == 16
    assert b[-32] == 21 and b[-64] == 26  # 16 + int(16 * log(n/16) / log(8))
    assert b[-128] == 31 and b[-5000] == 31
    past = np.asarray(relative_position_bucket(-jnp.arange(0, 400, dtype=jnp.int32), bidirectional=False))
    assert np.all(np.diff(past) >= 0) and np.all(np.diff(past) <= 1)
    future = np.asarray(relative_position_bucket(jnp.arange(1, 400, dtype=jnp.int32)))
    assert np.all(np.diff(future) >= 0) and future[0] == 17


def _table(num_buckets, heads, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((num_buckets, heads)), jnp.float32)


def test_materialize_values_and_alignment():
    table = _table(16, 3)
    bias = T5RelativeBias(table, bidirectional=False, max_distance=20)
    assert isinstance(bias, StructuredBias) and bias.num_heads == 3 and bias.num_buckets == 16
    T, S = 3, 7
    dense = np.asarray(_dense(bias, T, S))
    assert dense.shape == (1, 3, T, S) and dense.dtype == np.float32
    rel = np.arange(S)[None, :] - (np.arange(T)[:, None] + S - T)
    buckets = bucket_numpy(rel, bidirectional=False, num_buckets=16, max_distance=20)
    np.testing.assert_array_equal(dense[0], np.transpose(np.asarray(table)[buckets], (2, 0, 1)))



# A handful of (T, S) keeps compilations few; hypothesis explores the index subsets.
@settings(max_examples=20, deadline=None)
@given(TS=st.sampled_from([(1, 30), (6, 6), (25, 9), (13, 40)]), data=st.data())
def test_tile_equals_slice_of_materialize(TS, data):
    T, S = TS
    bias = T5RelativeBias(_table(8, 2), max_distance=16)
    q_idx = data.draw(st.lists(st.integers(0, T - 1), min_size=4, max_size=4))
    k_idx = data.draw(st.lists(st.integers(0, S - 1), min_size=6, max_size=6))
    assert _tile(bias, jnp.asarray(q_idx), jnp.asarray(k_idx), T, S).shape == (1, 2, 4, 6)
    check_structured_bias_tile(bias, T, S, q_idx, k_idx)


def test_gradient_wrt_table_is_scatter_add_by_bucket():
    T, S, H, nb = 5, 9, 2, 8
    bias = T5RelativeBias(_table(nb, H), max_distance=16)
    cot = np.random.default_rng(3).standard_normal((1, H, T, S)).astype(np.float32)
    grad_fn = jax.jit(lambda b, c: jax.vjp(lambda b: b.materialize(T, S), b)[1](c)[0])
    g = grad_fn(bias, jnp.asarray(cot))
    assert isinstance(g, T5RelativeBias)
    rel = np.arange(S)[None, :] - (np.arange(T)[:, None] + S - T)
    buckets = bucket_numpy(rel, num_buckets=nb, max_distance=16)
    expected = np.zeros((nb, H), np.float64)
    np.add.at(expected, buckets, np.transpose(cot[0], (1, 2, 0)))
    np.testing.assert_allclose(np.asarray(g.table), expected, rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(expected) > 0 and bias.parameters()[0] is bias.table


def test_pytree_under_jit_keeps_static_config():
    bias = T5RelativeBias(_table(32, 2).astype(jnp.bfloat16), bidirectional=False, max_distance=64)
    out = _dense(bias, 4, 6)
    assert out.dtype == jnp.float32
    rel = np.arange(6)[None, :] - (np.arange(4)[:, None] + 2)
    buckets = bucket_numpy(rel, bidirectional=False, num_buckets=32, max_distance=64)
    expected = np.asarray(bias.table, np.float32)[buckets].transpose(2, 0, 1)[None]
    np.testing.assert_array_equal(np.asarray(out), expected)
    rebuilt = jax.tree_util.tree_map(lambda t: t, bias)
    config = (rebuilt.bidirectional, rebuilt.num_buckets, rebuilt.max_distance, rebuilt.num_heads)
    assert config == (False, 32, 64, 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="table"):
        T5RelativeBias(jnp.ones(32))
    with pytest.raises(TypeError, match="table"):
        T5RelativeBias(jnp.ones((32, 2), jnp.int32))
    with pytest.raises(ValueError, match="num_buckets"):
        T5RelativeBias(jnp.ones((32, 2)), num_buckets=16)
    with pytest.raises(ValueError, match="max_distance"):
        T5RelativeBias(jnp.ones((32, 2)), max_distance=8)
    relative_position_bucket = relative_position_bucket_eager
    with pytest.raises(ValueError, match="num_buckets"):
        relative_position_bucket(jnp.arange(3), num_buckets=2)
    with pytest.raises(TypeError, match="relative_position"):
        relative_position_bucket(jnp.arange(3.0))
    with pytest.raises(TypeError, match="bidirectional"):
        relative_position_bucket(jnp.arange(3), bidirectional=1)
