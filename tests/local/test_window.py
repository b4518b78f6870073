"""Swin window attention: the shifted partition by hand; Swin's roll + region-mask algorithm vs the
dense reference with the offset-partition mask (values and VJPs)."""

import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.core import testing as tk
from attn_jax.local import neighborhood_mask, window_attention, window_mask


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_mask_by_hand():
    rows = lambda m: [np.nonzero(r)[0].tolist() for r in m]  # noqa: E731
    assert rows(window_mask((6,), 3)) == [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3
    # shift 1: windows [0, 1), [1, 4), [4, 6)
    assert rows(window_mask((6,), 3, shift=1)) == [[0], [1, 2, 3], [1, 2, 3], [1, 2, 3], [4, 5], [4, 5]]
    # unshifted windows are NA with stride = kernel (blocked attention, as in NATTEN's GNA)
    np.testing.assert_array_equal(window_mask((4, 6), (2, 3)), neighborhood_mask((4, 6), (2, 3), stride=(2, 3)))


@pytest.mark.parametrize("shape,H,K,window,shift", [((8, 12), 2, 1, (4, 6), (2, 3)), ((4, 4, 6), 2, 2, 2, (1, 0, 1))])
def test_swin_algorithm_matches_reference(shape, H, K, window, shift):
    q, k, v = _normal(0, (2, *shape, H, 8)), _normal(1, (2, *shape, K, 8)), _normal(2, (2, *shape, K, 8))
    tk.check_vjp_parity(lambda q, k, v: window_attention(q, k, v, window, shift=shift),
                        lambda q, k, v: window_attention(q, k, v, window, shift=shift, impl="reference"),
                        (q, k, v), "qkv")


def test_bad_arguments():
    x = jnp.zeros((1, 8, 6, 2, 4))
    with pytest.raises(ValueError, match="window: expected positive sizes dividing the grid"):
        window_attention(x, x, x, 4)
    with pytest.raises(ValueError, match="shift: expected 0 <= shift < window"):
        window_attention(x, x, x, (4, 3), shift=(2, 3))
    with pytest.raises(TypeError, match="window"):
        window_attention(x, x, x, (4, 3, 1))
