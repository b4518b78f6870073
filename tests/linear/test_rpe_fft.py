"""Kernelised attention with relative positions (FFT): the Toeplitz FFT against an explicit
Toeplitz matmul, the op against an independent NumPy loop and against its materialised reference
(values and VJPs), causality, float32/bfloat16 accuracy, vmap, bad input.  The catalogue
(tests/linear/test_catalog.py) also runs ``impl="fft"`` against the reference in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.core import testing as tk
from attn_jax.linear.rpe_fft import kernelized_rpe_attention, kernelized_rpe_attention_reference, toeplitz_apply


def _inputs(key, T, dtype=jnp.float64, B=2, H=4, K=2, Dk=5, Dv=3):
    q, k, v = tk.random_qkv(key, B=B, T=T, H=H, K=K, Dk=Dk, Dv=Dv, dtype=dtype)
    rel = 0.5 * jax.random.normal(jax.random.fold_in(key, 1), (H, 2 * T - 1), dtype)
    return q, k, v, rel


def _loop_oracle(q, k, v, rel, causal, eps=1e-6):
    """Token loop in float64 NumPy, elu+1 features written out: independent of attn_jax."""
    q, k, v, rel = (np.asarray(a, np.float64) for a in (q, k, v, rel))
    phi = lambda x: np.where(x > 0, x + 1.0, np.exp(x))
    B, T, H, _ = q.shape
    G = H // k.shape[2]
    o = np.zeros((B, T, H, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            for i in range(T):
                num, den = 0.0, 0.0
                for j in range(T if not causal else i + 1):
                    w = phi(q[b, i, h]) @ phi(k[b, j, h // G]) * np.exp(rel[h, j - i + T - 1])
                    num = num + w * v[b, j, h // G]
                    den += w
                o[b, i, h] = num / (den + eps)
    return o


@pytest.mark.parametrize("T", [1, 2, 9, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_toeplitz_apply_equals_matmul(T, causal):
    with tk.float64():
        key = jax.random.key(T)
        lw = jax.random.normal(key, (3, 2 * T - 1), jnp.float64)
        x = jax.random.normal(jax.random.fold_in(key, 1), (3, T, 4), jnp.float64)
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        C = np.exp(np.asarray(lw))[:, j - i + T - 1] * ((j <= i) if causal else 1.0)
        want = np.einsum("nij,njc->nic", C, np.asarray(x))
        np.testing.assert_allclose(np.asarray(tk.compiled(toeplitz_apply, lw, x, causal=causal)), want,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_numpy_loop_and_reference(causal):
    with tk.float64():
        q, k, v, rel = _inputs(jax.random.key(3), T=11)
        want = _loop_oracle(q, k, v, rel, causal)
        got = tk.compiled(kernelized_rpe_attention, q, k, v, rel, causal=causal, impl="fft")
        ref = tk.compiled(kernelized_rpe_attention_reference, q, k, v, rel, causal=causal)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-10, atol=1e-12)
        fast = lambda *a: kernelized_rpe_attention(*a, causal=causal, impl="fft")
        slow = lambda *a: kernelized_rpe_attention_reference(*a, causal=causal)
        (o1, g1), (o2, g2) = (tk.compiled_vjp(f, (q, k, v, rel), jax.random.key(7)) for f in (fast, slow))
        tk.assert_close(o1, o2, name="output")
        for n, a, b in zip("qkv", g1, g2):
            tk.assert_close(a, b, grad=True, name=f"d{n}")
        tk.assert_close(g1[3], g2[3], grad=True, name="drel_bias")


def test_causal_outputs_ignore_the_future():
    with tk.float64():
        q, k, v, rel = _inputs(jax.random.key(4), T=10)
        f = jax.jit(lambda *a: kernelized_rpe_attention(*a, rel, causal=True))
        tk.check_causality_by_perturbation(f, q, k, v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_close_to_float64(dtype):
    q, k, v, rel = _inputs(jax.random.key(5), T=64, dtype=jnp.float32)
    with tk.float64():
        want = tk.compiled(kernelized_rpe_attention_reference, *(a.astype(jnp.float64) for a in (q, k, v, rel)))
    got = tk.compiled(kernelized_rpe_attention, *(a.astype(dtype) for a in (q, k, v)), rel)
    assert got.dtype == dtype
    tk.assert_close(got, want, dtype=dtype, name="output")


def test_vmap_over_batch():
    q, k, v, rel = _inputs(jax.random.key(6), T=8, dtype=jnp.float32)
    per_row = jax.jit(jax.vmap(lambda a, b, c: kernelized_rpe_attention(a[None], b[None], c[None], rel)[0]))(q, k, v)
    tk.assert_close(per_row, tk.compiled(kernelized_rpe_attention, q, k, v, rel), name="vmap")


def test_bad_inputs_name_the_argument():
    q, k, v, rel = _inputs(jax.random.key(8), T=6, dtype=jnp.float32)
    with pytest.raises(ValueError, match="rel_bias"):
        kernelized_rpe_attention(q, k, v, rel[:, 1:])
    with pytest.raises(ValueError, match="k: .*T == S"):
        kernelized_rpe_attention(q, k[:, :5], v[:, :5], rel)
    with pytest.raises(ValueError, match="impl"):
        kernelized_rpe_attention(q, k, v, rel, impl="chunk")
    with pytest.raises(ValueError, match="log_weights"):
        toeplitz_apply(rel, jnp.zeros((4, 5, 2)))
