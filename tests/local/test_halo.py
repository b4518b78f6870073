"""HaloNet blocked local attention: the rule by hand, the border padding by hand, the tiled mask
form (with the LSE-merged zero padding) vs HaloNet's padded blocked algorithm (values and VJPs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax.core import masks as M
from attn_jax.core import testing as tk
from attn_jax.local import halo_attention, halo_mask, window_mask


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_mask_by_hand():
    rows = lambda m: [np.nonzero(r)[0].tolist() for r in m]  # noqa: E731
    # blocks of 2 with a halo of 1: block [2, 3] sees [1, 4]; the border blocks are cut by the grid
    assert rows(halo_mask((8,), 2, 1)) == [[0, 1, 2]] * 2 + [[1, 2, 3, 4]] * 2 + [[3, 4, 5, 6]] * 2 + [[5, 6, 7]] * 2
    # no halo: Swin's (unshifted) windows
    np.testing.assert_array_equal(halo_mask((4, 6), (2, 3), 0), window_mask((4, 6), (2, 3)))


def test_zero_padding_by_hand():
    """k = 0, v = 1: every logit is 0, so a query's output is (real keys of its window) / (b + 2h)^d with
    HaloNet's unmasked zero padding, and exactly 1 with the padding masked."""
    B, shape, b, h = 1, (4, 6), 2, 1
    q = _normal(0, (B, *shape, 2, 4))
    k, v = jnp.zeros((B, *shape, 1, 4)), jnp.ones((B, *shape, 1, 4))
    outs = tk.compiled(lambda q, k, v: [halo_attention(q, k, v, b, h, padding=p, impl=i)
                                        for p in ("zeros", "masked") for i in ("tiled", "reference")], q, k, v)
    real = halo_mask(shape, b, h).sum(1).reshape(shape) / (b + 2 * h) ** 2
    for o in outs[:2]:
        np.testing.assert_allclose(np.asarray(o)[0, :, :, 0, 0], real, rtol=1e-6)
    for o in outs[2:]:
        np.testing.assert_allclose(np.asarray(o), 1.0, rtol=1e-6)


@pytest.mark.parametrize("padding", ["zeros", "masked"])
def test_tiled_matches_reference(padding):
    """The tiled mask form (2-D, GQA, halo != block / 2, D_v != D_k), values and VJPs, against HaloNet's
    padded algorithm (zero padding) and against dense attention with :func:`halo_mask` (masked)."""
    shape, bs, halo, N = (4, 8), (2, 4), (1, 2), 32
    q, k, v = _normal(0, (2, *shape, 4, 8)), _normal(1, (2, *shape, 2, 8)), _normal(2, (2, *shape, 2, 6))
    if padding == "zeros":
        ref = lambda q, k, v: halo_attention(q, k, v, bs, halo, impl="reference")  # noqa: E731
    else:
        dense = M.dense(jnp.asarray(halo_mask(shape, bs, halo))[None, None])
        def ref(q, k, v):
            return aj.attention(q.reshape(2, N, 4, 8), k.reshape(2, N, 2, 8), v.reshape(2, N, 2, 6), mask=dense,
                                impl="reference").reshape(2, *shape, 4, 6)
    tk.check_vjp_parity(lambda q, k, v: halo_attention(q, k, v, bs, halo, padding=padding), ref, (q, k, v), "qkv")


def test_bad_arguments():
    x = jnp.zeros((1, 8, 6, 2, 4))
    with pytest.raises(ValueError, match="block_size: expected positive sizes dividing the grid"):
        halo_attention(x, x, x, 4, 1)
    with pytest.raises(ValueError, match="halo: expected sizes >= 0"):
        halo_attention(x, x, x, 2, -1)
    with pytest.raises(ValueError, match="padding: expected one of"):
        halo_attention(x, x, x, 2, 1, padding="reflect")
    with pytest.raises(TypeError, match="block_size: expected an int or a tuple of 2"):
        halo_attention(x, x, x, (2, 2, 2), 1)
    assert "tiled" in str(aj.explain(halo_attention, jax.ShapeDtypeStruct(x.shape, x.dtype),
                                     jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype),
                                     2, 1))
