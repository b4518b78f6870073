"""Numerical helpers shared by several families and layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["l2_normalize"]


def l2_normalize(x, eps: float = 1e-6):
    """``x / sqrt(sum(x²) + eps)`` over the last axis, computed in float32, returned in ``x``'s dtype."""
    xf = jnp.asarray(x).astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
