"""Shared machinery of the linear / recurrent attention family: validation, the problem
record the dispatch registries read, packed-segment layout, GQA expansion.

Conventions (the recurrent family of the functional API): ``q: [B, T, H, Dk]``,
``k: [B, T, K, Dk]``, ``v: [B, T, K, Dv]``
with ``H % K == 0`` (k/v heads are shared by ``H // K`` query heads); gates are log-space
float arrays ``[B, T, H]`` (one decay per head) or ``[B, T, H, Dk]`` (one per key channel);
states are float32 ``[B, H, Dk, Dv]``.

Packed sequences: ``segment_ids: int [B, T]``, id 0 = padding, ids ``>= 0`` (negative ids are
refused, as by ``masks.segments``: :func:`attn_jax.core.checks.check_segment_ids`).  Padding is
*transparent*: a padding token writes nothing to the state, does not decay it and outputs zero,
and whatever it holds (NaN, +-Inf) reaches no output or gradient: ops zero padding inputs
*before* any nonlinearity (a feature map), since ``0 * f'(NaN)`` is NaN.  A
document starts at a token whose id is non-zero and differs from the id of the last
non-padding token before it; the state resets (to zero) there.  ``initial_state`` is the
state before the first token, so it belongs to the first document of each row.
"""

from __future__ import annotations

from typing import Any

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from attn_jax.core import checks
from attn_jax.core.validation import check_float_array, check_qkv, shape_str

__all__ = ["RecurrentProblem", "RecurrentCall", "compute_dtype", "init_state", "finish", "fixed_decay_log_gates",
           "validate", "SegmentLayout", "segment_layout", "zero_padding", "expand_kv_heads", "default_scale",
           "segmented_cumsum", "segmented_cumlogsumexp"]


@dataclass(frozen=True)
class RecurrentProblem:
    """Static description of a recurrent-family call (what ``unsupported()`` reasons read)."""

    mechanism: str
    B: int
    T: int
    H: int
    K: int
    Dk: int
    Dv: int
    dtype: str
    gate: str            # "none" | "scalar" | "vector"
    causal: bool
    segments: bool
    initial_state: bool


@dataclass(frozen=True)
class RecurrentCall:
    """What an implementation of a recurrent-family registry needs besides the arrays (static)."""

    problem: RecurrentProblem
    scale: float
    chunk_size: int
    return_final_state: bool


def compute_dtype(p: RecurrentProblem):
    """float32 (float64 inputs stay float64 so the tight float64 tests mean something)."""
    return jnp.float64 if p.dtype == "float64" else jnp.float32


def init_state(call: RecurrentCall, h0):
    """``h0`` in the compute dtype, or zeros ``[B, H, Dk, Dv]``."""
    p = call.problem
    dt = compute_dtype(p)
    return jnp.zeros((p.B, p.H, p.Dk, p.Dv), dt) if h0 is None else h0.astype(dt)


def finish(call: RecurrentCall, o, lay: "SegmentLayout", state):
    """Zero the outputs of padding tokens, cast to the input dtype, drop the state unless asked."""
    o = jnp.where(lay.valid[:, :, None, None], o, 0.0).astype(call.problem.dtype)
    return o, (state if call.return_final_state else None)


def fixed_decay_log_gates(decays, q, name: str = "decays"):
    """Per-head constant decays ``[H]`` in ``(0, 1]`` -> log gates ``[B, T, H]`` (q's precision)."""
    B, T, H = q.shape[:3]
    lam = jnp.asarray(decays, jnp.promote_types(q.dtype, jnp.float32))
    if lam.shape != (H,):
        raise ValueError(f"{name}: expected shape [H] = [{H}], got {list(lam.shape)}")
    return jnp.broadcast_to(jnp.log(lam), (B, T, H))


def default_scale(scale, Dk: int) -> float:
    if scale is None:
        return Dk ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale: expected a positive Python float or None, got {scale!r}")
    return float(scale)


def check_segment_ids(segment_ids, B: int, T: int) -> None:
    """``segment_ids`` (if given) must be an integer array ``[B, T]``; errors name the argument."""
    if segment_ids is None:
        return
    if not jnp.issubdtype(getattr(segment_ids, "dtype", jnp.float32), jnp.integer):
        raise TypeError(f"segment_ids: expected an integer array [B, T], got "
                        f"{getattr(segment_ids, 'dtype', type(segment_ids))}")
    if getattr(segment_ids, "shape", None) != (B, T):
        raise ValueError(f"segment_ids: expected shape [B, T] = {[B, T]}, got {shape_str(segment_ids)}")
    checks.check_segment_ids("segment_ids", segment_ids)   # ids >= 0, as masks.segments


