"""MSWA: per-head windows by hand; the grouped tiled form vs the dense per-head mask (values, VJPs)."""

import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.core import testing as tk
from attn_jax.local import mswa_mask, multi_scale_window_attention


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_mask_by_hand():
    m = mswa_mask(4, (1, 2))
    assert np.array_equal(m[0], np.eye(4, dtype=bool))                                  # window 1: itself
    assert [np.nonzero(r)[0].tolist() for r in m[1]] == [[0], [0, 1], [1, 2], [2, 3]]  # window 2
    assert [np.nonzero(r)[0].tolist() for r in mswa_mask(4, (2,), causal=False)[0]] == [[0, 1], [0, 1, 2],
                                                                                         [1, 2, 3], [2, 3]]


@pytest.mark.parametrize("causal", [True, False])
def test_xla_matches_reference(causal):
    # 4 query heads over 2 kv heads; heads 0 and 3 share a window, and the two heads of kv group 1 differ
    q, k, v = _normal(0, (2, 37, 4, 8)), _normal(1, (2, 37, 2, 8)), _normal(2, (2, 37, 2, 6))
    windows = (5, 2, 37, 5)
    tk.check_vjp_parity(lambda q, k, v: multi_scale_window_attention(q, k, v, windows, causal=causal),
                        lambda q, k, v: multi_scale_window_attention(q, k, v, windows, causal=causal,
                                                                     impl="reference"), (q, k, v), "qkv")


def test_bad_arguments():
    x = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="windows: expected a tuple of 2 positive ints"):
        multi_scale_window_attention(x, x, x, (3,))
    with pytest.raises(ValueError, match="windows"):
        multi_scale_window_attention(x, x, x, (3, 0))
    with pytest.raises(ValueError, match="k, v: expected"):
        multi_scale_window_attention(x, jnp.zeros((1, 7, 2, 4)), x, (3, 3))
