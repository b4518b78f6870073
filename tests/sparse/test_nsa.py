"""NSA: the compressed branch against a NumPy loop, the selection's rules, and the fast path against dense branches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.core import testing as tk
from attn_jax.sparse import nsa, nsa_compressed, nsa_reference, nsa_select

KW = dict(compress_block=8, compress_stride=4, select_block=8, n_selected=3, window=10, n_local=1)


def test_compressed_branch_matches_numpy():
    """Mean-pooled blocks of l keys every d tokens, visible once complete; rows with none give 0."""
    q, k, v = tk.random_qkv_compiled(jax.random.key(0), B=1, T=20, H=2, K=1, Dk=4)
    o, p = tk.compiled(lambda q, k, v: nsa_compressed(q, k, v, compress_block=8, compress_stride=4), q, k, v)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    for h in range(2):
        for t in range(20):
            blocks = [i for i in range((20 - 8) // 4 + 1) if i * 4 + 7 <= t]
            if not blocks:
                np.testing.assert_allclose(np.asarray(o)[0, t, h], 0.0)
                continue
            kc = np.stack([kn[0, i * 4:i * 4 + 8, 0].mean(0) for i in blocks])
            vc = np.stack([vn[0, i * 4:i * 4 + 8, 0].mean(0) for i in blocks])
            s = kc @ qn[0, t, h] / 2.0
            w = np.exp(s - s.max())
            w /= w.sum()
            np.testing.assert_allclose(np.asarray(o)[0, t, h], w @ vc, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(p)[0, h, t, :len(blocks)], w, rtol=1e-5, atol=1e-6)


def test_selection_rules():
    """First and local blocks always, never a future block, n_selected blocks where that many exist,
    the same selection for the query heads of a group; the rest are the top scores."""
    T = 40
    p_cmp = jax.nn.softmax(jax.random.normal(jax.random.key(1), (1, 4, T, 9)), axis=-1)
    sel = np.asarray(tk.compiled(lambda p: nsa_select(p, T=T, S=T, K=2, compress_block=8, compress_stride=4,
                                                      select_block=8, n_selected=3, n_local=2), p_cmp))  # [1, 2, T, 5]
    own = np.arange(T) // 8
    blk = np.arange(5)
    assert sel[..., 0].all()
    assert sel[..., np.arange(T), own].all() and sel[..., np.arange(T)[8:], own[8:] - 1].all()
    assert not (sel & (blk[None, :] > own[:, None])).any()
    np.testing.assert_array_equal(sel.sum(-1), np.broadcast_to(np.minimum(3, own + 1), sel.shape[:3]))


def test_fast_path_matches_reference():
    """Values and the VJPs of q, k, v and the gates (GQA, ragged lengths)."""
    q, k, v = tk.random_qkv_compiled(jax.random.key(2), B=2, T=45, H=4, K=2, Dk=16, Dv=8)
    g = jax.nn.sigmoid(jax.random.normal(jax.random.key(3), (2, 45, 4, 3)))
    tk.check_vjp_parity(lambda q, k, v, g: nsa(q, k, v, g, block_q=4, **KW),
                        lambda q, k, v, g: nsa_reference(q, k, v, g, **KW), (q, k, v, g), ("q", "k", "v", "gates"))


def test_causality():
    q, k, v = tk.random_qkv_compiled(jax.random.key(4), B=1, T=32, H=2, Dk=8)
    g = jnp.ones((1, 32, 2, 3)) / 3
    fn = jax.jit(lambda q, k, v: nsa(q, k, v, g, block_q=8, **KW), compiler_options=tk.FAST_COMPILE)
    tk.check_causality_by_perturbation(fn, q, k, v)


def test_bad_inputs():
    x = jnp.zeros((1, 16, 2, 4))
    g = jnp.zeros((1, 16, 2, 3))
    with pytest.raises(ValueError, match="gates"):
        nsa(x, x, x, g[..., :2], **KW)
    with pytest.raises(ValueError, match="multiples"):
        nsa(x, x, x, g, **{**KW, "compress_block": 6})
    with pytest.raises(ValueError, match="window"):
        nsa(x, x, x, g, **{**KW, "window": 0})
    with pytest.raises(ValueError, match="impl"):
        nsa(x, x, x, g, impl="pallas", **KW)
