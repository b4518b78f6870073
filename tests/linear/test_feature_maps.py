"""Feature maps for linear attention: the kernel identities each map promises (Taylor, Performer
unbiasedness, Hedgehog normalisation, DPFP definition), the Hedgehog distillation loss, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.core import testing as tk
from attn_jax.linear import feature_maps as fm


def _x(key, shape, dtype=jnp.float64, scale=1.0):
    return scale * jax.random.normal(key, shape, dtype)


def test_taylor_exp_kernel_identity_and_dimension():
    with tk.float64():
        D = 5
        q, k = _x(jax.random.key(0), (7, D)), _x(jax.random.key(1), (7, D))
        fq, fk = fm.taylor_exp(q), fm.taylor_exp(k)
        assert fq.shape == (7, fm.taylor_exp_dim(D)) == (7, 1 + D + D * D)
        t = jnp.einsum("nd,md->nm", q, k) / math.sqrt(D)
        tk.assert_close(fq @ fk.T, 1 + t + t ** 2 / 2, name="φ(q)·φ(k) = 1 + t + t²/2, t = q·k/√D")
        s = 0.3    # explicit input scale: t = s² q·k
        t2 = s * s * jnp.einsum("nd,md->nm", q, k)
        tk.assert_close(fm.taylor_exp(q, input_scale=s) @ fm.taylor_exp(k, input_scale=s).T, 1 + t2 + t2 ** 2 / 2)


def test_elementwise_maps():
    with tk.float64():
        x = _x(jax.random.key(2), (3, 4, 6))
        assert bool((fm.elu_plus_one(x) > 0).all())
        tk.assert_close(fm.elu_plus_one(x), jnp.where(x > 0, x + 1, jnp.exp(x)))
        tk.assert_close(fm.relu(x), jnp.maximum(x, 0))
        tk.assert_close(fm.identity(x), x)
    assert fm.elu_plus_one(jnp.ones((2, 3), jnp.bfloat16)).dtype == jnp.float32   # computed in float32


def test_dpfp_matches_paper_definition():
    with tk.float64():
        D, nu = 3, 2
        x = _x(jax.random.key(3), (4, D))
        out = fm.dpfp(x, nu=nu)
        assert out.shape == (4, 2 * D * nu)
        r = np.concatenate([np.maximum(np.asarray(x), 0), np.maximum(-np.asarray(x), 0)], -1)
        want = np.zeros((4, 2 * D * nu))
        for j in range(1, nu + 1):             # φ_{i + 2D(j-1)} = r_i r_{(i + j) mod 2D}
            for i in range(2 * D):
                want[:, i + 2 * D * (j - 1)] = r[:, i] * r[:, (i + j) % (2 * D)]
        tk.assert_close(out, want)
        assert bool((out >= 0).all())


def test_hedgehog_positive_and_normalised_per_head():
    with tk.float64():
        B, T, H, D, F = 2, 5, 3, 4, 6
        x = _x(jax.random.key(4), (B, T, H, D))
        W = _x(jax.random.key(5), (H, D, F))
        b = _x(jax.random.key(6), (H, F))
        out = fm.hedgehog(x, W, b)
        assert out.shape == (B, T, H, 2 * F)
        assert bool((out > 0).all())
        tk.assert_close(out[..., :F].sum(-1), jnp.ones((B, T, H)), name="softmax(xW) sums to 1")
        tk.assert_close(out[..., F:].sum(-1), jnp.ones((B, T, H)), name="softmax(-xW) sums to 1")
        z = jnp.einsum("bthd,hdf->bthf", x, W) + b
        tk.assert_close(out[..., :F], jax.nn.softmax(z, -1))
        tk.assert_close(out[..., F:], jax.nn.softmax(-z, -1))
        shared = fm.hedgehog(x, W[0])                         # one [D, F] layer for every head
        tk.assert_close(shared[..., :F], jax.nn.softmax(x @ W[0], -1))


def test_hedgehog_distillation_loss_matches_direct_cross_entropy_and_trains():
    with tk.float64():
        B, T, H, D, F = 1, 6, 2, 4, 5
        q, k = _x(jax.random.key(7), (B, T, H, D)), _x(jax.random.key(8), (B, T, H, D))
        Wq, Wk = _x(jax.random.key(9), (H, D, F)), _x(jax.random.key(10), (H, D, F))
        for causal in (True, False):
            loss = fm.hedgehog_distillation_loss(q, k, Wq, Wk, causal=causal)
            qn, kn = np.asarray(q), np.asarray(k)
            fq, fk = np.asarray(fm.hedgehog(q, Wq)), np.asarray(fm.hedgehog(k, Wk))
            total, n = 0.0, 0
            for h in range(H):
                for i in range(T):
                    js = range(i + 1) if causal else range(T)
                    s = np.array([qn[0, i, h] @ kn[0, j, h] / math.sqrt(D) for j in js])
                    p = np.exp(s - s.max()); p /= p.sum()
                    lin = np.array([fq[0, i, h] @ fk[0, j, h] for j in js]); lin /= lin.sum()
                    total += -(p * np.log(lin)).sum(); n += 1
            tk.assert_close(loss, total / n, name=f"loss causal={causal}")
        # the loss is differentiable in the map weights and gradient descent lowers it
        grad = jax.jit(jax.value_and_grad(lambda w: fm.hedgehog_distillation_loss(q, k, w[0], w[1]), argnums=0))
        w = (Wq, Wk)
        l0, _ = grad(w)
        for _ in range(20):
            _, g = grad(w)
            w = jax.tree.map(lambda a, b: a - 0.5 * b, w, g)
        l1, _ = grad(w)
        assert np.isfinite(l1) and l1 < l0


def test_hedgehog_distillation_loss_with_packed_documents():
    """Packed documents (+ padding) == the valid-query-weighted mean of each document alone."""
    with tk.float64():
        T, H, D, F = 9, 2, 4, 3
        q, k = _x(jax.random.key(1), (1, T, H, D)), _x(jax.random.key(2), (1, T, H, D))
        Wq, Wk = _x(jax.random.key(3), (H, D, F)), _x(jax.random.key(4), (H, D, F))
        seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0, 0]])
        q_nan = q.at[0, 7:].set(jnp.nan)                      # padding content must not matter
        for causal in (True, False):
            packed = fm.hedgehog_distillation_loss(q_nan, k, Wq, Wk, causal=causal, segment_ids=seg)
            a = fm.hedgehog_distillation_loss(q[:, :4], k[:, :4], Wq, Wk, causal=causal)
            b = fm.hedgehog_distillation_loss(q[:, 4:7], k[:, 4:7], Wq, Wk, causal=causal)
            tk.assert_close(packed, (4 * a + 3 * b) / 7, name=f"packed loss causal={causal}")


def test_orthogonal_random_projection_structure():
    with tk.float64():
        m, d = 10, 4                                         # 3 blocks, the last one partial
        W = fm.orthogonal_random_projection(jax.random.key(11), m, d, dtype=jnp.float64)
        assert W.shape == (m, d)
        for blk in range(0, m, d):
            rows = W[blk:blk + d]
            u = rows / jnp.linalg.norm(rows, axis=-1, keepdims=True)
            tk.assert_close(u @ u.T, jnp.eye(rows.shape[0]), rel=1e-5, atol=1e-5,
                            name="directions orthonormal in a block (drawn in float32)")
        again = fm.orthogonal_random_projection(jax.random.key(11), m, d, dtype=jnp.float64)
        np.testing.assert_array_equal(np.asarray(W), np.asarray(again))       # explicit key: deterministic


def test_performer_features_are_unbiased_for_exp_kernel():
    """E_W[φ(q)·φ(k)] = exp(q·k).  R independent projections of m features each give R i.i.d.
    estimates; their mean must lie within 5 standard errors of exp(q·k) for every pair (for a
    Gaussian mean, |z| > 5 has probability 6e-7 per pair; 16 pairs; the seed is fixed)."""
    d, m, R, P = 4, 64, 256, 16
    q = _x(jax.random.key(12), (P, d), jnp.float32, scale=0.35)
    k = _x(jax.random.key(13), (P, d), jnp.float32, scale=0.35)

    @jax.jit
    def estimate(key):
        W = fm.orthogonal_random_projection(key, m, d)
        return jnp.sum(fm.performer_features(q, W) * fm.performer_features(k, W), -1)   # [P]

    est = jax.vmap(estimate)(jax.random.split(jax.random.key(14), R))                  # [R, P]
    mean, se = est.mean(0), est.std(0) / math.sqrt(R)
    exact = jnp.exp(jnp.sum(q * k, -1))
    z = (mean - exact) / se
    assert bool((jnp.abs(z) < 5).all()), f"z-scores {np.asarray(z)}"
    assert float(jnp.max(jnp.abs(mean / exact - 1))) < 0.05
    assert bool((est > 0).all())                                                        # positive features


def test_bad_inputs_name_the_argument():
    x = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match="nu"):
        fm.dpfp(x, nu=0)
    with pytest.raises(ValueError, match="projection"):
        fm.performer_features(x, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="W"):
        fm.hedgehog(x, jnp.ones((5, 6)))
    with pytest.raises(ValueError, match="b"):
        fm.hedgehog(x, jnp.ones((4, 6)), jnp.ones((5,)))
    with pytest.raises(ValueError, match="m"):
        fm.orthogonal_random_projection(jax.random.key(0), 0, 4)
    with pytest.raises(TypeError, match="x"):
        fm.taylor_exp(jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="feature_map"):
        fm.resolve_feature_map("softmax")
