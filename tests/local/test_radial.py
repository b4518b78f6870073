"""Radial attention: the mask by hand (bands halve the spatial window, far frames keep the diagonal),
rule-defined grid masks classify exactly, the tiled form vs the dense reference (values and VJPs)."""

import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.core import masks as M
from attn_jax.core import testing as tk
from attn_jax.local import HaloMask, RadialMask, radial_attention, radial_mask


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_mask_by_hand():
    """12 frames of s = 4 tokens: frame distance 0-1 sees the whole frame, 2-3 a window |k-l| <= 1
    (|k-l| + 1 <= 4/2), 4-7 only k = l (|k-l| + 1 <= 1), then every ceil(2^r / 4)-th frame's k = l:
    distance 8, 10 (r = 3: every 2nd) but not 9, 11."""
    m = radial_mask((12, 2, 2))
    block = lambda d: m[:4, 4 * d:4 * d + 4].astype(int)  # noqa: E731   frame 0 vs frame d
    band = np.abs(np.arange(4)[:, None] - np.arange(4)[None, :])
    for d in (0, 1):
        assert block(d).all()
    for d in (2, 3):
        np.testing.assert_array_equal(block(d), band <= 1)
    for d in (4, 5, 6, 7, 8, 10):
        np.testing.assert_array_equal(block(d), np.eye(4))
    for d in (9, 11):
        assert not block(d).any()
    np.testing.assert_array_equal(m, m.T)                                  # symmetric in |i - j|
    sink = radial_mask((12, 2, 2), sink=True)
    assert sink[:, :4].all() and (sink[:, 4:] == m[:, 4:]).all()           # frame 0 seen by all


@pytest.mark.parametrize("mask", [RadialMask((8, 2, 4), None, True), HaloMask((8, 16), None, (2, 4), (1, 1))],
                         ids=["radial", "halo"])
def test_grid_masks_classify_exactly(mask):
    """A rule-defined grid mask in a blocked token order: classify == any / all of the dense tiles, and the
    predicate on tile indices == the dense mask permuted to that order."""
    import dataclasses

    from attn_jax.local.grid_mask import dense_grid_mask
    from attn_jax.local.neighborhood import tile_shape, token_order

    block = tile_shape(mask.spatial, 16)
    m = dataclasses.replace(mask, block=block)
    order = token_order(mask.spatial, block)
    dense = dense_grid_mask(mask)[order][:, order]
    N, b = dense.shape[0], 16
    tiles = dense.reshape(N // b, b, N // b, b)
    want = np.where(~tiles.any((1, 3)), M.EMPTY, np.where(tiles.all((1, 3)), M.FULL, M.PARTIAL))
    np.testing.assert_array_equal(m.classify(N, N, b, b)[0, 0], want)
    assert (want == M.PARTIAL).any()
    if isinstance(mask, HaloMask):
        assert (want == M.EMPTY).any()                                      # some tiles are skipped
    pred = tk.compiled(lambda i: m.predicate(i, i, N, N), jnp.arange(N))
    np.testing.assert_array_equal(np.asarray(pred)[0, 0], dense)


def test_tiled_matches_reference():
    """[frames, h, w] = [16, 2, 4] (s = 8: bands down to the diagonal and beyond), GQA, with the sink."""
    shape = (16, 2, 4)
    q, k, v = _normal(0, (1, *shape, 4, 8)), _normal(1, (1, *shape, 2, 8)), _normal(2, (1, *shape, 2, 8))
    tk.check_vjp_parity(lambda q, k, v: radial_attention(q, k, v, sink=True),
                        lambda q, k, v: radial_attention(q, k, v, sink=True, impl="reference"), (q, k, v), "qkv")


def test_bad_arguments():
    x = jnp.zeros((1, 4, 6, 2, 8))
    with pytest.raises(ValueError, match="q: expected a video grid"):
        radial_attention(x, x, x)
    y = jnp.zeros((1, 4, 2, 2, 2, 8))
    with pytest.raises(TypeError, match="sink: expected a bool"):
        radial_attention(y, y, y, sink=1)
