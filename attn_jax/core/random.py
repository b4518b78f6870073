"""Counter-based dropout masks that every implementation reproduces exactly.

Attention dropout drops entries of the probability matrix ``P[b, h, i, j]``; each entry's
keep/drop decision is a pure function of ``(key, b, h, i, j)``, not of the tiling, so a tiled
implementation drops exactly what the reference drops.  The hash itself is defined once, in
:func:`pallas_kernels.dropout.dropout_keep` (the kernels evaluate it inside a tile); this
module derives the seed from a PRNG key and broadcasts index arrays into it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dropout import dropout_keep


def dropout_seed(rng) -> jax.Array:
    """Two uint32 words derived from a PRNG key (typed or raw)."""
    return jax.random.bits(rng, (2,), jnp.uint32)


def keep_mask(seed, rate: float, b_idx, h_idx, q_idx, k_idx):
    """Boolean keep-mask broadcast over the given index arrays.

    ``seed: uint32[2]``; index arrays are integer arrays broadcastable together
    (e.g. ``b[:, None, None, None]``, ``h[None, :, None, None]``,
    ``i[None, None, :, None]``, ``j[None, None, None, :]``).
    """
    i32 = lambda x: jnp.asarray(x).astype(jnp.int32)
    seed = jax.lax.bitcast_convert_type(jnp.asarray(seed, jnp.uint32), jnp.int32)
    return dropout_keep(rate, seed[0], seed[1], i32(b_idx), i32(h_idx), i32(q_idx), i32(k_idx))
