"""Stability tools: σReparam (Zhai et al. 2023, arXiv:2303.06296) — power iteration against the SVD,
the gradient of σ, the NNX layer's init and state updates; attention statistics against NumPy and
the uniform-attention entropy; MultiHeadAttention(monitor=True) sowing them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import masks
from attn_jax.core import testing as tk
from attn_jax.nn import MultiHeadAttention
from attn_jax.nn.stability import SigmaReparamLinear
from attn_jax.variants import attention_statistics, sigma_reparam, spectral_norm


def _svd(w):
    u, s, vh = np.linalg.svd(np.asarray(w, np.float64).reshape(w.shape[0], -1))
    return s, u[:, 0], vh[0]


def test_power_iteration_and_gradient_of_sigma():
    w = jax.random.normal(jax.random.key(0), (12, 3, 4))            # viewed as [12, 12]
    s, left, right = _svd(w)
    u0 = jax.random.normal(jax.random.key(1), (12,))
    run = tk.fast_jit(lambda w, u: spectral_norm(w, u, n_iter=200))
    sigma, u = run(w, u0)
    np.testing.assert_allclose(float(sigma), s[0], rtol=1e-4)
    np.testing.assert_allclose(np.abs(np.asarray(u)), np.abs(right), atol=1e-3)
    # at the fixed point dσ/dW = v uᵀ (top singular vectors)
    g = tk.fast_jit(jax.grad(lambda w: spectral_norm(w, jnp.asarray(right, jnp.float32))[0]))(w)
    np.testing.assert_allclose(np.asarray(g).reshape(12, 12), np.outer(left, right), atol=1e-4)
    w_hat, _ = tk.fast_jit(lambda w, u: sigma_reparam(w, 2.5, u, n_iter=200))(w, u0)
    np.testing.assert_allclose(_svd(w_hat)[0][0], 2.5, rtol=1e-4)


def test_sigma_reparam_linear_starts_as_the_plain_layer_and_tracks_u_in_training():
    layer = SigmaReparamLinear(8, 5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (3, 8))
    tk.assert_close(layer(x), x @ layer.kernel[...] + layer.bias[...], rel=1e-5, atol=1e-5, name="Ŵ = W at init")
    np.testing.assert_allclose(float(layer.gamma[...]), _svd(layer.kernel[...])[0][0], rtol=1e-6)
    layer.kernel[...] = jax.random.normal(jax.random.key(3), (8, 5))     # as after an optimizer step
    u0 = np.asarray(layer.u[...])
    layer(x)
    np.testing.assert_array_equal(np.asarray(layer.u[...]), u0)          # evaluation: u frozen
    layer(x, deterministic=False)
    assert np.abs(np.asarray(layer.u[...]) - u0).max() > 1e-3
    with pytest.raises(ValueError, match="^u:"):
        spectral_norm(layer.kernel[...], jnp.ones(4))


def test_attention_statistics():
    B, T, H, K, D = 2, 6, 4, 2, 8
    q, k, _ = tk.random_qkv_compiled(jax.random.key(4), B=B, T=T, H=H, K=K, Dk=D, Dv=D)
    lengths = jnp.array([6, 3], jnp.int32)
    mask = masks.causal() & masks.key_padding(lengths)
    run = tk.fast_jit(lambda q, k: (attention_statistics(q, k, mask=mask, softcap=2.0),
                                    attention_statistics(jnp.zeros_like(q), k, mask=masks.causal())))
    (mx, ent), (_, ent_uniform) = run(q, k)
    s = np.einsum("bthd,bshd->bths", np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, axis=2))
    s = 2.0 * np.tanh(s / np.sqrt(D) / 2.0)
    vis = (np.arange(T)[None, :, None] >= np.arange(T)[None, None, :]) & (np.arange(T) < np.asarray(lengths)[:, None,
                                                                                                         None])
    vis = vis[:, :, None, :]
    s_m = np.where(vis, s, -np.inf)
    p = np.exp(s_m - s_m.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(mx), s_m.max(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), -(p * np.log(np.where(p > 0, p, 1))).sum(-1), rtol=1e-4, atol=1e-5)
    # uniform attention over the i + 1 visible keys: entropy log(i + 1)
    np.testing.assert_allclose(np.asarray(ent_uniform), np.broadcast_to(np.log(np.arange(1, T + 1))[None, :, None],
                                                                        (B, T, H)), atol=1e-5)


def test_multihead_attention_monitor_sows_the_statistics():
    m = MultiHeadAttention(16, 4, num_kv_heads=2, positional="none", monitor=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (2, 7, 16))
    graphdef, state = nnx.split(m)

    @tk.fast_jit
    def run(state, x):
        mm = nnx.merge(graphdef, state)
        _, inter = nnx.capture(mm, nnx.Intermediate)(x)
        (ent,), (mx,) = inter["attention_entropy"].get_value(), inter["attention_logit_max"].get_value()
        q = jnp.einsum("btd,dhf->bthf", x, mm.w_q[...])
        k = jnp.einsum("btd,dkf->btkf", x, mm.w_k[...])
        return ent, mx, attention_statistics(q, k, mask=masks.causal())

    ent, mx, (mx_ref, ent_ref) = run(state, x)
    tk.assert_close(ent, ent_ref, name="entropy")
    tk.assert_close(mx, mx_ref, name="max logit")
    assert not MultiHeadAttention(16, 4, rngs=nnx.Rngs(0)).monitor
