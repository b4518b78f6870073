"""The dropout keep mask (defined once in pallas_kernels.dropout) against an independent
NumPy uint32 evaluation of the MurmurHash3 finaliser scheme it documents."""

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.core import random as aj_random


def _fmix32_np(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _keep_np(seed, rate, b, h, i, j):
    u = lambda x: np.asarray(x, np.uint64).astype(np.uint32)
    with np.errstate(over="ignore"):
        x = _fmix32_np(seed[0] ^ _fmix32_np(u(b) * np.uint32(0x9E3779B1) + u(h) + seed[1]))
        x = _fmix32_np(x ^ (u(i) * np.uint32(0xCC9E2D51)))
        x = _fmix32_np(x ^ (u(j) * np.uint32(0x1B873593)) ^ seed[1])
    return (x >> np.uint32(8)).astype(np.float64) / (1 << 24) >= np.float32(rate)


def test_keep_mask_equals_the_documented_hash_in_numpy():
    seed = aj_random.dropout_seed(jax.random.key(3))
    b, h = np.arange(2)[:, None, None, None], np.arange(3)[None, :, None, None]
    i, j = np.arange(17)[None, None, :, None], np.arange(40)[None, None, None, :]
    for rate in (0.1, 0.5, 0.9):
        got = np.asarray(jax.jit(aj_random.keep_mask, static_argnums=1)(seed, rate, b, h, i, j))
        want = _keep_np(np.asarray(seed), rate, b, h, i, j)
        np.testing.assert_array_equal(got, want)
        assert abs(got.mean() - (1 - rate)) < 0.1
