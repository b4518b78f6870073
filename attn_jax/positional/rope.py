"""Rotary position embedding (RoPE) and its context-extension scalings.

Paper: Su, Lu, Pan, Murtadha, Wen, Liu, "RoFormer: Enhanced Transformer with Rotary Position
Embedding", 2021, arXiv:2104.09864 (Sec. 3.2; the elementwise form of Sec. 3.4.2).  For a
vector ``x`` at position ``m`` and the inverse frequencies ``theta_i = base^(-2i/d)``,
``i = 0 .. d/2-1``, each pair of dimensions ``(a_i, b_i)`` is rotated by the angle
``m * theta_i``::

    a_i' = a_i cos(m theta_i) - b_i sin(m theta_i)
    b_i' = b_i cos(m theta_i) + a_i sin(m theta_i)

so that ``<rope(q, m), rope(k, n)>`` depends on ``m - n`` only.  Two pairings are in use:

* ``interleaved=False`` (GPT-NeoX / LLaMA, "rotate half"): ``a_i = x[i]``, ``b_i = x[i + d/2]``.
* ``interleaved=True`` (RoFormer paper / GPT-J): ``a_i = x[2i]``, ``b_i = x[2i + 1]``.

The two are the same map up to a permutation of the head dimensions.  Partial rotary
(``rotary_fraction < 1``, GPT-NeoX / Phi) rotates the first ``rotary_dim = int(D * fraction)``
dimensions and passes the rest through unchanged; ``d`` above is then ``rotary_dim``.

Scalings (:class:`RopeScaling`) change the inverse frequencies, never the positions:

* ``"linear"`` (position interpolation, Chen et al. 2023, arXiv:2306.15595):
  ``theta_i / factor``, identical to using positions ``m / factor``.
* ``"ntk"`` (NTK-aware, bloc97 2023; written up in the YaRN paper as "NTK-aware"
  interpolation): ``base' = base * factor^(d / (d - 2))``.
* ``"yarn"`` (Peng, Quesnelle, Fan, Shippole, "YaRN: Efficient Context Window Extension of
  Large Language Models", 2023, arXiv:2309.00071, "NTK-by-parts" interpolation): with the
  original context length ``L``, the number of rotations ``r_i = L / lambda_i`` of the
  wavelength ``lambda_i = 2 pi / theta_i`` and the ramp ``gamma`` between ``alpha = beta_slow = 1`` and
  ``beta = beta_fast = 32``::

      theta_i' = (1 - gamma_i) * theta_i / factor + gamma_i * theta_i

  dimensions that rotate many times over ``L`` keep their frequency (extrapolation), those
  that rotate less than once are interpolated.  The ramp is evaluated, as in the authors'
  reference code (jquesnelle/yarn) and Hugging Face ``_compute_yarn_parameters``, over the
  pair index: the boundaries ``i(r) = d * ln(L / (2 pi r)) / (2 ln base)`` are rounded
  outwards (``floor`` for ``r = beta_fast``, ``ceil`` for ``r = beta_slow``), clipped to
  ``[0, d - 1]``, and ``gamma_i = 1 - clip((i - low) / (high - low), 0, 1)``.
  YaRN also scales the logits by ``1/t`` with ``sqrt(1/t) = 0.1 ln(factor) + 1`` (its
  attention temperature; :func:`yarn_attention_factor`).  Like Hugging Face,
  :func:`apply_rope` multiplies ``cos`` and ``sin`` by ``sqrt(1/t)``, so applying it to both
  queries and keys scales the logits of the rotated dimensions by ``1/t``.  Deviation named:
  pass-through dimensions of a partial rotary are *not* scaled (same as Hugging Face).

Numerics: angles, ``cos``/``sin`` and the rotation are computed in float32; the result is cast
back to the input dtype.  Positions are converted to float32, so they are exact up to 2^24.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Real

from attn_jax.core.array_types import ArrayLike

__all__ = [
    "RopeScaling",
    "rope_frequencies",
    "yarn_attention_factor",
    "apply_rope",
    "rotate",
    "check_input",
    "positions_for",
]

_SCALING_KINDS = ("linear", "ntk", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Static description of a RoPE context-extension scaling (hashable; safe as a static arg).

    Attributes:
      kind: ``"linear"``, ``"ntk"`` or ``"yarn"``.
      factor: context extension factor ``s = L' / L`` (> 0; ``"ntk"``/``"yarn"`` need >= 1).
      original_max_position: pre-training context length ``L`` (required for ``"yarn"``).
      beta_fast, beta_slow: YaRN ramp boundaries in rotations over ``L`` (paper: 32 and 1).
    """

    kind: str
    factor: float
    original_max_position: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self):
        if self.kind not in _SCALING_KINDS:
            raise ValueError(f"RopeScaling.kind: expected one of {_SCALING_KINDS}, got {self.kind!r}")
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)):
            raise TypeError(f"RopeScaling.factor: expected a Python number, got {type(self.factor).__name__}")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"RopeScaling.factor: expected a finite number > 0, got {self.factor}")
        if self.kind in ("ntk", "yarn") and self.factor < 1:
            raise ValueError(f"RopeScaling.factor: kind={self.kind!r} expects factor >= 1, got {self.factor}")
        if self.kind == "yarn":
            L = self.original_max_position
            if isinstance(L, bool) or not isinstance(L, int) or L <= 0:
                raise ValueError(
                    "RopeScaling.original_max_position: kind='yarn' expects a positive int, " f"got {L!r}"
                )
            if not (self.beta_fast > self.beta_slow > 0):
                raise ValueError(
                    "RopeScaling.beta_fast/beta_slow: expected beta_fast > beta_slow > 0, "
                    f"got beta_fast={self.beta_fast}, beta_slow={self.beta_slow}"
                )


