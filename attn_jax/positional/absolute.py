"""Absolute position embeddings: fixed sinusoids and a learned table.

Sinusoidal: Vaswani, Shazeer, Parmar, Uszkoreit, Jones, Gomez, Kaiser, Polosukhin, "Attention Is
All You Need", 2017, arXiv:1706.03762 (Sec. 3.5)::

    PE[pos, 2i]     = sin(pos / base^(2i / d))
    PE[pos, 2i + 1] = cos(pos / base^(2i / d))          (base = 10000)

with sines and cosines interleaved exactly as written (tensor2tensor / fairseq concatenate
``[sin, cos]`` instead; that is a fixed permutation of the channels).

Learned (GPT-2/BERT style; also in Vaswani et al. Sec. 3.5 as the alternative they compared):
a ``[max_len, dim]`` table whose row ``pos`` is added to the token embedding.
``init_learned_absolute`` draws it from ``N(0, stddev^2)`` (GPT-2 uses 0.02; BERT 0.02 truncated).

Positions beyond the table: when ``positions`` is concrete (eager call), an out-of-range
position raises ``ValueError``.  Under ``jit`` the values are unknown at trace time, so the
lookup clips to ``[0, max_len - 1]`` (XLA gathers never fault); validate positions before
tracing if that matters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

__all__ = ["sinusoidal_embedding", "learned_absolute_embedding", "init_learned_absolute"]


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def sinusoidal_embedding(
    positions: Int[Array, "..."], dim: int, *, base: float = 10000.0
) -> Float[Array, "... dim"]:
    """Sinusoidal embedding (float32 ``[..., dim]``) of integer or real ``positions``."""
    dim = _check_positive_int("dim", dim)
    if dim % 2:
        raise ValueError(f"dim: expected an even int, got {dim}")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not (math.isfinite(base) and base > 1):
        raise ValueError(f"base: expected a finite number > 1, got {base!r}")
    if not hasattr(positions, "dtype"):
        positions = np.asarray(positions)
    dtype = positions.dtype
    if dtype == bool or not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"positions: expected an integer or floating dtype, got {dtype}")
    inv_freq = jnp.asarray(base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim), jnp.float32)
    angles = jnp.asarray(positions).astype(jnp.float32)[..., None] * inv_freq
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*angles.shape[:-1], dim)


def learned_absolute_embedding(
    table: Float[Array, "max_len dim"], positions: Int[Array, "..."]
) -> Float[Array, "... dim"]:
    """Rows ``table[positions]`` (dtype of ``table``); see module docstring for range checks."""
    if not hasattr(table, "shape") or table.ndim != 2:
        got = getattr(table, "shape", type(table).__name__)
        raise ValueError(f"table: expected shape [max_len, dim], got {got}")
    if not jnp.issubdtype(table.dtype, jnp.floating):
        raise TypeError(f"table: expected a floating dtype, got {table.dtype}")
    if not hasattr(positions, "dtype"):
        positions = np.asarray(positions)
    if positions.dtype == bool or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions: expected an integer dtype, got {positions.dtype}")
    max_len = table.shape[0]
    if not isinstance(positions, jax.core.Tracer):
        concrete = np.asarray(positions)
        if concrete.size and (concrete.min() < 0 or concrete.max() >= max_len):
            raise ValueError(
                f"positions: expected values in [0, {max_len - 1}] (table has max_len={max_len} rows), "
                f"got min {concrete.min()}, max {concrete.max()}"
            )
    return jnp.take(table, jnp.asarray(positions), axis=0, mode="clip")


def init_learned_absolute(
    key: Array, max_len: int, dim: int, stddev: float = 0.02, *, dtype=jnp.float32
) -> Float[Array, "max_len dim"]:
    """A ``[max_len, dim]`` table drawn from ``N(0, stddev^2)``."""
    max_len = _check_positive_int("max_len", max_len)
    dim = _check_positive_int("dim", dim)
    return (jax.random.normal(key, (max_len, dim), jnp.float32) * stddev).astype(dtype)


# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="absolute", family="positional", title="Sinusoidal and learned absolute embeddings",
    papers=(Paper("Attention Is All You Need", 2017, "1706.03762", "Vaswani et al."),),
    summary="PE(t, 2i) = sin(t / 10000^{2i/d}), PE(t, 2i+1) = cos(...), or a learned table, added to the embeddings",
    op=sinusoidal_embedding, directions=("causal", "bidirectional")))
