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


LAYOUT_HINT = ("q, k, v are laid out [B, T, H, D] (sequence on axis 1, heads on axis 2, as jax.nn and Flax); "
               "for [B, H, T, D] arrays use jnp.swapaxes(x, 1, 2)")


def _consistent(q, k, v) -> bool:
    """Whether ``[B, T, H, Dk], [B, S, K, Dk], [B, S, K, Dv]`` shapes agree (ignoring dtypes)."""
    (B, T, H, Dk), (Bk, S, K, Dk2), (Bv, Sv, Kv, _) = q, k, v
    return B == Bk == Bv and S == Sv and K == Kv and Dk == Dk2 and K > 0 and H % K == 0


def _layout_error(msg: str, q, k, v) -> ValueError:
    """A shape error that states the expected layout, and says so when the shapes look swapped."""
    shapes = [tuple(np.shape(x)) for x in (q, k, v)]
    swapped = [(s[0], s[2], s[1], s[3]) for s in shapes]
    if _consistent(*swapped):
        msg += (f". These shapes fit the [B, H, T, D] layout: q {list(shapes[0])} read as [B, T, H, D] "
                "has its heads and sequence axes swapped")
    return ValueError(f"{msg}. {LAYOUT_HINT}")


def check_qkv(q, k, v) -> AttentionDims:
    """Validate ``q: [B, T, H, Dk]``, ``k: [B, S, K, Dk]``, ``v: [B, S, K, Dv]``.

    Every shape error states the expected ``[B, T, H, D]`` layout, and points out a
    likely ``[B, H, T, D]`` mix-up when swapping axes 1 and 2 would make the shapes agree.
    """
    for name, x, layout in (("q", q, "[B, T, H, Dk]"), ("k", k, "[B, S, K, Dk]"), ("v", v, "[B, S, K, Dv]")):
        check_float_array(name, x)
        check_rank(name, x, 4, layout)
    B, T, H, Dk = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise _layout_error(f"batch size mismatch: q has B={B}, k has B={k.shape[0]}, v has B={v.shape[0]}", q, k, v)
    S, K = k.shape[1], k.shape[2]
    if v.shape[1] != S:
        raise _layout_error(f"sequence length mismatch: k has S={S}, v has S={v.shape[1]}", q, k, v)
    if v.shape[2] != K:
        raise _layout_error(f"kv heads mismatch: k has K={K} heads, v has {v.shape[2]}", q, k, v)
    if k.shape[3] != Dk:
        raise _layout_error(f"head_dim mismatch: q has Dk={Dk}, k has Dk={k.shape[3]} (shape {shape_str(k)})",
                            q, k, v)
    if K == 0 or H % K != 0:
        raise _layout_error(f"q heads H={H} must be a multiple of k/v heads K={K} (GQA groups)", q, k, v)
    if min(B, T, S, H, Dk, v.shape[3]) == 0:
        raise ValueError(f"empty dimension: q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    return AttentionDims(B=B, T=T, S=S, H=H, K=K, Dk=Dk, Dv=v.shape[3])


def check_no_unexpected_kwargs(fn: str, unexpected: dict, valid) -> None:
    """Raise ``TypeError`` for keyword arguments ``fn`` does not take, pointing to what it does take.

    Names from other attention APIs (jax.nn, Flax) get a pointer to the attn_jax spelling.
    """
    if not unexpected:
        return
    hints = {
        "is_causal": "use mask=attn_jax.masks.causal() (bottom-right aligned when T != S; "
                     "masks.causal(offset=0) is jax.nn's top-left alignment), or attn_jax.dot_product_attention "
                     "for jax.nn's exact signature",
        "implementation": "attn_jax.attention selects implementations with impl= "
                          "('auto', 'reference', 'xla', 'pallas', 'cudnn'); attn_jax.dot_product_attention takes "
                          "jax.nn's implementation=",
        "query_seq_lengths": "use attn_jax.dot_product_attention, or mask=attn_jax.masks.key_padding(lengths) "
                             "for key lengths",
        "key_value_seq_lengths": "use mask=attn_jax.masks.key_padding(lengths), or attn_jax.dot_product_attention",
        "local_window_size": "use mask=attn_jax.masks.sliding_window(left, right), or "
                             "attn_jax.dot_product_attention",
        "deterministic": "attn_jax.attention applies dropout iff dropout_rate > 0; pass dropout_rate=0.0 for "
                         "deterministic attention, or use attn_jax.flax.attention_fn() for Flax's signature",
        "broadcast_dropout": "use attn_jax.flax.attention_fn() for Flax's signature",
    }
    name = sorted(unexpected)[0]
    hint = hints.get(name, "valid keyword arguments: " + ", ".join(valid))
    raise TypeError(f"{fn}() got an unexpected keyword argument {name!r}: {hint}")


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


def int_rows(name: str, x, B: int):
    """``x`` as int32 ``[B]`` (a scalar is broadcast); errors name ``name``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer array of shape [B], got dtype {x.dtype}")
    if x.ndim == 0:
        x = jnp.broadcast_to(x, (B,))
    if x.shape != (B,):
        raise ValueError(f"{name}: expected shape [{B}] (or a scalar), got {shape_str(x)}")
    return x.astype(jnp.int32)
