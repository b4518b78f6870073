"""xPos: RoPE with an exponential per-dimension decay (length-extrapolatable rotary).

Paper: Sun, Dong, Patra, Ma, Huang, Benhaim, Chaudhary, Song, Wei, "A Length-Extrapolatable
Transformer", 2022, arXiv:2212.10554 (the xPos rotary embedding).  With the RoPE rotation
``R_n`` of position ``n`` (see :mod:`attn_jax.positional.rope`) and, for the pair index
``i = 0 .. d/2-1``::

    zeta_i = (i / (d/2) + gamma) / (1 + gamma)            (gamma = 0.4)
    q_n' = zeta^( n / scale_base) * R_n q_n                (scale_base = 512)
    k_m' = zeta^(-m / scale_base) * R_m k_m

so ``<q_n', k_m'> = sum_i zeta_i^((n - m) / scale_base) * (rotated pair products)``: a function
of ``n - m`` only, decaying with distance for ``n > m`` because ``zeta_i < 1``.  The factor
multiplies both dimensions of a pair (i.e. ``cos`` and ``sin``), as in the reference code
(microsoft/torchscale ``torchscale/component/xpos_relative_position.py``, which builds
``zeta = (2i + 0.4 d) / (1.4 d)``; the same thing).

Differences from torchscale, named:

* torchscale pairs adjacent dimensions (``rotate_every_two``); here the default is the
  half-split pairing like :func:`apply_rope` — pass ``interleaved=True`` for torchscale's.
* torchscale centres the exponent around the middle of the sequence (``n - L/2``) to keep
  ``zeta^(+-n/scale_base)`` inside the float range.  Here the exponent uses the positions as
  given.  Because the product depends on ``n - m`` only, callers with very long sequences can
  pass positions shifted by the same constant for queries and keys (e.g. ``pos - T // 2``)
  without changing any logit (up to rounding).  With gamma = 0.4 and scale_base = 512,
  unshifted positions stay finite in float32 up to roughly 35k tokens.

Numerics: computed in float32, returned in the input dtype.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attn_jax.positional.rope import check_input, positions_for, rope_frequencies, rotate

__all__ = ["apply_xpos", "xpos_scale"]


def xpos_scale(dim: int, *, gamma: float = 0.4) -> Float[Array, " half"]:
    """Per-pair base ``zeta_i = (i/(d/2) + gamma) / (1 + gamma)``, float32 ``[dim // 2]``."""
    half = dim // 2
    return (jnp.arange(half, dtype=jnp.float32) / half + gamma) / (1.0 + gamma)


def apply_xpos(
    x: Float[Array, "B T H D"],
    positions: Int[Array, "B T"] | Int[Array, " T"] | None = None,
    *,
    is_key: bool,
    base: float = 10000.0,
    scale_base: float = 512.0,
    gamma: float = 0.4,
    interleaved: bool = False,
) -> Float[Array, "B T H D"]:
    """Apply xPos to queries (``is_key=False``) or keys (``is_key=True``) ``x: [B, T, H, D]``.

    Args:
      x: queries or keys; ``D`` must be even (all dimensions are rotated).
      positions: ``[T]`` or ``[B, T]`` absolute positions; default ``arange(T)``.
      is_key: keys get ``zeta^(-n/scale_base)``, queries ``zeta^(+n/scale_base)``.
      base: RoPE frequency base.
      scale_base: the decay's length scale (512 in the paper).
      gamma: the decay offset (0.4 in the paper); ``gamma -> inf`` recovers plain RoPE.
      interleaved: pairing convention, as in :func:`attn_jax.positional.apply_rope`.
    """
    x = check_input(x)
    B, T, _, D = x.shape
    if not isinstance(is_key, bool):
        raise TypeError(f"is_key: expected a bool, got {type(is_key).__name__}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved: expected a bool, got {type(interleaved).__name__}")
    if D % 2:
        raise ValueError(f"x: xPos rotates all of D, which must be even; got shape {tuple(x.shape)}")
    for name, value in (("scale_base", scale_base), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a Python number, got {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    inv_freq = rope_frequencies(D, base=base)
    pos = positions_for(positions, B, T)[:, :, None, None]  # [B|1, T, 1, 1]
    angles = pos * inv_freq
    exponent = (-pos if is_key else pos) / scale_base
    factor = jnp.exp(exponent * jnp.log(xpos_scale(D, gamma=gamma)))  # zeta ** exponent
    cos, sin = jnp.cos(angles) * factor, jnp.sin(angles) * factor
    return rotate(x.astype(jnp.float32), cos, sin, interleaved=interleaved).astype(x.dtype)


# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="xpos", family="positional", title="xPos",
    papers=(Paper("A Length-Extrapolatable Transformer", 2022, "2212.10554", "Sun et al."),),
    summary="RoPE with q scaled by ζ^{t/γ} and k by ζ^{-t/γ} per frequency", op=apply_xpos,
    directions=("causal", "bidirectional")))