def yarn_attention_factor(factor: float) -> float:
    """YaRN's ``sqrt(1/t) = 0.1 ln(factor) + 1`` (YaRN, arXiv:2309.00071); 1 for ``factor <= 1``."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
        raise TypeError(f"factor: expected a finite Python number, got {factor!r}")
    if factor <= 1.0:
        return 1.0
    return 0.1 * math.log(factor) + 1.0


def _check_rotary_dim(rotary_dim) -> int:
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, (int, np.integer)):
        raise TypeError(f"rotary_dim: expected an int, got {type(rotary_dim).__name__}")
    rotary_dim = int(rotary_dim)
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected a positive even int, got {rotary_dim}")
    return rotary_dim


def _check_base(base) -> float:
    if isinstance(base, bool) or not isinstance(base, (int, float)):
        raise TypeError(f"base: expected a Python number, got {type(base).__name__}")
    if not (math.isfinite(base) and base > 1.0):
        raise ValueError(f"base: expected a finite number > 1, got {base}")
    return float(base)


def _yarn_inv_freq(inv_freq: np.ndarray, rotary_dim: int, base: float, s: RopeScaling) -> np.ndarray:
    L = s.original_max_position

    def pair_index(num_rotations: float) -> float:
        # Pair index i whose wavelength 2*pi*base^(2i/d) fits num_rotations times into L.
        return rotary_dim * math.log(L / (num_rotations * 2.0 * math.pi)) / (2.0 * math.log(base))

    low = max(math.floor(pair_index(s.beta_fast)), 0)
    high = min(math.ceil(pair_index(s.beta_slow)), rotary_dim - 1)
    if low == high:
        high += 0.001  # degenerate ramp: a step at `low` (same guard as the reference code)
    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # gamma in the paper: 1 keeps the original frequency
    return inv_freq / s.factor * (1.0 - extrapolate) + inv_freq * extrapolate


def rope_frequencies(
    rotary_dim: int, *, base: float = 10000.0, scaling: RopeScaling | None = None
) -> Float[Array, " half"]:
    """Inverse frequencies ``theta_i = base^(-2i/d)`` (float32 ``[rotary_dim // 2]``), scaled.

    Computed in float64 from static arguments, then rounded once to float32.
    """
    rotary_dim = _check_rotary_dim(rotary_dim)
    base = _check_base(base)
    if scaling is not None and not isinstance(scaling, RopeScaling):
        raise TypeError(f"scaling: expected RopeScaling or None, got {type(scaling).__name__}")
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    if scaling is not None and scaling.kind == "ntk":
        if rotary_dim == 2:
            raise ValueError("rotary_dim: kind='ntk' needs rotary_dim > 2 (exponent d/(d-2)), got 2")
        base = base * scaling.factor ** (rotary_dim / (rotary_dim - 2))
    inv_freq = base ** (-exponents)
    if scaling is not None and scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling is not None and scaling.kind == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, rotary_dim, base, scaling)
    return jnp.asarray(inv_freq, dtype=jnp.float32)


def rotate(x: Float[Array, "... d"], cos, sin, *, interleaved: bool) -> Float[Array, "... d"]:
    """Rotate the ``d/2`` pairs of ``x`` by angles given as ``cos``/``sin`` (``[..., d/2]``).

    ``cos``/``sin`` may carry a common per-pair factor (YaRN's attention factor, xPos' scale).
    Shared by :func:`apply_rope` and :mod:`attn_jax.positional.xpos`; computes in the dtype
    it is given.
    """
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1)
        return out.reshape(x.shape)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def check_input(x, name: str = "x"):
    """Validate a ``[B, T, H, D]`` floating array; returns it as a JAX array."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an array [B, T, H, D], got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected rank 4 [B, T, H, D], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    return jnp.asarray(x)


def positions_for(positions, batch: int, length: int) -> Float[Array, "#B T"]:
    """Validate ``positions`` (``[T]``, ``[B, T]`` or ``None``) and return float32 ``[B|1, T]``."""
    if positions is None:
        return jnp.arange(length, dtype=jnp.float32)[None, :]
    if not hasattr(positions, "shape"):
        positions = np.asarray(positions)
    dtype = positions.dtype
    if dtype == bool or not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"positions: expected an integer (or floating) dtype, got {dtype}")
    shape = tuple(positions.shape)
    if shape == (length,):
        return jnp.asarray(positions).astype(jnp.float32)[None, :]
    if len(shape) == 2 and shape[1] == length and shape[0] in (batch, 1):
        return jnp.asarray(positions).astype(jnp.float32)
    raise ValueError(
        f"positions: expected shape [T]=({length},) or [B, T]=({batch}, {length}), got {shape}"
    )


def apply_rope(
    x: Float[ArrayLike, "B T H D"],
    positions: Real[ArrayLike, "#B T"] | Real[ArrayLike, " T"] | None = None,
    *,
    base: float = 10000.0,
    rotary_fraction: float = 1.0,
    interleaved: bool = False,
    scaling: RopeScaling | None = None,
) -> Float[Array, "B T H D"]:
    """Apply rotary position embedding to queries or keys ``x: [B, T, H, D]``.

    Args:
      x: queries or keys, any floating dtype (computed in float32, returned in ``x.dtype``).
      positions: absolute positions ``[T]`` or ``[B, T]`` (e.g. restarting per packed
        document, or offset by the cache length when decoding); default ``arange(T)``.
      base: frequency base (10000 in the paper).
      rotary_fraction: fraction of ``D`` that is rotated; ``int(D * rotary_fraction)`` must be
        a positive even number.  The remaining dimensions pass through unchanged.
      interleaved: pair adjacent dims ``(x[2i], x[2i+1])`` instead of ``(x[i], x[i + d/2])``.
      scaling: optional :class:`RopeScaling` (linear / NTK / YaRN).
    """
    x = check_input(x)
    B, T, _, D = x.shape
    if isinstance(rotary_fraction, bool) or not isinstance(rotary_fraction, (int, float)):
        raise TypeError(f"rotary_fraction: expected a Python float, got {type(rotary_fraction).__name__}")
    if not 0.0 < rotary_fraction <= 1.0:
        raise ValueError(f"rotary_fraction: expected 0 < rotary_fraction <= 1, got {rotary_fraction}")
    rotary_dim = int(D * rotary_fraction)
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(
            f"rotary_fraction: int(D * rotary_fraction) must be a positive even rotary dim; got "
            f"int({D} * {rotary_fraction}) = {rotary_dim}"
        )
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved: expected a bool, got {type(interleaved).__name__}")
    inv_freq = rope_frequencies(rotary_dim, base=base, scaling=scaling)
    pos = positions_for(positions, B, T)
    angles = pos[:, :, None, None] * inv_freq  # [B|1, T, 1, d/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scaling is not None and scaling.kind == "yarn":
        mscale = yarn_attention_factor(scaling.factor)
        cos, sin = cos * mscale, sin * mscale
    rotated = rotate(x[..., :rotary_dim].astype(jnp.float32), cos, sin, interleaved=interleaved)
    rotated = rotated.astype(x.dtype)
    if rotary_dim == D:
        return rotated
    return jnp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)



# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="rope", family="positional", title="RoPE (half-split / interleaved, partial, linear / NTK / YaRN)",
    papers=(Paper("RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021, "2104.09864", "Su et al."),),
    summary="rotate each pair (x_{2i}, x_{2i+1}) (or halves) of q, k by angle t θ_i, θ_i = base^{-2i/d}",
    op=apply_rope, directions=("causal", "bidirectional")))
