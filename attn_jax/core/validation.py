"""Trace-time input validation with messages that name the argument.

Every check raises ``ValueError`` (bad shape or value) or ``TypeError`` (bad
dtype or type) whose message names the argument and states what was expected
and what was received.  Checks only look at static information (shapes,
dtypes, Python scalars), so they run at trace time under ``jit``.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def shape_str(x) -> str:
    return "[" + ", ".join(str(d) for d in np.shape(x)) + "]"


def check_float_array(name: str, x) -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name}: expected a floating-point array, got {type(x).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point dtype (float32, bfloat16, float16), got {dtype}")


def check_rank(name: str, x, rank: int, layout: str) -> None:
    if np.ndim(x) != rank:
        raise ValueError(f"{name}: expected rank {rank} {layout}, got rank {np.ndim(x)} with shape {shape_str(x)}")


@dataclass(frozen=True)
class AttentionDims:
    B: int
    T: int
    S: int
    H: int
    K: int
    Dk: int
    Dv: int

    @property
    def groups(self) -> int:
        return self.H // self.K


def check_qkv(q, k, v) -> AttentionDims:
    """Validate ``q: [B, T, H, Dk]``, ``k: [B, S, K, Dk]``, ``v: [B, S, K, Dv]``."""
    for name, x, layout in (("q", q, "[B, T, H, Dk]"), ("k", k, "[B, S, K, Dk]"), ("v", v, "[B, S, K, Dv]")):
        check_float_array(name, x)
        check_rank(name, x, 4, layout)
    B, T, H, Dk = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch size mismatch: q has B={B}, k has B={k.shape[0]}, v has B={v.shape[0]}")
    S, K = k.shape[1], k.shape[2]
    if v.shape[1] != S:
        raise ValueError(f"sequence length mismatch: k has S={S}, v has S={v.shape[1]}")
    if v.shape[2] != K:
        raise ValueError(f"kv heads mismatch: k has K={K} heads, v has {v.shape[2]}")
    if k.shape[3] != Dk:
        raise ValueError(f"head_dim mismatch: q has Dk={Dk}, k has Dk={k.shape[3]} (shape {shape_str(k)})")
    if K == 0 or H % K != 0:
        raise ValueError(f"q heads H={H} must be a multiple of k/v heads K={K} (GQA groups)")
    if min(B, T, S, H, Dk, v.shape[3]) == 0:
        raise ValueError(f"empty dimension: q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    return AttentionDims(B=B, T=T, S=S, H=H, K=K, Dk=Dk, Dv=v.shape[3])


def check_broadcastable(name: str, x, target: tuple[int, ...], layout: str) -> None:
    shape = np.shape(x)
    ok = len(shape) == len(target) and all(s in (1, t) for s, t in zip(shape, target))
    if not ok:
        raise ValueError(f"{name}: expected shape broadcastable to {layout} = {list(target)}, got {shape_str(x)}")


def check_positive_scalar(name: str, x, *, allow_none: bool = True) -> None:
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
        if hasattr(x, "shape") and np.shape(x) == ():
            return  # traced scalar: value cannot be checked at trace time
        raise TypeError(f"{name}: expected a positive Python number, got {type(x).__name__}")
    if not x > 0:
        raise ValueError(f"{name}: expected a value > 0, got {x}")


def check_dropout(rate, rng) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)):
        raise TypeError(f"dropout_rate: expected a Python float in [0, 1), got {type(rate).__name__}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate: expected a value in [0, 1), got {rate}")
    if rate > 0 and rng is None:
        raise ValueError("dropout_rng: a PRNG key is required when dropout_rate > 0 (randomness is explicit)")


def check_sinks(sinks, H: int) -> None:
    if sinks is None:
        return
    check_float_array("sinks", sinks)
    if np.shape(sinks) != (H,):
        raise ValueError(f"sinks: expected shape [H] = [{H}] (one logit per query head), got {shape_str(sinks)}")
