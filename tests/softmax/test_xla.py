"""impl="xla" (tiled online-softmax attention) against the reference: values, LSE and VJPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import testing as tk
from attn_jax.positional.alibi import alibi
from attn_jax.positional.t5 import T5RelativeBias
from attn_jax.softmax import xla

BQ, BK = 16, 32  # small blocks: many tiles, ragged edges


def _fns(mask=None, block_q=BQ, block_k=BK, **kw):
    """(xla, reference) callables of (q, k, v, bias, sinks) -> (o, lse)."""

    def fx(q, k, v, bias, sinks):
        return xla.attention_blockwise(q, k, v, mask=mask, bias=bias, sinks=sinks, return_lse=True,
                                       block_q=block_q, block_k=block_k, **kw)

    def fr(q, k, v, bias, sinks):
        return aj.attention(q, k, v, mask=mask, bias=bias, sinks=sinks, return_lse=True, impl="reference", **kw)

    return fx, fr


# XLA:CPU compile time dominates these tests; the backend optimisation level does not change results.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit_vjp(fns, primals, key):
    """``[vjp_with_random_cotangent(fn, primals, key) for fn in fns]`` as one compiled program."""
    g = jax.jit(lambda *p: [tk.vjp_with_random_cotangent(fn, p, key) for fn in fns])
    # The fast options approximate float64 transcendental functions; keep float64 exact.
    opts = {} if primals[0].dtype == jnp.float64 else _FAST_COMPILE
    return g.lower(*primals).compile(opts)(*primals)


def check_parity(q, k, v, *, bias=None, sinks=None, mask=None, dtype=None, block_q=BQ, block_k=BK, **kw):
    fx, fr = _fns(mask, block_q, block_k, **kw)
    primals = (q, k, v, bias, sinks)
    key = jax.random.key(123)
    (out_x, g_x), (out_r, g_r) = _jit_vjp((fx, fr), primals, key)
    dtype = q.dtype if dtype is None else dtype
    tk.assert_close(out_x[0], out_r[0], dtype=dtype, name="o")
    tk.assert_close(out_x[1], out_r[1], dtype="float32" if dtype != jnp.float64 else dtype, name="lse")
    names = ["dq", "dk", "dv", "dbias", "dsinks"]
    for name, gx, gr in zip(names, g_x, g_r):
        if gr is None:
            assert gx is None, name
            continue
        for lx, lr in zip(jax.tree.leaves(gx), jax.tree.leaves(gr)):
            tk.assert_close(lx, lr, dtype=dtype, grad=True, name=name)
    return out_x, g_x


def qkv(B=2, T=40, S=None, H=4, K=None, Dk=32, Dv=None, dtype=jnp.float32, seed=0):
    return tk.random_qkv_compiled(jax.random.key(seed), B=B, T=T, S=S, H=H, K=K, Dk=Dk, Dv=Dv, dtype=dtype)


#: Random inputs as one fast-compiled program per shape (eager jax.random compiles with the defaults).
_normal = tk.fast_jit(lambda key, shape: jax.random.normal(key, shape), static_argnums=1)


# ----------------------------------------------------------------------------- masks

MASKS = {
    "none": lambda T, S: None,
    "causal": lambda T, S: masks.causal(),
    "causal_offset": lambda T, S: masks.causal(offset=3),
    "window_left": lambda T, S: masks.sliding_window(7),
    "window_left_right": lambda T, S: masks.sliding_window(5, 9),
    "chunked": lambda T, S: masks.chunked(12),
    "chunked_causal": lambda T, S: masks.chunked(12) & masks.causal(),
    "prefix_lm": lambda T, S: masks.prefix_lm(10),
    "causal_and_window": lambda T, S: masks.causal() & masks.sliding_window(20),
    "causal_or_window": lambda T, S: masks.causal() | masks.sliding_window(0, 4),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_static_masks(name):
    q, k, v = qkv(T=45, S=70, K=2)
    check_parity(q, k, v, mask=MASKS[name](45, 70))


@pytest.mark.parametrize("T,S", [(70, 45), (1, 70)])
def test_causal_t_vs_s(T, S):
    q, k, v = qkv(T=T, S=S)
    check_parity(q, k, v, mask=masks.causal() if T > 1 else masks.sliding_window(9, 2))


def test_segments_packed_with_padding():
    q, k, v = qkv(B=3, T=64)
    ids = tk.random_segment_ids(jax.random.key(5), 3, 64, max_segments=4, pad_fraction=0.3)
    check_parity(q, k, v, mask=masks.segments(ids))
    check_parity(q, k, v, mask=masks.segments(ids) & masks.causal())


def test_segments_cross_attention_t_ne_s():
    q, k, v = qkv(B=2, T=24, S=50)
    qi = tk.random_segment_ids(jax.random.key(1), 2, 24, max_segments=2)
    ki = tk.random_segment_ids(jax.random.key(2), 2, 50, max_segments=2)
    check_parity(q, k, v, mask=masks.segments(qi, ki))


def test_key_padding_with_empty_row():
    q, k, v = qkv(B=3, T=33, S=70)
    mask = masks.key_padding(jnp.array([70, 0, 17]))
    (o, lse), (dq, dk, dv, _, _) = check_parity(q, k, v, mask=mask)
    assert np.all(np.asarray(o[1]) == 0)
    assert np.all(np.isneginf(np.asarray(lse[1])))
    for g in (dq[1], dk[1], dv[1]):
        assert np.all(np.asarray(g) == 0)
    check_parity(q, k, v, mask=mask & masks.causal())  # per-row dynamic + static


def test_dense_mask_with_fully_masked_rows():
    q, k, v = qkv(B=2, T=40, S=50)
    m = tk.compiled(lambda: jax.random.bernoulli(jax.random.key(3), 0.3, (2, 1, 40, 50))
                    .at[:, :, 5].set(False).at[1, :, 20:36].set(False))
    (o, lse), (dq, _, _, _, _) = check_parity(q, k, v, mask=m)
    assert np.all(np.asarray(o[:, 5]) == 0) and np.all(np.isneginf(np.asarray(lse[:, 5])))
    assert np.all(np.asarray(dq[:, 5]) == 0)
    mh = tk.compiled(lambda: jax.random.bernoulli(jax.random.key(4), 0.5, (1, 4, 40, 50)))
    check_parity(q, k, v, mask=masks.dense(mh) & masks.causal())


def test_per_row_offsets():
    q, k, v = qkv(B=2, T=8, S=60)
    check_parity(q, k, v, mask=masks.causal(offset=jnp.array([10, 52])))


# ----------------------------------------------------------------------------- bias, softcap, sinks, dropout


@pytest.mark.parametrize("shape", [(1, 1, 45, 70), (2, 4, 45, 70)])
def test_dense_bias_broadcast(shape):
    q, k, v = qkv(T=45, S=70, K=2)
    bias = _normal(jax.random.key(9), shape)
    check_parity(q, k, v, bias=bias, mask=masks.causal())


def test_alibi_and_t5_structured_bias():
    q, k, v = qkv(T=45, S=70, H=4, K=1)
    check_parity(q, k, v, bias=alibi(4), mask=masks.causal())
    table = _normal(jax.random.key(2), (32, 4))
    check_parity(q, k, v, bias=T5RelativeBias(table, bidirectional=True, max_distance=20))


def test_softcap_sinks():
    q, k, v = qkv(T=45, S=70)
    q = q * 4  # large logits so the cap bites
    sinks = _normal(jax.random.key(8), (4,))
    check_parity(q, k, v, softcap=5.0, mask=masks.causal())
    check_parity(q, k, v, sinks=sinks, softcap=3.0, bias=alibi(4), mask=masks.sliding_window(6), scale=0.3)


def test_sinks_with_fully_masked_rows():
    q, k, v = qkv(B=2, T=20, S=30)
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
    (o, lse), _ = check_parity(q, k, v, sinks=sinks, mask=masks.key_padding(jnp.array([0, 13])))
    assert np.all(np.asarray(o[0]) == 0) and np.all(np.isfinite(np.asarray(lse)))


def test_dropout_matches_reference_bitwise_decisions():
    q, k, v = qkv(T=45, S=70, K=2)
    rng = jax.random.key(42)
    check_parity(q, k, v, mask=masks.causal(), dropout_rate=0.3, dropout_rng=rng)
    a, b = tk.compiled(lambda q, k, v: (
        xla.attention_blockwise(q, k, v, dropout_rate=0.3, dropout_rng=rng, block_q=BQ, block_k=BK),
        xla.attention_blockwise(q, k, v, dropout_rate=0.3, dropout_rng=jax.random.key(43), block_q=BQ,
                                block_k=BK)), q, k, v)
    assert not np.allclose(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("H,K", [(4, 2), (4, 1)])
def test_gqa(H, K):
    q, k, v = qkv(T=33, S=40, H=H, K=K)
    check_parity(q, k, v, mask=masks.causal())


def test_odd_sizes_dk_ne_dv():
    q, k, v = qkv(B=1, T=63, S=75, H=2, Dk=48, Dv=40)
    check_parity(q, k, v, mask=masks.causal(), block_q=64, block_k=16)


def test_single_query():
    q, k, v = qkv(T=1, S=75)
    check_parity(q, k, v, mask=masks.causal())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
    q, k, v = qkv(T=45, S=70, K=2, dtype=dtype)
    (o, lse), _ = check_parity(q, k, v, mask=masks.causal(), sinks=jnp.zeros((4,), dtype))
    assert o.dtype == dtype and lse.dtype == jnp.float32


def test_float64_tight():
    with tk.float64():
        q, k, v = qkv(T=45, S=70, K=2, dtype=jnp.float64)
        check_parity(q, k, v, mask=masks.causal() & masks.sliding_window(30), softcap=4.0,
                     sinks=jnp.ones((4,), jnp.float64))


def test_through_public_api():
    q, k, v = qkv(T=45, S=70, K=2)
    for return_lse in (False, True):
        a, b = tk.compiled(lambda q, k, v: (
            aj.attention(q, k, v, mask=masks.causal(), impl="xla", return_lse=return_lse),
            aj.attention(q, k, v, mask=masks.causal(), impl="reference", return_lse=return_lse)), q, k, v)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            tk.assert_close(x, y)
    # auto on CPU: the dense block within its fixed budget (this small problem), else the tiled path.
    assert aj.explain(q, k, v, impl="auto", platform="cpu").chosen["cpu"] in ("dense", "xla")


# ----------------------------------------------------------------------------- safety


def test_nan_in_padded_keys_does_not_leak():
    q, k, v = qkv(B=2, T=30, S=70)
    lengths = jnp.array([41, 70])
    pad = jnp.arange(70)[None, :, None, None] >= lengths[:, None, None, None]
    k_nan = jnp.where(pad, jnp.nan, k)
    v_nan = jnp.where(pad, jnp.nan, v)
    (o, lse), grads = check_parity(q, k_nan, v_nan, mask=masks.key_padding(lengths))
    for x in (o, lse, *grads[:3]):
        assert not np.isnan(np.asarray(x)).any()


def test_nan_in_segment_padding_does_not_leak():
    q, k, v = qkv(B=2, T=64)
    ids = tk.random_segment_ids(jax.random.key(11), 2, 64, max_segments=3, pad_fraction=0.4)
    ids = ids.at[:, -5:].set(0)
    pad = (ids == 0)[:, :, None, None]
    q, k, v = (jnp.where(pad, jnp.nan, x) for x in (q, k, v))
    (o, lse), grads = check_parity(q, k, v, mask=masks.segments(ids) & masks.causal())
    for x in (o, *grads[:3]):
        assert not np.isnan(np.asarray(x)).any()


def test_deterministic_and_jit_matches_eager():
    q, k, v = qkv(T=45, S=70, K=2)
    ids = tk.random_segment_ids(jax.random.key(5), 2, 45)
    m = masks.segments(ids, jnp.pad(ids, ((0, 0), (25, 0)))) & masks.causal()

    def f(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: xla.attention_blockwise(q, k, v, mask=m, block_q=BQ, block_k=BK), q, k, v)
        return (o, *vjp(jnp.ones_like(o)))

    tk.check_deterministic(tk.fast_jit(f), q, k, v)
    fwd = lambda q, k, v: xla.attention_blockwise(q, k, v, mask=m, block_q=BQ, block_k=BK, return_lse=True)
    tk.check_jit_matches_eager(fwd, q, k, v)


# ----------------------------------------------------------------------------- memory and skipping


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_no_t_by_s_temporaries_forward_and_backward():
    def loss(q, k, v):
        return xla.attention_blockwise(q, k, v, mask=masks.causal(), block_q=128, block_k=128).sum()

    grad = jax.grad(loss, argnums=(0, 1, 2))
    temps = {}
    for T in (1024, 2048):
        args = [jax.ShapeDtypeStruct((1, T, 1, 32), jnp.float32)] * 3
        temps[T] = (_temp_bytes(loss, *args), _temp_bytes(grad, *args))
    T = 2048
    tss = T * T * 4
    assert temps[T][0] < tss / 8 and temps[T][1] < tss / 8, (temps, tss)
    # Linear, not quadratic, growth in T.
    assert temps[2048][1] < 2.6 * temps[1024][1], temps
    ref_grad = jax.grad(lambda q, k, v: aj.attention(q, k, v, mask=masks.causal(), impl="reference").sum(),
                        argnums=(0, 1, 2))
    args = [jax.ShapeDtypeStruct((1, T, 1, 32), jnp.float32)] * 3
    assert _temp_bytes(ref_grad, *args) >= tss  # the yardstick really is quadratic


def test_block_skipping_counts_tiles():
    q, k, v = qkv(B=1, T=256, H=2)
    # One fast-compiled program per mask (eager, the tiled forward ran op by op).
    tiles = tk.fast_jit(xla.forward_tile_count, static_argnames=("block_q", "block_k"))
    count = lambda mask, bq=32, bk=32: int(tiles(q, k, v, mask=mask, block_q=bq, block_k=bk))
    n = 256 // 32
    assert count(None) == n * n
    assert count(masks.causal()) == n * (n + 1) // 2
    assert count(masks.sliding_window(32)) == 2 * n - 1  # O(T w): diagonal + one block left
    assert count(masks.sliding_window(32) & masks.causal()) == 2 * n - 1
    # Data-dependent: 4 equal documents -> only the 4 diagonal 64x64 squares (2x2 tiles each).
    ids = jnp.repeat(jnp.arange(1, 5), 64)[None]
    assert count(masks.segments(ids)) == 4 * 4
    assert count(masks.segments(ids) & masks.causal()) == 4 * 3
    assert count(masks.key_padding(jnp.array([64]))) == n * 2
    # jit-compatible: dynamic skipping happens at run time.
    assert int(jax.jit(lambda ids: xla.forward_tile_count(q, k, v, mask=masks.segments(ids), block_q=32,
                                                          block_k=32))(ids)) == 16
