"""HiLo attention: the two head groups by hand (Hi-Fi = Swin windows, Lo-Fi over one pooled key =
mean of v), the xla form vs the reference (values and VJPs, GQA), bad arguments."""

import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.core import testing as tk
from attn_jax.local import hilo_attention, window_attention


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_head_groups_by_hand():
    """lo_heads=0 is window attention; Lo-Fi heads with one window covering the grid see a single pooled
    key, so their output is the grid mean of v; mixed: Hi-Fi heads first, then Lo-Fi."""
    q, k, v = _normal(0, (1, 4, 6, 4, 8)), _normal(1, (1, 4, 6, 4, 8)), _normal(2, (1, 4, 6, 4, 8))
    hi, win, lo, mixed, lo_part = tk.compiled(lambda q, k, v: (
        hilo_attention(q, k, v, 2, lo_heads=0), window_attention(q, k, v, 2),
        hilo_attention(q, k, v, (4, 6), lo_heads=4, impl="reference"),
        hilo_attention(q, k, v, 2, lo_heads=1), hilo_attention(q[..., 3:, :], k[..., 3:, :], v[..., 3:, :], 2,
                                                               lo_heads=1)), q, k, v)
    tk.assert_close(hi, win)
    np.testing.assert_allclose(np.asarray(lo), np.broadcast_to(np.asarray(v).mean((1, 2), keepdims=True), lo.shape),
                               rtol=1e-5, atol=1e-6)
    tk.assert_close(mixed[..., :3, :], win[..., :3, :])
    tk.assert_close(mixed[..., 3:, :], lo_part)


def test_xla_matches_reference():
    """2-D grid, GQA (4 query heads on 2 k/v heads: one k/v head per group), Dv != Dk, values and VJPs."""
    q, k, v = _normal(0, (2, 4, 6, 4, 8)), _normal(1, (2, 4, 6, 2, 8)), _normal(2, (2, 4, 6, 2, 6))
    tk.check_vjp_parity(lambda q, k, v: hilo_attention(q, k, v, (2, 3), lo_heads=2),
                        lambda q, k, v: hilo_attention(q, k, v, (2, 3), lo_heads=2, impl="reference"),
                        (q, k, v), "qkv")


def test_bad_arguments():
    x, y = jnp.zeros((1, 4, 6, 4, 8)), jnp.zeros((1, 4, 6, 2, 8))
    with pytest.raises(ValueError, match="window: expected positive sizes dividing the grid"):
        hilo_attention(x, x, x, 4, lo_heads=2)
    with pytest.raises(ValueError, match=r"lo_heads: expected an int in \[0, 4\]"):
        hilo_attention(x, x, x, 2, lo_heads=5)
    with pytest.raises(ValueError, match="lo_heads: expected lo_heads \\* K / H to be an integer"):
        hilo_attention(x, y, y, 2, lo_heads=1)
    with pytest.raises(TypeError, match="window: expected an int or a tuple of 2"):
        hilo_attention(x, x, x, (2, 2, 2), lo_heads=1)
