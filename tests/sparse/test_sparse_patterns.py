"""Static sparse patterns: block lists <-> materialised mask, and the tile engine against the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import testing as tk
from attn_jax.core.masks import EMPTY, FULL, PARTIAL
from attn_jax.softmax.xla import attention_blockwise, forward_tile_count
from attn_jax.sparse import patterns as P


def block_truth(vis, bq, bk):
    """Exact EMPTY / PARTIAL / FULL of every (bq, bk) tile of a [..., T, S] boolean array (NumPy)."""
    T, S = vis.shape[-2:]
    nq, nk = -(-T // bq), -(-S // bk)
    pad = np.zeros(vis.shape[:-2] + (nq * bq, nk * bk), np.int64)
    real = np.zeros_like(pad)
    pad[..., :T, :S] = vis
    real[..., :T, :S] = 1
    shape = vis.shape[:-2] + (nq, bq, nk, bk)
    n_vis = pad.reshape(shape).sum(axis=(-1, -3))
    n_real = real.reshape(shape).sum(axis=(-1, -3))
    return np.where(n_vis == 0, EMPTY, np.where(n_vis == n_real, FULL, PARTIAL))


def expand_layout(layout, bq, bk, T, S):
    """The token-level mask of a block layout [H, nq, nk], by repetition (independent of predicate)."""
    return np.repeat(np.repeat(layout, bq, axis=1), bk, axis=2)[:, :T, :S]


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_block_mask_lowerings_agree(data):
    """classify is exact at any tile size and predicate / materialize equal the repeated layout."""
    H = data.draw(st.integers(1, 2))
    bq, bk = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    nq, nk = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    T = data.draw(st.integers((nq - 1) * bq + 1, nq * bq))
    S = data.draw(st.integers((nk - 1) * bk + 1, nk * bk))
    layout = np.array(data.draw(st.lists(st.booleans(), min_size=H * nq * nk, max_size=H * nq * nk))).reshape(H, nq, nk)
    m = P.block_mask(layout, bq, bk)
    vis = expand_layout(layout, bq, bk, T, S)
    np.testing.assert_array_equal(np.asarray(m.materialize(T, S))[0], vis)
    tq, tk_ = data.draw(st.integers(1, T)), data.draw(st.integers(1, S))
    np.testing.assert_array_equal(m.classify(T, S, tq, tk_)[0], block_truth(vis, tq, tk_))
    # the layout reads back from classify at its own block sizes
    np.testing.assert_array_equal(P.layout_of(m, T, S, bq, bk), layout)


PRIMITIVES = {
    "strided_distance": (P.StridedDistance(3), lambda p, j: (p >= j) & ((p - j) % 3 == 0)),
    "strided_distance_1": (P.StridedDistance(1), lambda p, j: p >= j),
    "summary_columns": (P.SummaryColumns(5, 2), lambda p, j: np.broadcast_to(j % 5 >= 3, np.broadcast(p, j).shape)),
    "global_tokens": (P.GlobalTokens(4), lambda p, j: (j < 4) | (p < 4)),
}


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_primitives_exact(name):
    """The token-level primitives classify exactly (rectangles of pairs), T != S included."""
    m, truth = PRIMITIVES[name]
    for T, S in ((23, 23), (13, 29)):
        p = np.arange(T)[:, None] + (S - T)
        vis = truth(p, np.arange(S)[None, :])
        np.testing.assert_array_equal(np.asarray(m.materialize(T, S))[0, 0], vis)
        for bq, bk in ((1, 1), (4, 4), (3, 7), (8, 5)):
            np.testing.assert_array_equal(m.classify(T, S, bq, bk)[0, 0], block_truth(vis, bq, bk), err_msg=f"{bq},{bk}")


def _numpy_patterns(T):
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    return {
        "strided": (P.strided(4), (j <= i) & ((i - j <= 4) | ((i - j) % 4 == 0))),
        "fixed": (P.fixed(6, 2), (j <= i) & ((j // 6 == i // 6) | (j % 6 >= 4))),
        "longformer": (P.longformer(3, 2), (np.abs(i - j) <= 3) | (j < 2) | (i < 2)),
        "longformer_causal": (P.longformer(3, 2, causal=True), (j <= i) & ((i - j <= 3) | (j < 2) | (i < 2))),
    }


@pytest.mark.parametrize("name", ["strided", "fixed", "longformer", "longformer_causal"])
def test_pattern_definitions_and_soundness(name):
    """Each pattern equals its NumPy definition; classification is sound at several tile sizes."""
    T = 37
    m, vis = _numpy_patterns(T)[name]
    np.testing.assert_array_equal(np.asarray(m.materialize(T, T))[0, 0], vis)
    for bq, bk in ((4, 4), (8, 8), (5, 3)):
        cls, truth = np.asarray(m.classify(T, T, bq, bk))[0, 0], block_truth(vis, bq, bk)
        assert not ((cls == EMPTY) & (truth != EMPTY)).any() and not ((cls == FULL) & (truth != FULL)).any()
        # ...and skips every block that is truly empty (these compositions stay exact on EMPTY)
        np.testing.assert_array_equal(cls == EMPTY, truth == EMPTY)


def test_bigbird_and_power_layouts():
    """BigBird: window, global rows/columns and exactly r random blocks per row, fixed by the seed;
    PowerAttention: block distances 0, powers of two and the sink."""
    m = P.bigbird(64, 8, num_global_blocks=1, window_blocks=1, num_random_blocks=2, seed=3)
    lay = P.layout_of(m, 64, 64, 8)[0]
    a, b = np.arange(8)[:, None], np.arange(8)[None, :]
    base = (np.abs(a - b) <= 1) | (a < 1) | (b < 1)
    assert (lay >= base).all()
    extra = (lay & ~base).sum(axis=1)
    np.testing.assert_array_equal(extra[1:], np.minimum(2, (~base).sum(axis=1)[1:]))
    np.testing.assert_array_equal(P.layout_of(P.bigbird(64, 8, seed=3), 64, 64, 8), P.layout_of(m, 64, 64, 8))
    assert not np.array_equal(P.layout_of(P.bigbird(64, 8, seed=4), 64, 64, 8), P.layout_of(m, 64, 64, 8))
    mc = P.bigbird(64, 8, seed=0, causal=True)
    vis = np.asarray(mc.materialize(64, 64))[0, 0]
    assert not np.triu(vis, 1).any()

    pw = P.layout_of(P.power_attention(80, 4, window_blocks=1, sink_blocks=1), 80, 80, 4)[0]
    d = np.arange(20)[:, None] - np.arange(20)[None, :]
    want = (d >= 0) & ((d == 0) | np.isin(d, [1, 2, 4, 8, 16]) | (np.arange(20)[None, :] < 1))
    np.testing.assert_array_equal(pw, want)


def _dense_ref(mask, T, S):
    def ref(q, k, v):
        return aj.attention(q, k, v, mask=masks.dense(mask.materialize(T, S)), impl="reference")
    return ref


CASES = {
    # name: (mask builder(T, S, H), T, S, H, K, block)
    "bigbird_causal_gqa": (lambda T, S, H: P.bigbird(T, 8, num_random_blocks=1, seed=1, causal=True), 40, 40, 4, 2, 8),
    "per_head_strided_fixed": (lambda T, S, H: P.per_head(P.strided(5), P.fixed(8, 2)), 37, 37, 2, 1, 8),
    "block_layout_per_head_TneS": (
        lambda T, S, H: P.block_mask(np.random.default_rng(0).random((H, 3, 6)) < 0.4, 16, 8), 45, 43, 2, 2, 8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tile_engine_matches_dense_reference(name):
    """The tiled XLA path with a sparse pattern equals dense attention with the materialised mask,
    values and every VJP; it visits exactly the tiles the union-over-heads layout keeps."""
    build, T, S, H, K, blk = CASES[name]
    mask = build(T, S, H)
    q, k, v = tk.random_qkv_compiled(jax.random.key(0), B=2, T=T, S=S, H=H, K=K, Dk=16)
    fast = lambda q, k, v: attention_blockwise(q, k, v, mask=mask, block_q=blk, block_k=blk)  # noqa: E731
    tk.check_vjp_parity(fast, _dense_ref(mask, T, S), (q, k, v), ("q", "k", "v"))
    n = int(tk.compiled(lambda q, k, v: forward_tile_count(q, k, v, mask=mask, block_q=blk, block_k=blk), q, k, v))
    vis = np.asarray(mask.materialize(T, S)).any(axis=(0, 1))
    assert n == int((block_truth(vis, blk, blk) != EMPTY).sum())


def test_causality():
    """A causal pattern never lets a query see the future (perturbing later tokens leaves earlier outputs)."""
    mask = P.power_attention(32, 4) & masks.causal()
    q, k, v = tk.random_qkv_compiled(jax.random.key(1), B=1, T=32, H=2, Dk=8)
    fn = jax.jit(lambda q, k, v: attention_blockwise(q, k, v, mask=mask, block_q=4, block_k=4),
                 compiler_options=tk.FAST_COMPILE)
    tk.check_causality_by_perturbation(fn, q, k, v)


def test_bad_inputs():
    with pytest.raises(ValueError, match="layout"):
        P.block_mask(np.ones((2, 3, 4, 5), bool), 4)
    with pytest.raises(TypeError, match="block_q"):
        P.block_mask(np.ones((2, 2), bool), 4.0)
    with pytest.raises(ValueError, match="block mask"):
        P.block_mask(np.ones((2, 2), bool), 4).classify(9, 8, 4, 4)
    with pytest.raises(ValueError, match="layout"):
        aj.attention(jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 8, 2, 4)),
                     mask=P.block_mask(np.ones((3, 2, 2), bool), 4))
    with pytest.raises(ValueError, match="c must be"):
        P.fixed(4, 5)
    with pytest.raises(TypeError, match="masks\\[1\\]"):
        P.per_head(P.strided(2), masks.segments(jnp.ones((1, 4), jnp.int32)))
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda lay: P.block_mask(lay, 2))(jnp.ones((2, 2), bool))