def validate(mechanism: str, q, k, v, gate=None, *, gate_name: str = "log_g", allow_vector_gate: bool = True,
             initial_state=None, segment_ids=None, causal: bool = True) -> RecurrentProblem:
    """Check shapes and dtypes; errors name the argument.  ``gate`` may be None."""
    dims = check_qkv(q, k, v)
    if dims.S != dims.T:
        raise ValueError(f"k: recurrent mechanisms mix a sequence with itself; expected S == T = {dims.T}, "
                         f"got k with S={dims.S} (shape {shape_str(k)})")
    B, T, H = dims.B, dims.T, dims.H
    kind = "none"
    if gate is not None:
        check_float_array(gate_name, gate)
        if gate.shape == (B, T, H):
            kind = "scalar"
        elif allow_vector_gate and gate.shape == (B, T, H, dims.Dk):
            kind = "vector"
        else:
            want = "[B, T, H]" + (" or [B, T, H, Dk]" if allow_vector_gate else "")
            raise ValueError(f"{gate_name}: expected shape {want} = {[B, T, H]}"
                             + (f" or {[B, T, H, dims.Dk]}" if allow_vector_gate else "")
                             + f", got {shape_str(gate)}")
        if not causal:
            raise ValueError(f"{gate_name}: decay gates are only defined for causal=True (a decay needs an order)")
    if initial_state is not None:
        check_float_array("initial_state", initial_state)
        if initial_state.shape != (B, H, dims.Dk, dims.Dv):
            raise ValueError(f"initial_state: expected shape [B, H, Dk, Dv] = {[B, H, dims.Dk, dims.Dv]}, "
                             f"got {shape_str(initial_state)}")
        if not causal:
            raise ValueError("initial_state: only defined for causal=True")
    check_segment_ids(segment_ids, B, T)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    return RecurrentProblem(mechanism, B, T, H, dims.K, dims.Dk, dims.Dv, jnp.dtype(q.dtype).name, kind, causal,
                            segment_ids is not None, initial_state is not None)


def zero_padding(segment_ids, *xs):
    """``xs`` (arrays ``[B, T, ...]``) with every padding token (``segment_ids == 0``) set to zero;
    unchanged without ``segment_ids`` (or when its shape is not ``[B, T]``: validation reports it).

    Call it on the raw inputs *before* a feature map or any other nonlinearity: masking after
    ``φ`` leaves ``0 * φ'(NaN) = NaN`` in the gradient of a padding token that holds NaN."""
    if segment_ids is None:
        return xs if len(xs) != 1 else xs[0]
    out = []
    for x in xs:
        if getattr(segment_ids, "shape", None) != tuple(x.shape[:2]):
            out.append(x)
            continue
        valid = (jnp.asarray(segment_ids) != 0).reshape(tuple(x.shape[:2]) + (1,) * (x.ndim - 2))
        out.append(jnp.where(valid, x, jnp.zeros((), x.dtype)))
    return tuple(out) if len(out) != 1 else out[0]


def expand_kv_heads(x, H: int):
    """``[B, T, K, D] -> [B, T, H, D]`` by repeating each k/v head for its ``H // K`` query heads."""
    K = x.shape[2]
    return x if K == H else jnp.repeat(x, H // K, axis=2)


@dataclass(frozen=True)
class SegmentLayout:
    valid: Any          # bool [B, T]: non-padding tokens
    reset: Any          # bool [B, T]: the state is zeroed before this token is written
    doc: Any            # int32 [B, T]: cumulative number of resets (monotone document index)


def segment_layout(segment_ids, B: int, T: int) -> SegmentLayout:
    if segment_ids is None:
        ones = jnp.ones((B, T), bool)
        return SegmentLayout(ones, jnp.zeros((B, T), bool), jnp.zeros((B, T), jnp.int32))
    seg = jnp.asarray(segment_ids).astype(jnp.int32)
    valid = seg != 0
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    last_valid = lax.cummax(jnp.where(valid, idx, -1), axis=1)               # last valid index <= t
    before = jnp.concatenate([jnp.full((B, 1), -1, jnp.int32), last_valid[:, :-1]], axis=1)  # < t
    prev_seg = jnp.take_along_axis(seg, jnp.maximum(before, 0), axis=1)
    reset = valid & (before >= 0) & (prev_seg != seg)
    doc = jnp.cumsum(reset.astype(jnp.int32), axis=1)
    return SegmentLayout(valid, reset, doc)


def _segmented_scan(op, x, reset):
    """Inclusive scan of ``op`` along axis 1 of ``x`` (``[B, T, ...]``) restarting where ``reset``."""
    f = reset.reshape(reset.shape + (1,) * (x.ndim - 2))

    def combine(a, b):
        fa, xa = a
        fb, xb = b
        return fa | fb, jnp.where(fb, xb, op(xa, xb))

    return lax.associative_scan(combine, (jnp.broadcast_to(f, x.shape), x), axis=1)[1]


def segmented_cumsum(x, lay: SegmentLayout):
    """Per-document inclusive cumulative sum along axis 1 of ``x: [B, T, ...]`` (restarts at
    ``lay.reset``).  Padding is transparent only if the caller zeroes it."""
    return _segmented_scan(jnp.add, x, lay.reset)


def segmented_cumlogsumexp(x, lay: SegmentLayout):
    """Per-document inclusive running log-sum-exp along axis 1 of ``x: [B, T, ...]`` (restarts at
    ``lay.reset``).  Padding is transparent only if the caller sets it to ``-inf``."""
    return _segmented_scan(jnp.logaddexp, x, lay.reset)
