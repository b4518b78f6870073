"""Mask algebra: the three lowerings agree, with exactness for primitives and soundness for compositions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_jax import masks
from attn_jax.core.masks import EMPTY, FULL, PARTIAL
from attn_jax.core.testing import fast_jit, random_segment_ids

# Data-dependent masks run their lowerings as one fast-compiled program per shape (eager, every
# op compiled separately at every shape); positional masks stay eager (classify is NumPy).
_materialize = fast_jit(lambda m, T, S: m.materialize(T, S), static_argnums=(1, 2))
_classify = fast_jit(lambda m, T, S, bq, bk: m.classify(T, S, bq, bk), static_argnums=(1, 2, 3, 4))
_predicate = fast_jit(lambda m, qi, ki, T, S: m.predicate(qi, ki, T, S), static_argnums=(3, 4))


def _lowerings(mask):
    """(materialize, classify, predicate) of ``mask``: jitted for data-dependent masks."""
    if mask.is_static:
        return mask.materialize, mask.classify, mask.predicate
    return (lambda *a: _materialize(mask, *a)), (lambda *a: _classify(mask, *a)), (lambda *a: _predicate(mask, *a))


def numpy_visible(kind, T, S, **kw):
    """Independent float-free NumPy definition of each primitive, [T, S] or [B, T, S]."""
    i = np.arange(T)[:, None]
    j = np.arange(S)[None, :]
    off = kw.get("offset")
    p = i + (S - T if off is None else off)
    if kind == "causal":
        return j <= p
    if kind == "window":
        return (j >= p - kw["left"]) & (j <= p + kw["right"])
    if kind == "chunked":
        return (p // kw["size"]) == (j // kw["size"])
    if kind == "prefix":
        return (j < kw["n"]) | (j <= p)
    raise ValueError(kind)


def block_truth(vis, bq, bk):
    """Exact classification of a [..., T, S] boolean array."""
    T, S = vis.shape[-2:]
    nq, nk = -(-T // bq), -(-S // bk)
    out = np.zeros(vis.shape[:-2] + (nq, nk), np.int8)
    for a in range(nq):
        for b in range(nk):
            tile = vis[..., a * bq:(a + 1) * bq, b * bk:(b + 1) * bk]
            anyv, allv = tile.any(axis=(-1, -2)), tile.all(axis=(-1, -2))
            out[..., a, b] = np.where(~anyv, EMPTY, np.where(allv, FULL, PARTIAL))
    return out


def check_sound(cls, vis, bq, bk):
    truth = block_truth(np.asarray(vis), bq, bk)
    cls = np.broadcast_to(np.asarray(cls), truth.shape)
    assert not ((cls == EMPTY) & (truth != EMPTY)).any(), "a tile classified EMPTY has a visible pair"
    assert not ((cls == FULL) & (truth != FULL)).any(), "a tile classified FULL has a hidden pair"
    return truth, cls


def check_exact(mask, T, S, bq, bk):
    materialize, classify, _ = _lowerings(mask)
    vis = np.asarray(materialize(T, S))
    truth, cls = check_sound(classify(T, S, bq, bk), vis, bq, bk)
    np.testing.assert_array_equal(cls, np.broadcast_to(truth, cls.shape))


def check_predicate(mask, T, S, rng):
    materialize, _, predicate = _lowerings(mask)
    full = np.asarray(materialize(T, S))
    qi = np.sort(rng.choice(T, size=min(T, 5), replace=False))
    ki = np.sort(rng.choice(S, size=min(S, 7), replace=False))
    sub = np.asarray(predicate(jnp.asarray(qi), jnp.asarray(ki), T, S))
    np.testing.assert_array_equal(np.broadcast_to(sub, full[..., qi[:, None], ki[None, :]].shape),
                                  full[..., qi[:, None], ki[None, :]])


sizes = st.integers(1, 40)
blocks = st.integers(1, 12)
# Data-dependent masks run eager JAX ops, which compile once per shape: draw from a few shapes.
data_sizes = st.sampled_from([1, 7, 16, 33])
data_blocks = st.sampled_from([1, 3, 8])


@st.composite
def primitive(draw):
    kind = draw(st.sampled_from(["causal", "window", "chunked", "prefix"]))
    offset = draw(st.one_of(st.none(), st.integers(-10, 10)))
    if kind == "causal":
        return kind, masks.causal(offset), {"offset": offset}
    if kind == "window":
        left, right = draw(st.integers(0, 12)), draw(st.integers(0, 6))
        return kind, masks.sliding_window(left, right, offset=offset), {"left": left, "right": right, "offset": offset}
    if kind == "chunked":
        size = draw(st.integers(1, 10))
        return kind, masks.chunked(size, offset=offset), {"size": size, "offset": offset}
    n = draw(st.integers(0, 20))
    return kind, masks.prefix_lm(n, offset=offset), {"n": n, "offset": offset}


@settings(max_examples=60, deadline=None)
@given(primitive(), sizes, sizes, blocks, blocks, st.integers(0, 2**31 - 1))
def test_positional_primitives_all_lowerings_agree(prim, T, S, bq, bk, seed):
    kind, mask, kw = prim
    vis = np.asarray(mask.materialize(T, S))[0, 0]
    np.testing.assert_array_equal(vis, numpy_visible(kind, T, S, **kw))
    check_exact(mask, T, S, bq, bk)
    check_predicate(mask, T, S, np.random.default_rng(seed))


@settings(max_examples=40, deadline=None)
@given(primitive(), primitive(), st.sampled_from(["and", "or"]), sizes, sizes, blocks, blocks)
def test_compositions_are_sound(a, b, op, T, S, bq, bk):
    m = (a[1] & b[1]) if op == "and" else (a[1] | b[1])
    va, vb = np.asarray(a[1].materialize(T, S)), np.asarray(b[1].materialize(T, S))
    vis = np.asarray(m.materialize(T, S))
    np.testing.assert_array_equal(vis, (va & vb) if op == "and" else (va | vb))
    check_sound(m.classify(T, S, bq, bk), vis, bq, bk)
    check_predicate(m, T, S, np.random.default_rng(T * 100 + S))
    assert m.is_static


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([1, 3]), data_sizes, data_blocks, data_blocks, st.integers(0, 1000))
def test_segments_sound_and_predicate(B, T, bq, bk, seed):
    ids = random_segment_ids(jax.random.key(seed), B, T, max_segments=4, pad_fraction=0.3)
    m = masks.segments(ids)
    materialize, classify, _ = _lowerings(m)
    vis = np.asarray(materialize(T, T))
    ref = (np.asarray(ids)[:, :, None] == np.asarray(ids)[:, None, :]) & (np.asarray(ids)[:, :, None] != 0)
    np.testing.assert_array_equal(vis[:, 0], ref)
    check_sound(classify(T, T, bq, bk), vis, bq, bk)
    check_predicate(m, T, T, np.random.default_rng(seed))
    # Sorted packed ids: the min/max rule is exact.
    check_exact(m, T, T, bq, bk)


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([1, 3]), data_sizes, data_sizes, data_blocks, data_blocks, st.integers(0, 1000))
def test_key_padding_and_dense_exact(B, T, S, bq, bk, seed):
    rng = np.random.default_rng(seed)
    lengths = jnp.asarray(rng.integers(0, S + 1, size=B), jnp.int32)
    kp = masks.key_padding(lengths)
    vis = np.asarray(_lowerings(kp)[0](T, S))
    np.testing.assert_array_equal(vis[:, 0], np.broadcast_to(
        np.arange(S)[None, None, :] < np.asarray(lengths)[:, None, None], (B, T, S)))
    check_exact(kp, T, S, bq, bk)
    d = masks.dense(jnp.asarray(rng.random((B, 2, T, S)) < 0.3))
    check_exact(d, T, S, bq, bk)
    check_predicate(d, T, S, rng)
    check_predicate(kp, T, S, rng)


def test_dense_broadcast_rank3_and_numeric_masks():
    """[B, H, T, 1], [B, H, 1, S], rank-3 and float/int masks mean what NumPy broadcasting says."""
    rng = np.random.default_rng(0)
    B, H, T, S = 2, 3, 7, 16
    rows = rng.random((B, H, T, 1)) < 0.6
    cols = rng.random((B, 1, 1, S)) < 0.6
    rank3 = rng.random((H, T, S)) < 0.5
    cases = [(rows, rows), (cols, cols), (rank3, rank3[None]),
             ((rng.random((1, H, T, S)) < 0.5).astype(np.float32) * 2.5, None),
             (rng.integers(-1, 2, size=(B, 1, T, S)).astype(np.int32), None)]
    for arr, want in cases:
        m = masks.dense(arr)
        m.check(B, H, T, S)
        want = np.asarray(arr != 0) if want is None else want
        vis = np.asarray(_lowerings(m)[0](T, S))
        np.testing.assert_array_equal(vis, np.broadcast_to(want, vis.shape))
        assert vis.shape[2:] == (T, S)
        check_exact(m, T, S, 3, 8)
        check_predicate(m, T, S, rng)


def test_per_row_offset_causal():
    offs = jnp.array([0, 3, 5], jnp.int32)
    m = masks.causal(offset=offs)
    assert not m.is_static
    vis = np.asarray(m.materialize(4, 9))
    for b, o in enumerate([0, 3, 5]):
        np.testing.assert_array_equal(vis[b, 0], numpy_visible("causal", 4, 9, offset=o))
    check_exact(m, 4, 9, 2, 3)


# ----------------------------------------------------------------------------- regressions


def test_window_is_inclusive_at_borders():
    vis = np.asarray(masks.sliding_window(2).materialize(6, 6))[0, 0]
    # query 0 sees only key 0; query 5 sees keys 3, 4, 5 (left=2 inclusive + itself).
    np.testing.assert_array_equal(vis[0], [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(vis[5], [0, 0, 0, 1, 1, 1])
    assert vis.sum(axis=1).tolist() == [1, 2, 3, 3, 3, 3]
    vis2 = np.asarray(masks.sliding_window(1, 1).materialize(4, 4))[0, 0]
    np.testing.assert_array_equal(vis2[0], [1, 1, 0, 0])
    np.testing.assert_array_equal(vis2[3], [0, 0, 1, 1])


def test_causal_bottom_right_alignment():
    # T=1, S=4 (decode): the single query is the newest token and sees every key.
    assert np.asarray(masks.causal().materialize(1, 4))[0, 0].tolist() == [[True] * 4]
    # T=3, S=5: query i sees keys 0..i+2.
    vis = np.asarray(masks.causal().materialize(3, 5))[0, 0]
    assert vis.sum(axis=1).tolist() == [3, 4, 5]
    # T > S: the first T-S queries see nothing (fully masked rows).
    vis = np.asarray(masks.causal().materialize(5, 3))[0, 0]
    assert vis.sum(axis=1).tolist() == [0, 0, 1, 2, 3]
    # Explicit offset 0 gives top-left alignment.
    assert np.asarray(masks.causal(offset=0).materialize(1, 4))[0, 0].tolist() == [[True, False, False, False]]


def test_window_alignment_with_t_ne_s():
    vis = np.asarray(masks.sliding_window(1).materialize(2, 5))[0, 0]
    np.testing.assert_array_equal(vis, [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])


def test_static_classification_is_numpy_and_causal_halves_tiles():
    cls = masks.causal().classify(64, 64, 16, 16)
    assert isinstance(cls, np.ndarray) and cls.shape == (1, 1, 4, 4)
    assert (cls == EMPTY).sum() == 6 and (cls == FULL).sum() == 6 and (cls == PARTIAL).sum() == 4
    w = masks.causal() & masks.sliding_window(15)
    cls = w.classify(1024, 1024, 16, 16)
    assert (cls != EMPTY).sum() <= 2 * 64  # O(T * w) tiles


def test_mask_errors_name_the_argument():
    with pytest.raises(ValueError, match="left"):
        masks.sliding_window(-1)
    with pytest.raises(ValueError, match="right"):
        masks.sliding_window(3, -2)
    with pytest.raises(TypeError, match="q_segment_ids"):
        masks.segments(jnp.zeros((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="q_segment_ids"):
        masks.segments(jnp.zeros((4,), jnp.int32))
    with pytest.raises(TypeError, match="mask: expected a boolean, integer or float"):
        masks.dense(jnp.zeros((1, 1, 4, 4), jnp.complex64))
    with pytest.raises(ValueError, match=r"mask: expected rank 4 .* or rank 3"):
        masks.dense(jnp.zeros((4, 4), bool))
    with pytest.raises(ValueError, match=r"mask: expected an array broadcastable as \[B\|1, H\|1, T\|1, S\|1\]"):
        masks.dense(jnp.zeros((1, 1, 3, 4), bool)).check(1, 1, 4, 4)
    with pytest.raises(ValueError, match="size"):
        masks.chunked(0)
    with pytest.raises(ValueError, match="bq"):
        masks.causal().classify(8, 8, 0, 4)
    with pytest.raises(TypeError, match="mask"):
        masks.as_mask("causal")


def test_mask_works_under_jit_with_traced_data():
    @jax.jit
    def f(ids, lengths):
        m = masks.segments(ids) & masks.key_padding(lengths) & masks.causal()
        return m.materialize(6, 6), m.classify(6, 6, 2, 2)

    ids = jnp.array([[1, 1, 1, 2, 2, 0]], jnp.int32)
    vis, cls = f(ids, jnp.array([5], jnp.int32))
    check_sound(cls, np.asarray(vis), 2, 2)
    assert np.asarray(vis)[0, 0, 5].sum() == 0
