"""The block-sparse engine over traced block lists, against dense attention with the materialised block mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax.core import testing as tk
from attn_jax.sparse import (block_layout_from_indices, block_mask_from_indices, block_sparse_attention,
                             block_sparse_reference, block_sparse_tile_count, selected_block_count)


def _with_lse(fn, idx, **kw):
    """o and lse side by side in one array (the kit's parity compares one output)."""
    def f(q, k, v):
        o, lse = fn(q, k, v, idx, return_lse=True, **kw)
        return jnp.concatenate([o.astype(jnp.float32), lse[..., None]], axis=-1)
    return f


def _indices(seed, B, Hi, nq, nk, n_sel):
    """Random lists with padding (-1) and a repeated entry in every row."""
    idx = np.random.default_rng(seed).integers(-1, nk, size=(B, Hi, nq, n_sel)).astype(np.int32)
    idx[..., 0] = idx[..., -1]
    return jnp.asarray(idx)


CASES = {
    # name: T, S, H, K, Hi (list heads), block_size, block_q, causal, slot mask
    "gqa_shared_lists_causal": (37, 37, 4, 2, 2, 8, 8, True, False),
    "per_query_head_lists_T_ne_S": (20, 35, 4, 2, 4, 8, 8, False, False),
    "token_slot_mask_small_query_blocks": (33, 40, 2, 2, 2, 16, 4, True, True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_dense_reference(name):
    """Values, lse and the VJPs of q, k, v (random cotangents on o and lse)."""
    T, S, H, K, Hi, bs, bq, causal, with_slots = CASES[name]
    q, k, v = tk.random_qkv_compiled(jax.random.key(0), B=2, T=T, S=S, H=H, K=K, Dk=16, Dv=8)
    idx = _indices(1, 2, Hi, -(-T // bq), -(-S // bs), 3)
    kw = dict(block_size=bs, causal=causal, block_q=bq)
    if with_slots:
        kw["slot_mask"] = jnp.asarray(np.random.default_rng(2).random((2, Hi, T, 3)) < 0.6)
    tk.check_vjp_parity(_with_lse(block_sparse_attention, idx, **kw), _with_lse(block_sparse_reference, idx, **kw),
                        (q, k, v), ("q", "k", "v"))


def test_offsets_and_segments_with_gradients():
    """Per-row query offsets and packed segment ids inside the tiles, values and VJPs."""
    q, k, v = tk.random_qkv_compiled(jax.random.key(5), B=2, T=12, S=24, H=2, K=1, Dk=8)
    idx = _indices(6, 2, 1, 3, 6, 3)
    ids = np.random.default_rng(7).integers(0, 3, size=(2, 24)).astype(np.int32)
    kw = dict(block_size=4, causal=True, q_offset=jnp.asarray([3, 12], jnp.int32),
              segment_ids=(jnp.asarray(ids[:, 5:17]), jnp.asarray(ids)))
    tk.check_vjp_parity(lambda q, k, v: block_sparse_attention(q, k, v, idx, **kw),
                        lambda q, k, v: block_sparse_reference(q, k, v, idx, **kw), (q, k, v), ("q", "k", "v"))


def test_materialised_mask_and_reference_spec():
    """The materialised mask is the selected blocks (padding and repeats ignored) cut causally; the
    reference is aj.attention under it."""
    idx = jnp.asarray([[[[1, -1, 1], [0, 2, 5]]]], jnp.int32)           # B=1, Hi=1, nq=2, n_sel=3; 5 >= nk
    m = np.asarray(block_mask_from_indices(idx, 8, 12, 4, causal=True))
    want = np.zeros((8, 12), bool)
    want[0:4, 4:8] = True
    want[4:8, 0:4] = True
    want[4:8, 8:12] = True
    want &= np.arange(12)[None, :] <= np.arange(8)[:, None] + 4
    np.testing.assert_array_equal(m[0, 0], want)
    assert int(selected_block_count(idx, 3)) == 3


def test_empty_lists_and_nan_safety():
    """A query block with no valid entry gives zero output and zero, finite gradients; NaN in keys
    and values that no selected block uses does not leak."""
    T = S = 16
    q, k, v = tk.random_qkv_compiled(jax.random.key(2), B=1, T=T, S=S, H=2, K=1, Dk=8)
    k = k.at[:, 8:12].set(jnp.nan)
    v = v.at[:, 8:12].set(jnp.nan)
    idx = jnp.asarray([[[[-1, -1], [1, 0], [0, 2], [3, 3]]]], jnp.int32)   # block 2 (keys 8..11) only for q block 2
    idx = idx.at[0, 0, 2].set(jnp.asarray([0, -1]))

    def loss(q, k, v):
        return (block_sparse_attention(q, k, v, idx, block_size=4, causal=True) ** 2).sum()

    o, (dq, dk, dv) = tk.compiled(lambda *a: (block_sparse_attention(*a, idx, block_size=4, causal=True),
                                              jax.grad(loss, argnums=(0, 1, 2))(*a)), q, k, v)
    for name, x in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert np.isfinite(np.asarray(x)).all(), name
    np.testing.assert_array_equal(np.asarray(o[:, :4]), 0.0)
    np.testing.assert_array_equal(np.asarray(dq[:, :4]), 0.0)


def test_work_proportional_to_selected_blocks():
    """The forward visits, per query block, as many key blocks as the longest deduplicated list of
    that block (over batch rows and heads) -- not nk: more keys with the same lists cost nothing more."""
    T, bs = 64, 8
    q, _, _ = tk.random_qkv_compiled(jax.random.key(3), B=2, T=T, H=2, K=2, Dk=8)
    count = jax.jit(lambda q, k, idx: block_sparse_tile_count(q, k, k, idx, block_size=bs, causal=True),
                    compiler_options=tk.FAST_COMPILE)
    for S in (64, 256):
        k = jnp.zeros((2, S, 2, 8))
        for n_sel in (2, 4):
            idx = _indices(n_sel, 2, 2, T // bs, 8, n_sel)                   # blocks < 8 so the lists stay the same
            lens = np.asarray(block_layout_from_indices(idx, S // bs)).sum(-1)   # [B, Hi, nq]
            assert int(count(q, k, idx)) == int(lens.max(axis=(0, 1)).sum()), (S, n_sel)
    full = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (2, 2, T // bs, 4))
    assert int(count(q, jnp.zeros((2, 256, 2, 8)), full)) == 4 * (T // bs)


def test_bad_inputs():
    q = jnp.zeros((1, 8, 2, 4))
    good = jnp.zeros((1, 2, 2, 1), jnp.int32)
    with pytest.raises(ValueError, match="block_idx"):
        block_sparse_attention(q, q, q, jnp.zeros((1, 2, 3, 1), jnp.int32), block_size=4)
    with pytest.raises(TypeError, match="block_idx"):
        block_sparse_attention(q, q, q, good.astype(jnp.float32), block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, q, q, good, block_size=0)
    with pytest.raises(ValueError, match="impl"):
        block_sparse_attention(q, q, q, good, block_size=4, impl="pallas")
    assert "xla" in str(aj.explain(block_sparse_attention, q, q, q, good, block_size=4))
