"""The counter-based dropout keep mask: the single definition every implementation uses.

Attention dropout drops entries of the probability matrix ``P[b, h, i, j]``.  For a tiled
implementation (XLA chunks, Pallas kernels) to drop exactly what the reference drops, each
entry's decision is a pure function of ``(seed, b, h, i, j)``, never of the tiling: the
integers are mixed with the MurmurHash3 32-bit finaliser (Appleby, public domain) and the entry
is kept iff ``uniform(seed, b, h, i, j) >= rate``, ``uniform`` built from the top 24 bits of the
hash.  Written in int32 with logical shifts (multiplication and xor give the same bits as
uint32) because Mosaic has no unsigned vector arithmetic; the same function runs inside the
kernels and in plain XLA (``attn_jax.core.random.keep_mask`` calls it).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

__all__ = ["dropout_keep"]


def _i32(x: int) -> int:
    return x - (1 << 32) if x >= (1 << 31) else x


def _fmix32(h):
    h = h ^ lax.shift_right_logical(h, jnp.int32(16))
    h = h * jnp.int32(_i32(0x85EBCA6B))
    h = h ^ lax.shift_right_logical(h, jnp.int32(13))
    h = h * jnp.int32(_i32(0xC2B2AE35))
    return h ^ lax.shift_right_logical(h, jnp.int32(16))


def dropout_keep(rate: float, seed0, seed1, b, h, i, j):
    """Boolean keep mask for int32 seeds and int32 index arrays (broadcast together):
    ``uniform(seed, b, h, i, j) >= rate``."""
    x = _fmix32(seed0 ^ _fmix32(b * jnp.int32(_i32(0x9E3779B1)) + h + seed1))
    x = _fmix32(x ^ (i * jnp.int32(_i32(0xCC9E2D51))))
    x = _fmix32(x ^ (j * jnp.int32(_i32(0x1B873593))) ^ seed1)
    uniform = lax.shift_right_logical(x, jnp.int32(8)).astype(jnp.float32) * jnp.float32(1.0 / (1 << 24))
    return uniform >= jnp.float32(rate)
