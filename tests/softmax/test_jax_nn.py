"""aj.dot_product_attention is jax.nn.dot_product_attention: jax.nn's documented behaviours, run
through both, on values and gradients (one compiled program per case)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax.core import testing as tk

KEY = jax.random.key(0)


def _inputs(rank=4, B=2, T=5, S=7, N=4, K=4, H=8, seed=0):
    q, k, v = tk.random_qkv_compiled(jax.random.key(seed), B=B, T=T, S=S, H=N, K=K, Dk=H)
    if rank == 3:
        q, k, v = q[0], k[0], v[0]
    return q, k, v


def _compare(q, k, v, bias=None, **kw):
    """Values and VJPs (random cotangents) of ours and jax.nn's, in one program; grads w.r.t. q, k, v, bias."""
    def vjp(f):
        def fn(q, k, v, *b):
            return f(q, k, v, b[0] if b else None, **kw)
        primals = (q, k, v) + (() if bias is None else (bias,))
        return tk.vjp_with_random_cotangent(fn, primals, KEY)

    (ours, g_ours), (ref, g_ref) = tk.compiled(lambda: (vjp(aj.dot_product_attention), vjp(jax.nn.dot_product_attention)))
    for name, a, b in zip(("out", "residual"), jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        tk.assert_close(a, b, name=name)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), g_ours, g_ref):
        tk.assert_close(a, b, grad=True, name=name)
    return ours


def test_rank4_bias_scale_and_residual():
    q, k, v = _inputs()
    bias = jax.random.normal(jax.random.key(1), (1, 4, 5, 7))
    _compare(q, k, v, bias, scale=0.3, return_residual=True)


def test_rank3_with_rank3_mask_and_rank3_bias():
    q, k, v = _inputs(rank=3)
    mask = np.random.default_rng(0).random((4, 5, 7)) < 0.5
    mask[..., 0] = True  # no fully masked row: jax.nn's XLA path gives mean(V) there, we give 0
    bias = jax.random.normal(jax.random.key(2), (4, 5, 7))
    out = _compare(q, k, v, bias, mask=jnp.asarray(mask))
    assert out.shape == (5, 4, 8)


def test_gqa_is_causal_top_left_when_T_differs_from_S():
    q, k, v = _inputs(N=4, K=2, T=5, S=7)
    _compare(q, k, v, is_causal=True)
    # T > S: top-left alignment hides nothing from the first queries either (row i sees keys <= i).
    q, k, v = _inputs(N=4, K=1, T=7, S=5, seed=3)
    _compare(q, k, v, is_causal=True, implementation="xla")


def test_sequence_lengths():
    q, k, v = _inputs(T=6, S=6)
    out = _compare(q, k, v, query_seq_lengths=jnp.array([6, 3], jnp.int32),
                   key_value_seq_lengths=jnp.array([4, 6], jnp.int32), is_causal=True)
    np.testing.assert_array_equal(np.asarray(out)[1, 3:], 0.0)


@pytest.mark.parametrize("window", [2, (1, 3)])
def test_local_window(window):
    q, k, v = _inputs(T=7, S=9)
    _compare(q, k, v, local_window_size=window, is_causal=window == 2,
             key_value_seq_lengths=None if window == 2 else jnp.array([6, 9], jnp.int32))  # no row fully hidden


def test_implementation_names():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"implementation: expected one of \[None, 'xla', 'cudnn'\].*'flash'"):
        aj.dot_product_attention(q, k, v, implementation="flash")
    # cuDNN cannot serve on CPU: the registry says why instead of falling back silently.
    with pytest.raises(ValueError, match="cudnn"):
        aj.dot_product_attention(q, k, v, implementation="cudnn")
    with pytest.raises(TypeError, match="query_seq_lengths: expected an integer array"):
        aj.dot_product_attention(q, k, v, query_seq_lengths=jnp.ones((2,)))


def test_attention_accepts_the_shapes_jax_nn_and_flax_accept():
    """aj.attention itself: rank-3 inputs, extra batch axes, rank-3 bias, [B, H, T, 1] / [B, 1, 1, S]
    and float masks, against jax.nn (values; rows hidden whole are compared as zeros)."""
    q, k, v = _inputs(T=5, S=7)                                            # [2, 5|7, 4, 8]
    rng = np.random.default_rng(1)
    cols = rng.random((2, 1, 1, 7)) < 0.6
    cols[..., 0] = True
    rows = np.ones((2, 4, 5, 1), bool)
    rows[1, 2, 3] = False                                                  # one query row hidden whole
    bias3 = jax.random.normal(jax.random.key(9), (4, 5, 7))
    ext = lambda x: x.reshape((1, 2) + x.shape[1:])                         # [1, 2, T, H, D]

    def both():
        return (
            (aj.attention(q, k, v, bias3, cols), jax.nn.dot_product_attention(q, k, v, bias3[None], cols)),
            (aj.attention(ext(q), ext(k), ext(v), mask=cols[None].astype(np.float32)),
             jax.nn.dot_product_attention(q, k, v, mask=cols)),
            (aj.attention(q[0], k[0], v[0], bias3, cols[0].astype(np.int32)),
             jax.nn.dot_product_attention(q[0], k[0], v[0], bias3, cols[0])),
            (aj.attention(q, k, v, mask=rows), jax.nn.dot_product_attention(q, k, v, mask=rows)),
        )

    (a, a_ref), (b, b_ref), (c, c_ref), (d, d_ref) = tk.compiled(both)
    tk.assert_close(a, a_ref, name="rank-3 bias, [B, 1, 1, S] mask")
    assert b.shape == (1, 2, 5, 4, 8)
    tk.assert_close(b.reshape(a.shape), b_ref, name="extra batch axes, float mask")
    assert c.shape == (5, 4, 8)
    tk.assert_close(c, c_ref, name="rank-3 q/k/v, int mask")
    d_ref = np.asarray(d_ref).copy()
    d_ref[1, 3, 2] = 0.0                                                   # jax.nn: mean(V); attn_jax: zeros
    tk.assert_close(d, d_ref, name="[B, H, T, 1] mask")
