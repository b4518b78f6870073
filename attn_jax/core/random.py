"""Counter-based dropout masks that every implementation reproduces exactly.

Attention dropout drops entries of the probability matrix ``P[b, h, i, j]``.
To compare a tiled implementation (XLA chunks, Pallas kernels) with the
reference, each entry's keep/drop decision must be a pure function of
``(key, b, h, i, j)`` and not of the tiling.  We hash those integers with the
MurmurHash3 32-bit finaliser (Appleby, public domain), a cheap avalanche mix
that Pallas kernels can evaluate with uint32 arithmetic inside a tile.  The
decision is ``uniform(b, h, i, j) >= rate`` with ``uniform`` built from the top
24 bits of the hash.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_seed(rng) -> jax.Array:
    """Two uint32 words derived from a PRNG key (typed or raw)."""
    return jax.random.bits(rng, (2,), jnp.uint32)


def keep_mask(seed, rate: float, b_idx, h_idx, q_idx, k_idx):
    """Boolean keep-mask broadcast over the given index arrays.

    ``seed: uint32[2]``; index arrays are integer arrays broadcastable together
    (e.g. ``b[:, None, None, None]``, ``h[None, :, None, None]``,
    ``i[None, None, :, None]``, ``j[None, None, None, :]``).
    """
    u32 = lambda x: jnp.asarray(x).astype(jnp.uint32)
    h = _fmix32(seed[0] ^ _fmix32(u32(b_idx) * jnp.uint32(0x9E3779B1) + u32(h_idx) + seed[1]))
    h = _fmix32(h ^ (u32(q_idx) * jnp.uint32(0xCC9E2D51)))
    h = _fmix32(h ^ (u32(k_idx) * jnp.uint32(0x1B873593)) ^ seed[1])
    uniform = (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
    return uniform >= rate
