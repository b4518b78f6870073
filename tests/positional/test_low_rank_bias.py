"""Low-rank biases folded into q/k (FlashBias): equal to the same bias given densely, on values and
on the gradients of q, k, v and both factors, for every CPU backend and the Pallas kernels in
interpret mode; exact causal ALiBi factors; the truncated SVD's error; refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import testing as tk
from attn_jax.positional import ALiBi, LowRankBias, alibi_factors, alibi_slopes, low_rank_bias, low_rank_factors

B, T, S, H, K, D, R = 2, 12, 12, 4, 2, 8, 3


def _factors(key, hv, T=T, S=S, dtype=jnp.float32):
    ku, kv = jax.random.split(key)
    return (0.5 * jax.random.normal(ku, (B, T, H, R), dtype), 0.5 * jax.random.normal(kv, (B, S, hv, R), dtype))


def _dense_call(q, k, v, u, w, impl, mask):
    return aj.attention(q, k, v, bias=LowRankBias(u, w).materialize(H), mask=mask, impl="reference")


@pytest.mark.parametrize("impl,hv", [("reference", 1), ("xla", K), ("xla", H), ("dense", K)])
def test_folded_equals_dense_bias_values_and_grads(impl, hv):
    with tk.float64():
        q, k, v = tk.random_qkv(jax.random.key(0), B=B, T=T, H=H, K=K, Dk=D, dtype=jnp.float64)
        u, w = _factors(jax.random.key(1), hv, dtype=jnp.float64)
        mask = masks.causal()
        folded = lambda *a: aj.attention(*a[:3], bias=LowRankBias(*a[3:]), mask=mask, impl=impl)
        dense = lambda *a: _dense_call(*a, impl, mask)
        (o1, g1), (o2, g2) = (tk.compiled_vjp(f, (q, k, v, u, w), jax.random.key(2)) for f in (folded, dense))
        tk.assert_close(o1, o2, name="output")
        for n, a, b in zip(("q", "k", "v", "u", "v-factor"), g1, g2):
            tk.assert_close(a, b, grad=True, name=f"d{n}")


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_pallas_interpret_runs_the_folded_problem(platform):
    """The folded q/k (Dk + r channels, no bias) through the flash kernel in interpret mode."""
    from attn_jax.softmax import pallas as P
    q, k, v = tk.random_qkv(jax.random.key(3), B=1, T=32, H=2, K=1, Dk=16)
    u, w = (0.5 * jax.random.normal(jax.random.key(4), (1, 32, n, 2)) for n in (2, 1))
    want = aj.attention(q, k, v, bias=LowRankBias(u, w).materialize(2), mask=masks.causal(), impl="reference")
    qf, kf, vf, scale = LowRankBias(u, w).fold(q, k, v, None, None)
    got = tk.compiled(lambda *a: P.flash_attention(*a, mask=masks.causal(), scale=scale, platform=platform,
                                                   interpret=True, block_q=16, block_k=16), qf, kf, vf)
    tk.assert_close(got, want, name=f"pallas {platform} interpret")


@pytest.mark.parametrize("T_,S_", [(16, 16), (5, 16)])
def test_alibi_factors_equal_alibi_under_causal_mask(T_, S_):
    q, k, v = tk.random_qkv(jax.random.key(5), B=1, T=T_, S=S_, H=4, K=4, Dk=8)
    slopes = alibi_slopes(4)
    want = tk.compiled(lambda *a: aj.attention(*a, bias=ALiBi(slopes), mask=masks.causal(), impl="reference"), q, k, v)
    got = tk.compiled(lambda *a: aj.attention(*a, bias=alibi_factors(slopes, T_, S_), mask=masks.causal(), impl="xla"),
                      q, k, v)
    tk.assert_close(got, want, name="ALiBi as rank-2 factors")


def test_truncated_svd_exact_for_low_rank_and_reports_error_otherwise():
    with tk.float64():
        u, w = _factors(jax.random.key(6), H, dtype=jnp.float64)
        dense = LowRankBias(u, w).materialize(H)                    # rank R per (b, h)
        fac, err = low_rank_factors(dense, R)
        assert float(err) < 1e-12
        np.testing.assert_allclose(np.asarray(fac.materialize(H)), np.asarray(dense), atol=1e-12)
        noise = jax.random.normal(jax.random.key(7), dense.shape, jnp.float64)
        _, err_r = low_rank_factors(noise, R)
        _, err_full = low_rank_factors(noise, T)
        assert 0.3 < float(err_r) < 1.0 and float(err_full) < 1e-12
        # the error is the SVD's: sqrt of the dropped singular values' energy
        s = np.linalg.svd(np.asarray(noise), compute_uv=False)
        want = np.sqrt((s[..., R:] ** 2).sum() / (s ** 2).sum())
        np.testing.assert_allclose(float(err_r), want, rtol=1e-10)


def test_rank3_layout_and_explain_on_shapes():
    q, k, v = tk.random_qkv(jax.random.key(8), B=1, T=T, H=H, K=K, Dk=D)
    u, w = _factors(jax.random.key(9), K)
    bias = low_rank_bias(u[0], w[0])
    got = aj.attention(q[0], k[0], v[0], bias=bias)
    tk.assert_close(got, aj.attention(q, k, v, bias=LowRankBias(u[:1], w[:1]))[0], name="rank-3 layout")
    sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    decision = aj.explain(sds(q), sds(k), sds(v), bias=LowRankBias(sds(u[:1]), sds(w[:1])), platform="cpu")
    assert decision.chosen["cpu"] in ("dense", "xla")


def test_refusals_name_the_argument():
    q, k, v = tk.random_qkv(jax.random.key(10), B=B, T=T, H=H, K=K, Dk=D)
    u, w = _factors(jax.random.key(11), K)
    with pytest.raises(ValueError, match="bias: .*softcap"):
        aj.attention(q, k, v, bias=LowRankBias(u, w), softcap=5.0)
    with pytest.raises(ValueError, match="bias: .*u must be"):
        aj.attention(q, k, v, bias=LowRankBias(u[:, :5], w))
    with pytest.raises(ValueError, match="bias: .*v must be"):
        aj.attention(q, k, v, bias=LowRankBias(u, jnp.zeros((B, S, 3, R))))
    with pytest.raises(ValueError, match="u, v"):
        low_rank_bias(u, w[..., :2])
    with pytest.raises(ValueError, match="rank"):
        low_rank_factors(jnp.zeros((H, T, S)), 0)
