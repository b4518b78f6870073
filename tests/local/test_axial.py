"""Axial attention: the mask by hand, the folded form vs the masked dense reference (values, VJPs)."""

import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax.core import testing as tk
from attn_jax.local import axial, axial_mask


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_mask_by_hand():
    m = axial_mask((2, 3), 1)                      # along columns: a row's 3 tokens see each other
    assert [np.nonzero(r)[0].tolist() for r in m] == [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3
    m = axial_mask((2, 3), 0, causal=True)         # along rows, causal: token (1, c) sees (0, c), (1, c)
    assert [np.nonzero(r)[0].tolist() for r in m] == [[0], [1], [2], [0, 3], [1, 4], [2, 5]]


@pytest.mark.parametrize("shape,H,K,axis,causal", [((5, 6), 4, 2, 1, False), ((3, 4, 5), 2, 1, -3, True)])
def test_xla_matches_reference(shape, H, K, axis, causal):
    q, k, v = _normal(0, (2, *shape, H, 8)), _normal(1, (2, *shape, K, 8)), _normal(2, (2, *shape, K, 6))
    tk.check_vjp_parity(lambda q, k, v: axial(q, k, v, axis, causal=causal),
                        lambda q, k, v: axial(q, k, v, axis, causal=causal, impl="reference"), (q, k, v), "qkv")


def test_bad_arguments():
    x = jnp.zeros((1, 4, 5, 2, 8))
    with pytest.raises(ValueError, match="axis: expected a spatial axis"):
        axial(x, x, x, 2)
    with pytest.raises(TypeError, match="axis: expected an int"):
        axial(x, x, x, 0.5)
    with pytest.raises(TypeError, match="causal"):
        axial(x, x, x, 0, causal=1)
    with pytest.raises(ValueError, match="k: expected batch and grid"):
        axial(x, jnp.zeros((1, 4, 4, 2, 8)), x, 0)
    assert aj.explain(axial, x, x, x, 1).chosen["cpu"] == "xla"
