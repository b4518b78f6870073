"""impl="dense" (one fused block, CPU) against the reference: values, LSE and all VJPs; dispatch."""

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
from attn_jax.softmax import dense


def check_parity(q, k, v, *, bias=None, sinks=None, mask=None, **kw):
    """Dense and reference (o, lse) and VJPs (dq, dk, dv, dbias, dsinks) in one compiled program."""

    def fd(q, k, v, bias, sinks):
        return aj.attention(q, k, v, mask=mask, bias=bias, sinks=sinks, return_lse=True, impl="dense", **kw)

    def fr(q, k, v, bias, sinks):
        return aj.attention(q, k, v, mask=mask, bias=bias, sinks=sinks, return_lse=True, impl="reference", **kw)

    key = jax.random.key(123)
    (out_d, g_d), (out_r, g_r) = tk.compiled(
        lambda *p: [tk.vjp_with_random_cotangent(f, p, key) for f in (fd, fr)], q, k, v, bias, sinks)
    dtype = q.dtype
    tk.assert_close(out_d[0], out_r[0], dtype=dtype, name="o")
    assert out_d[0].dtype == dtype and out_d[1].dtype == out_r[1].dtype == jnp.float32
    tk.assert_close(out_d[1], out_r[1], dtype="float32", name="lse")
    for name, gd, gr in zip(["dq", "dk", "dv", "dbias", "dsinks"], g_d, g_r):
        if gr is None:
            assert gd is None, name
            continue
        for ld, lr in zip(jax.tree.leaves(gd), jax.tree.leaves(gr)):
            assert ld.dtype == lr.dtype, name
            tk.assert_close(ld, lr, dtype=dtype, grad=True, name=name)
    return out_d, g_d


def qkv(B=2, T=24, S=None, H=4, K=None, Dk=16, Dv=None, dtype=jnp.float32):
    return tk.random_qkv_compiled(jax.random.key(0), B=B, T=T, S=S, H=H, K=K, Dk=Dk, Dv=Dv, dtype=dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_causal_gqa_dk_ne_dv(dtype):
    q, k, v = qkv(T=21, S=21, H=4, K=2, Dk=16, Dv=8, dtype=dtype)
    check_parity(q, k, v, mask=masks.causal())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_all_features_together(dtype):
    """softcap, dense bias, sinks, dropout, sliding window with T != S, MQA."""
    q, k, v = qkv(T=13, S=29, H=4, K=1, dtype=dtype)
    bias = tk.compiled(lambda: jax.random.normal(jax.random.key(5), (1, 4, 13, 29)).astype(dtype))
    sinks = jnp.linspace(-1.0, 1.0, 4).astype(dtype)
    check_parity(q, k, v, bias=bias, sinks=sinks, softcap=3.0, scale=0.3, mask=masks.sliding_window(6),
                 dropout_rate=0.25, dropout_rng=jax.random.key(7))


def test_structured_biases_and_broadcast_dense_bias():
    q, k, v = qkv(T=16, S=20)
    check_parity(q, k, v, bias=alibi(4), mask=masks.causal())
    table = tk.compiled(lambda: jax.random.normal(jax.random.key(2), (32, 4)))
    check_parity(q, k, v, bias=T5RelativeBias(table, bidirectional=True, max_distance=20))
    check_parity(q, k, v, bias=tk.compiled(lambda: jax.random.normal(jax.random.key(3), (1, 1, 16, 20))))


def test_fully_masked_rows_zero_output_and_finite_zero_gradients():
    q, k, v = qkv(B=3, T=10, S=18)
    mask = masks.key_padding(jnp.array([18, 0, 7]))
    (o, lse), (dq, dk, dv, _, _) = check_parity(q, k, v, mask=mask & masks.causal())
    assert np.all(np.asarray(o[1]) == 0) and np.all(np.isneginf(np.asarray(lse[1])))
    for g in (dq[1], dk[1], dv[1]):
        assert np.all(np.asarray(g) == 0)
    # With sinks a fully masked row still has mass (the sink): zero output, finite lse.
    (o, lse), grads = check_parity(q, k, v, mask=mask, sinks=jnp.zeros((4,)))
    assert np.all(np.asarray(o[1]) == 0) and np.all(np.isfinite(np.asarray(lse[1])))


def test_nan_in_padding_does_not_leak():
    q, k, v = qkv(B=2, T=12, S=12)
    ids = jnp.array([[1] * 8 + [0] * 4, [1] * 5 + [2] * 7])
    pad = (ids == 0)[:, :, None, None]
    q, k, v = (jnp.where(pad, jnp.nan, x) for x in (q, k, v))
    (o, lse), grads = check_parity(q, k, v, mask=masks.segments(ids) & masks.causal())
    for x in (o, *grads[:3]):
        assert not np.isnan(np.asarray(x)).any()


def test_auto_picks_dense_on_cpu_within_budget_and_tiled_above():
    small = jax.ShapeDtypeStruct((1, 128, 8, 64), jnp.float32)
    d = aj.explain(small, small, small, mask=masks.causal())
    assert d.chosen["cpu"] == "dense"
    assert d.chosen["rocm"] == "xla" and "XLA:CPU only" in d.reasons["rocm"]["dense"][0]
    side = int(np.sqrt(dense.DENSE_BUDGET // 8)) + 1  # B*H*T*S just over the budget
    big = jax.ShapeDtypeStruct((1, side, 8, 64), jnp.float32)
    d = aj.explain(big, big, big, mask=masks.causal(), platform="cpu")
    assert d.chosen["cpu"] == "xla"
    (reason,) = d.reasons["cpu"]["dense"]
    assert f"T*S*B*H = {side}*{side}*1*8 = {side * side * 8} exceeds the dense budget" in reason
    with pytest.raises(ValueError, match="exceeds the dense budget"):
        jax.eval_shape(lambda q: aj.attention(q, q, q, impl="dense"), big)
