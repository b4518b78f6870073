"""Shared pieces of the catalogue's parity entries (:class:`attn_jax.core.declaration.Parity`).

A mechanism file declares ``Parity(call=...)`` with ``call(impl, inputs, *, causal, segment_ids,
initial_state) -> o`` run on :func:`standard_inputs`; the helpers here build the common calls
(:func:`gated_call` for a gated-engine op with named gate inputs; normalised linear attention's
``normalised_call`` lives beside its op in :mod:`attn_jax.linear.linear_attention`) and derive the states a form needs from the
standard ``h0``.  ``tests/linear/test_catalog.py`` runs every claimed form of every entry against
its reference.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from attn_jax.linear.common import zero_padding

__all__ = ["standard_inputs", "gated_call", "first", "with_normaliser", "feature_state"]


def standard_inputs(key, B=2, T=37, H=4, K=2, Dk=12, Dv=20, dtype=jnp.float32) -> dict:
    """The catalogue's inputs: ``q [B, T, H, Dk]``, ``k [B, T, K, Dk]``, ``v [B, T, K, Dv]``,
    a vector log gate ``log_g [B, T, H, Dk]``, a scalar log gate ``log_g_scalar [B, T, H]``,
    ``beta [B, T, H]`` and a state ``h0 [B, H, Dk, Dv]``."""
    ks = jax.random.split(key, 7)
    return {
        "q": jax.random.normal(ks[0], (B, T, H, Dk), dtype),
        "k": jax.random.normal(ks[1], (B, T, K, Dk), dtype),
        "v": jax.random.normal(ks[2], (B, T, K, Dv), dtype),
        "log_g": -jax.random.uniform(ks[3], (B, T, H, Dk), dtype, 0.01, 1.0),
        "log_g_scalar": -jax.random.uniform(ks[4], (B, T, H), dtype, 0.01, 1.0),
        "beta": jax.random.uniform(ks[5], (B, T, H), dtype, 0.05, 0.95),
        "h0": jax.random.normal(ks[6], (B, H, Dk, Dv), dtype),
    }


def first(out):
    """The output of an op that may return ``(o, state)``."""
    return out[0] if isinstance(out, tuple) else out


def _unit_keys(k, segment_ids=None):
    """Keys over their L2 norm; padding keys are zeroed first (a NaN there must not reach the
    gradient through the normalisation) and stay zero."""
    k = zero_padding(segment_ids, k)
    n = jnp.linalg.norm(k, axis=-1, keepdims=True)
    return k / jnp.where(n == 0, 1.0, n)


def gated_call(fn: Callable, *gate_names: str, normalize_keys: bool = False, **fixed) -> Callable:
    """The parity call of ``fn(q, k, v, *gates, impl=..., ...)`` with the standard inputs named by
    ``gate_names`` as its gates (keys L2-normalised first with ``normalize_keys``)."""

    def call(impl, x, *, causal=True, segment_ids=None, initial_state=None):
        kw = dict(fixed, impl=impl, segment_ids=segment_ids, initial_state=initial_state)
        if not causal:
            kw["causal"] = False
        k = _unit_keys(x["k"], segment_ids) if normalize_keys else x["k"]
        return fn(x["q"], k, x["v"], *(x[g] for g in gate_names), **kw)[0]

    return call


def with_normaliser(h0):
    """A state with a (positive) normaliser column, as the normalised forms carry it."""
    return jnp.concatenate([h0, jnp.abs(h0[..., :1]) + 1.0], axis=-1)


def feature_state(h0, feature_dim: int):
    """A normalised-form state ``[B, H, D', Dv + 1]`` derived deterministically from the standard
    ``h0 [B, H, Dk, Dv]``: ``h0`` itself when ``D' == Dk``, else a fixed projection of it
    (so gradients w.r.t. ``h0`` still check the state path)."""
    Dk = h0.shape[2]
    if feature_dim != Dk:
        P = jax.random.normal(jax.random.key(11), (feature_dim, Dk)).astype(h0.dtype) / Dk ** 0.5
        h0 = jnp.einsum("fd,bhdv->bhfv", P, h0)
    return with_normaliser(h0)
