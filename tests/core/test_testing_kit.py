"""The test kit itself can fail: each checker rejects a deliberately broken input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import testing as kit


def test_assert_close_checks_nan_first_then_rmse_and_max_abs():
    ref = jnp.ones((4, 4))
    kit.assert_close(ref + 1e-7, ref)
    with pytest.raises(AssertionError, match="NaN"):
        kit.assert_close(ref.at[0, 0].set(jnp.nan), ref)
    with pytest.raises(AssertionError, match="relative RMSE"):
        kit.assert_close(ref * 1.01, ref)
    with pytest.raises(AssertionError, match="max abs"):
        kit.assert_close(ref.at[0, 0].add(1e-3), ref)  # small RMSE, large single error
    with pytest.raises(AssertionError, match="infinities"):
        kit.assert_close(jnp.array([0.0, 1.0]), jnp.array([-jnp.inf, 1.0]))
    kit.assert_close(jnp.array([-jnp.inf, 1.0]), jnp.array([-jnp.inf, 1.0]))
    # bf16 tolerance is looser; gradients get twice the tolerance.
    kit.assert_close((ref * 1.004).astype(jnp.bfloat16), ref, dtype=jnp.bfloat16)
    assert kit.tolerance(jnp.float32, grad=True) == (2e-5, 2e-4)


def test_invariants_catch_broken_mechanisms():
    q, k, v = kit.random_qkv(jax.random.key(0), B=1, T=8, H=2, Dk=4)
    not_causal = lambda q, k, v: aj.attention(q, k, v, impl="reference")
    with pytest.raises(AssertionError):
        kit.check_causality(not_causal, q, k, v)
    with pytest.raises(AssertionError):
        kit.check_causality_by_perturbation(not_causal, q, k, v)
    ids = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]])
    leaky = lambda q, k, v, ids: aj.attention(q, k, v, mask=masks.causal(), impl="reference")
    causal = lambda q, k, v: aj.attention(q, k, v, mask=masks.causal(), impl="reference")
    with pytest.raises(AssertionError):
        kit.check_packed_equals_padded(leaky, causal, q, k, v, ids)
    counter = iter(range(100))
    with pytest.raises(AssertionError, match="differ"):
        kit.check_deterministic(lambda x: x + next(counter), jnp.zeros(2))


def test_random_segment_ids_are_packed_runs_with_trailing_padding():
    ids = np.asarray(kit.random_segment_ids(jax.random.key(3), 4, 32, max_segments=4))
    for row in ids:
        real = row[row > 0]
        assert (np.diff(real) >= 0).all() and real[0] == 1
        assert (row[len(real):] == 0).all()


def test_vjp_with_random_cotangent_zeroes_infinite_outputs():
    f = lambda x: (x * 2, jnp.where(x > 0, x, -jnp.inf))
    out, (g,) = kit.vjp_with_random_cotangent(f, (jnp.array([1.0, -1.0]),), jax.random.key(0))
    assert np.isfinite(np.asarray(g)).all()
