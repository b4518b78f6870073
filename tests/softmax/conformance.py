"""Conformance base for exact attention: every backend of ``attn_jax.softmax.ATTENTION``, one matrix.

A *case* is one point of the feature matrix (masks and their ``&``/``|`` compositions, bias
shapes, ALiBi/T5, softcap, sinks, dropout, GQA/MQA, ``T != S``, ``T = 1``, odd sizes, fully
masked rows, NaN in padding, dtypes).  A *runner* says how one registered backend runs on this
CPU machine (the Pallas kernels twice: GPU and TPU interpret mode; cuDNN cannot run here, so only
its declared refusals are checked).  For every (case, runner):

* if the backend's ``unsupported(platform, problem)`` lists reasons, calling it must raise
  ``ValueError`` naming every one of them;
* otherwise values (``o``, ``lse``) and all gradients (``dq, dk, dv, dbias, dsinks`` and the
  leaves of structured biases, random cotangents) must match the **float64** reference within
  the tolerance of the case's dtype (:data:`attn_jax.core.testing.TOLERANCES`), fully masked
  rows must give exactly zero output and zero, finite gradients, and NaN / +-Inf placed in every
  position that no (query, key) pair uses (``nan_padding`` cases: padding, fully masked rows,
  keys no query sees, keys only the block padding past ``T`` would see) must not reach any
  output or gradient.

Each (case, runner) is one compiled program (forward + VJP); the float64 reference of a case is
computed once and shared by every runner.  Inputs are drawn with NumPy (no XLA program).

``python -m tests.softmax.conformance --table`` prints the pass/refuse table (cases x runners)
that BUILD.md carries.  A new backend registers in ``ATTENTION`` and adds a line to
:data:`RUNNERS`; ``test_every_backend_has_a_runner`` fails until it does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import testing as tk
from attn_jax.positional.alibi import ALiBi, alibi_slopes
from attn_jax.positional.t5 import T5RelativeBias
from attn_jax.softmax import ATTENTION
from attn_jax.softmax import pallas as P
from attn_jax.softmax import xla as X

# ----------------------------------------------------------------------------- runners


@dataclasses.dataclass(frozen=True)
class Runner:
    """How one registered backend runs here.

    ``platform``: the lowering platform whose ``unsupported`` reasons apply.  ``fn(q, k, v, **kw)``
    has the keyword signature of ``aj.attention`` (without ``impl``).  ``runnable()`` is False where
    the backend cannot execute on this machine (then only its refusals are checked);
    ``environment`` lists reason prefixes that describe this machine rather than the problem
    (the table marks cases refused only for those as ``env``).  ``context`` wraps every
    execution (the TPU race detector).
    """

    name: str
    backend: str
    platform: str
    fn: Callable
    runnable: Callable[[], bool] = lambda: True
    environment: tuple[str, ...] = ()
    context: Callable = contextlib.nullcontext


#: Small tiles, so every case runs several tiles with ragged edges (Triton tiles must be >= 16).
XLA_BLOCKS = dict(block_q=16, block_k=32)
PALLAS_BLOCKS = dict(block_q=16, block_k=16)


def _pallas(platform):
    return lambda q, k, v, **kw: P.flash_attention(q, k, v, platform=platform, interpret=True, **PALLAS_BLOCKS,
                                                   **kw)


@contextlib.contextmanager
def _tpu_races():
    from pallas_kernels.testing import tpu_race_check

    with tpu_race_check() as races:
        yield
    if races.races_found:
        raise AssertionError("TPU interpret mode detected a data race")
    if not races.states:
        raise AssertionError("TPU race detection did not run")


def _registry(name):
    return lambda q, k, v, **kw: aj.attention(q, k, v, impl=name, **kw)


RUNNERS: tuple[Runner, ...] = (
    Runner("reference", "reference", "cpu", _registry("reference")),
    Runner("xla", "xla", "cpu", lambda q, k, v, **kw: X.attention_blockwise(q, k, v, **XLA_BLOCKS, **kw)),
    Runner("dense", "dense", "cpu", _registry("dense")),
    Runner("pallas-gpu", "pallas", "cuda", _pallas("gpu")),
    Runner("pallas-tpu", "pallas", "tpu", _pallas("tpu"), context=_tpu_races),
    Runner("cudnn", "cudnn", "cuda", _registry("cudnn"), runnable=lambda: jax.default_backend() == "gpu",
           environment=("cuDNN is not installed here",)),
)


def registered_runners() -> list[Runner]:
    """The runners of the backends registered today (a runner may wait for its backend)."""
    names = set(ATTENTION.names())
    return [r for r in RUNNERS if r.backend in names]


def backends_without_runner() -> list[str]:
    have = {r.backend for r in RUNNERS}
    return [n for n in ATTENTION.names() if n not in have]


# ----------------------------------------------------------------------------- cases


def _segment_ids(rng, B, T, max_segments=3, pad_fraction=0.3):
    """Packed ids ``int32 [B, T]``: runs 1..n, trailing zeros as padding (at least one padded row)."""
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        n_real = T - int(rng.integers(1, max(int(T * pad_fraction), 1) + 1))
        cuts = np.sort(rng.choice(np.arange(1, n_real), size=max_segments - 1, replace=False))
        for s, (a, e) in enumerate(zip([0, *cuts], [*cuts, n_real])):
            ids[b, a:e] = s + 1
    return ids


def _segments(rng, B, T, S, H):
    return masks.segments(jnp.asarray(_segment_ids(rng, B, T)))


def _segments_cross(rng, B, T, S, H):
    return masks.segments(jnp.asarray(_segment_ids(rng, B, T, 2)), jnp.asarray(_segment_ids(rng, B, S, 2)))


def _segments_mid_padding(rng, B, T, S, H):
    ids = _segment_ids(rng, B, T)
    ids[-1, 5:9] = 0  # padding inside a row as well as at its end
    return masks.segments(jnp.asarray(ids))


def _segments_unused_keys(rng, B, T, S, H):
    """Every query in document 1; the keys of the second half in document 2: no query sees them."""
    kv = np.ones((B, S), np.int32)
    kv[:, S // 2:] = 2
    return masks.segments(jnp.ones((B, T), jnp.int32), jnp.asarray(kv))


#: The largest window bound a mask accepts (positions are int32): "unbounded" on that side.
UNBOUNDED = 2 ** 31 - 1


def _dense_rows(rng, B, T, S, H):
    m = rng.random((B, 1, T, S)) < 0.3
    m[:, :, 5] = False                 # a fully masked row in every batch row
    m[-1, :, T // 2:T // 2 + 6] = False
    return masks.dense(jnp.asarray(m))


def _dense_heads(rng, B, T, S, H):
    return masks.dense(jnp.asarray(rng.random((1, H, T, S)) < 0.5))


@dataclasses.dataclass(frozen=True)
class Case:
    """One point of the feature matrix; every field is static so the case is hashable."""

    name: str
    B: int = 2
    T: int = 40
    S: int = 56
    H: int = 4
    K: int = 2
    Dk: int = 16
    Dv: int | None = None
    dtype: str = "float32"
    mask: Callable | None = None      # (rng, B, T, S, H) -> mask
    bias: str | None = None           # "B H T S"-style dense shape, "alibi", "alibi_steep" or "t5"
    scale: float | None = None
    softcap: float | None = None
    sinks: str | None = None          # "random" | "zeros" | "ones"
    dropout_rate: float = 0.0
    q_gain: float = 1.0               # large logits so a softcap bites
    nan_padding: bool = False         # NaN/+-Inf in every q/k/v position that no (query, key) pair uses
    return_lse: bool = True
    seed: int = 0

    @property
    def dims(self):
        return self.B, self.T, self.S, self.H, self.K, self.Dk, self.Dv or self.Dk


def _c(name, **kw):
    return Case(name, **kw)


_causal = lambda *a: masks.causal()  # noqa: E731

CASES: dict[str, Case] = {c.name: c for c in [
    # masks (GQA H=4, K=2 and T < S unless said otherwise; bottom-right alignment)
    _c("no_mask"),
    _c("causal", mask=_causal),
    _c("causal_t_gt_s", T=56, S=40, mask=_causal),          # the first T - S rows see no key
    _c("causal_offset", mask=lambda *a: masks.causal(offset=3)),
    _c("causal_per_row_offset", T=8, S=60, mask=lambda *a: masks.causal(offset=jnp.array([10, 52]))),
    _c("window_left", mask=lambda *a: masks.sliding_window(7)),
    _c("window_left_right", mask=lambda *a: masks.sliding_window(5, 9)),
    _c("chunked", mask=lambda *a: masks.chunked(12)),
    _c("chunked_and_causal", mask=lambda *a: masks.chunked(12) & masks.causal()),
    _c("prefix_lm", mask=lambda *a: masks.prefix_lm(10)),
    _c("causal_and_window", mask=lambda *a: masks.causal() & masks.sliding_window(20)),
    _c("causal_or_window", mask=lambda *a: masks.causal() | masks.sliding_window(0, 4)),
    _c("segments", T=48, S=48, mask=_segments),
    _c("segments_and_causal_nan", T=48, S=48, mask=lambda *a: _segments(*a) & masks.causal(), nan_padding=True),
    _c("segments_cross", T=24, S=50, mask=_segments_cross),
    _c("segments_window_bias_nan", T=40, S=40, H=2, K=2, bias="1 H T S", nan_padding=True,
       mask=lambda *a: _segments_mid_padding(*a) & masks.sliding_window(9, 3)),
    _c("key_padding_empty_row_nan", T=33, mask=lambda *a: masks.key_padding(jnp.array([56, 0])),
       nan_padding=True),
    # NaN placement: every q row / k-v column that no (query, key) pair uses holds NaN (issue 25)
    _c("ragged_rows_phantom_key_nan", B=1, T=33, S=34, H=2, K=1,      # key 33: only a padded row past T
       mask=lambda *a: masks.causal(offset=0), nan_padding=True),      # would see it (T % block != 0)
    _c("causal_negative_offset_nan", B=1, T=24, S=24, H=2, K=1,       # rows 0-3 see no key, keys 20-23
       mask=lambda *a: masks.causal(offset=-4), nan_padding=True),     # are seen by no query
    _c("segments_unused_keys_nan", B=1, T=16, S=32, H=2, K=1, mask=_segments_unused_keys, nan_padding=True),
    _c("window_unbounded_right", T=40, S=40, mask=lambda *a: masks.sliding_window(2, UNBOUNDED)),  # j >= i - 2
    _c("key_padding_and_causal", mask=lambda *a: masks.key_padding(jnp.array([17, 56])) & masks.causal()),
    _c("chunked_prefix_key_padding_t_gt_s", T=36, S=30, H=2, K=1, Dv=32, bias="B 1 T S", scale=0.3,
       mask=lambda *a: masks.chunked(12) & masks.prefix_lm(5) & masks.key_padding(jnp.array([30, 17]))),
    _c("dense_mask_empty_rows", mask=_dense_rows),
    _c("dense_per_head_and_causal", mask=lambda *a: _dense_heads(*a) & masks.causal()),
    # biases
    _c("bias_broadcast_11TS", bias="1 1 T S", mask=_causal),
    _c("bias_full_BHTS", bias="B H T S", mask=_causal),
    _c("bias_broadcast_1H1S", bias="1 H 1 S"),
    _c("bias_broadcast_B11S", bias="B 1 1 S", mask=_causal),
    _c("alibi_mqa", K=1, bias="alibi", mask=_causal),
    _c("t5_bidirectional", bias="t5"),
    # softcap, sinks, dropout
    _c("softcap", softcap=5.0, q_gain=4.0, mask=_causal),
    _c("sinks_softcap_alibi_window", sinks="random", softcap=3.0, bias="alibi", scale=0.3, q_gain=4.0,
       mask=lambda *a: masks.sliding_window(6)),
    _c("sinks_empty_rows", T=20, S=30, sinks="random", mask=lambda *a: masks.key_padding(jnp.array([0, 13]))),
    _c("dropout", dropout_rate=0.3, mask=_causal),
    _c("all_features", B=1, T=23, S=37, Dk=32, Dv=16, mask=_causal, bias="alibi_steep", sinks="random",
       softcap=3.0, dropout_rate=0.2),
    # shapes
    _c("gqa_h4_k2_no_lse", mask=_causal, return_lse=False),
    _c("odd_63_75_dk48_dv40", B=1, T=63, S=75, H=2, K=1, Dk=48, Dv=40, mask=_causal),
    _c("odd_100_d7", B=1, T=100, S=100, H=2, K=2, Dk=7, Dv=9, mask=lambda *a: masks.sliding_window(30, 5)),
    _c("single_query_causal", T=1, S=75, mask=_causal),
    _c("single_query_window", T=1, S=70, mask=lambda *a: masks.sliding_window(9, 2)),
    # dtypes
    _c("bf16_causal_zero_sinks", dtype="bfloat16", sinks="zeros", mask=_causal),
    _c("fp16_causal_zero_sinks", dtype="float16", sinks="zeros", mask=_causal),
    _c("bf16_causal_square", B=1, T=32, S=32, H=2, K=2, Dk=32, dtype="bfloat16", mask=_causal),
    _c("bf16_causal_square_no_lse", B=1, T=32, S=32, H=2, K=2, Dk=32, dtype="bfloat16", mask=_causal,
       return_lse=False),  # within cuDNN's declared support (runs where cuDNN is installed)
    _c("fp16_single_query_d24", B=1, T=1, S=27, H=2, K=2, Dk=24, dtype="float16", mask=_causal),
    _c("float64_window_softcap_sinks", dtype="float64", softcap=4.0, sinks="ones",
       mask=lambda *a: masks.causal() & masks.sliding_window(30)),
]}


# ----------------------------------------------------------------------------- inputs


def _is_float(x):
    return x is not None and jnp.issubdtype(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype, jnp.floating)


def x64_if(case: Case):
    return tk.float64() if case.dtype == "float64" else contextlib.nullcontext()


@functools.cache
def inputs(case: Case) -> dict:
    """``q, k, v, bias, sinks`` (NumPy, the case dtype; biases float32), ``mask``, ``dropout_rng`` and
    the cotangents ``ct_o`` (case dtype) and ``ct_lse`` (float32), all drawn from ``case.seed``."""
    B, T, S, H, K, Dk, Dv = case.dims
    rng = np.random.default_rng(case.seed)
    dt = jnp.dtype(case.dtype)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    with x64_if(case):
        d = dict(q=(normal(B, T, H, Dk) * case.q_gain).astype(dt), k=normal(B, S, K, Dk).astype(dt),
                 v=normal(B, S, K, Dv).astype(dt))
        d["mask"] = None if case.mask is None else case.mask(rng, B, T, S, H)
        sizes = dict(B=B, H=H, T=T, S=S)
        if case.bias is None:
            d["bias"] = None
        elif case.bias in ("alibi", "alibi_steep"):
            d["bias"] = ALiBi(np.asarray(alibi_slopes(H)) * (4.0 if case.bias == "alibi_steep" else 1.0))
        elif case.bias == "t5":
            d["bias"] = T5RelativeBias(normal(32, H), bidirectional=True, max_distance=20)
        else:
            d["bias"] = normal(*[1 if s == "1" else sizes[s] for s in case.bias.split()])
        d["sinks"] = {None: None, "random": normal(H), "zeros": np.zeros(H, np.float32),
                      "ones": np.ones(H, np.float32)}[case.sinks]
        if d["sinks"] is not None:
            d["sinks"] = d["sinks"].astype(dt)
        d["dropout_rng"] = jax.random.key(case.seed + 11) if case.dropout_rate else None
        d["ct_o"] = normal(B, T, H, Dv).astype(dt)
        d["ct_lse"] = normal(B, T, H)
    return d


def _static_kwargs(case: Case) -> dict:
    return dict(scale=case.scale, softcap=case.softcap, dropout_rate=case.dropout_rate, return_lse=case.return_lse)


def declared_reasons(case: Case, runner: Runner) -> list[str]:
    """What ``runner.backend`` declares it cannot serve for this case on ``runner.platform``."""
    d = inputs(case)
    with x64_if(case):
        dec = aj.explain(d["q"], d["k"], d["v"], mask=d["mask"], bias=d["bias"], sinks=d["sinks"],
                         dropout_rng=d["dropout_rng"], impl=runner.backend, platform=runner.platform,
                         **_static_kwargs(case))
    return list(dec.reasons[runner.platform][runner.backend])


def _program(case: Case, fn: Callable):
    """``(q, k, v, bias, sinks, mask, rng, ct_o, ct_lse) -> (out, grads)``: forward and VJP."""
    kw = _static_kwargs(case)

    def program(q, k, v, bias, sinks, mask, rng, ct_o, ct_lse):
        def f(q, k, v, bias, sinks):
            return fn(q, k, v, mask=mask, bias=bias, sinks=sinks, dropout_rng=rng, **kw)

        out, pullback = jax.vjp(f, q, k, v, bias, sinks)
        if case.return_lse:
            o, lse = out
            ct = (ct_o.astype(o.dtype), jnp.where(jnp.isfinite(lse), ct_lse.astype(lse.dtype), 0))
        else:
            ct = ct_o.astype(out.dtype)
        return out, pullback(ct)

    return program


def _jit(case: Case, program):
    opts = None if case.dtype == "float64" else tk.FAST_COMPILE  # float64 checks keep exact transcendentals
    return jax.jit(program, compiler_options=opts)


def _args(d: dict, cast=None):
    c = (lambda x: x) if cast is None else cast
    tree = (d["q"], d["k"], d["v"], d["bias"], d["sinks"])
    return (*jax.tree.map(c, tree), d["mask"], d["dropout_rng"], c(d["ct_o"]), d["ct_lse"] if cast is None
            else c(d["ct_lse"]))


@functools.cache
def reference(case: Case):
    """Float64 reference ``(out, grads, visible)`` of a case (NumPy), shared by every runner.

    ``visible``: ``bool [B, H, T, S]``, the materialised mask (all True without a mask).
    """
    B, T, S, H, *_ = case.dims
    d = inputs(case)
    prog = _program(case, lambda *a, **kw: aj.attention(*a, impl="reference", **kw))

    def with_visible(*args):
        mask = args[5]
        vis = jnp.ones((B, H, T, S), bool) if mask is None else jnp.broadcast_to(mask.materialize(T, S),
                                                                                   (B, H, T, S))
        return prog(*args), vis

    with tk.float64():
        (out, grads), vis = _jit(case, with_visible)(*_args(d, cast=lambda x: jnp.asarray(x, jnp.float64)))
        out, grads = jax.tree.map(np.asarray, (out, grads))
    return out, grads, np.asarray(vis)


def unused_positions(case: Case):
    """``(q_unused [B, T, H], kv_unused [B, S, K])``: positions that no visible (query, key) pair uses."""
    B, T, S, H, K, *_ = case.dims
    vis = reference(case)[2]
    q_unused = ~vis.any(axis=3).transpose(0, 2, 1)
    kv_unused = ~vis.reshape(B, K, H // K, T, S).any(axis=(2, 3)).transpose(0, 2, 1)
    return q_unused, kv_unused


def backend_inputs(case: Case) -> dict:
    """The case inputs, with NaN / +Inf / -Inf in every unused q/k/v position when ``case.nan_padding``."""
    d = dict(inputs(case))
    if case.nan_padding:
        q_unused, kv_unused = unused_positions(case)
        if not (q_unused.any() or kv_unused.any()):
            raise AssertionError(f"case {case.name}: nan_padding needs unused query or key positions")
        for n, unused in (("q", q_unused), ("k", kv_unused), ("v", kv_unused)):
            bad = np.resize(np.array([np.nan, np.inf, -np.inf], np.float32), d[n].shape)  # NaN, +Inf, -Inf mixed
            d[n] = np.where(unused[..., None], bad, d[n]).astype(d[n].dtype)
    return d


def run(case: Case, runner: Runner, fn: Callable | None = None):
    """Compiled forward + VJP of ``runner`` on ``case``: ``(out, grads)`` as NumPy."""
    d = backend_inputs(case)
    with x64_if(case), runner.context():
        res = _jit(case, _program(case, fn or runner.fn))(*_args(d))
        return jax.tree.map(np.asarray, jax.block_until_ready(res))


GRAD_NAMES = ("dq", "dk", "dv", "dbias", "dsinks")


def compare(case: Case, out, grads, what: str = "") -> None:
    """Values and every gradient leaf against the float64 reference, in the case dtype's tolerance;
    fully masked query rows give exactly zero output and zero gradients; every gradient is finite."""
    ref_out, ref_grads, _ = reference(case)
    dt = case.dtype
    o, ro = (out[0], ref_out[0]) if case.return_lse else (out, ref_out)
    if str(o.dtype) != dt:
        raise AssertionError(f"{what}o: dtype {o.dtype}, expected the input dtype {dt}")
    tk.assert_close(o, ro, dtype=dt, name=f"{what}o")
    if case.return_lse:
        lse_dt = "float64" if dt == "float64" else "float32"
        if str(out[1].dtype) != lse_dt:
            raise AssertionError(f"{what}lse: dtype {out[1].dtype}, expected {lse_dt}")
        tk.assert_close(out[1], ref_out[1], dtype=lse_dt, name=f"{what}lse")
    for name, g, rg in zip(GRAD_NAMES, grads, ref_grads):
        g_leaves, r_leaves = jax.tree.leaves(g), jax.tree.leaves(rg)
        if len(g_leaves) != len(r_leaves):
            raise AssertionError(f"{what}{name}: {len(g_leaves)} gradient leaves, reference has {len(r_leaves)}")
        for gl, rl in zip(g_leaves, r_leaves):
            if not np.isfinite(np.asarray(gl, np.float64)).all():
                raise AssertionError(f"{what}{name}: non-finite gradient")
            tk.assert_close(gl, rl, dtype=dt, grad=True, name=f"{what}{name}")
    q_unused, kv_unused = unused_positions(case)
    if q_unused.any():
        if np.any(np.asarray(o, np.float64)[q_unused] != 0):
            raise AssertionError(f"{what}o: a fully masked query row is not exactly zero")
        if np.any(np.asarray(grads[0], np.float64)[q_unused] != 0):
            raise AssertionError(f"{what}dq: a fully masked query row has a non-zero gradient")
    for name, g in (("dk", grads[1]), ("dv", grads[2])):
        if kv_unused.any() and np.any(np.asarray(g, np.float64)[kv_unused] != 0):
            raise AssertionError(f"{what}{name}: a key no query sees has a non-zero gradient")


def check_refusal(case: Case, runner: Runner, reasons: list[str]) -> None:
    """Calling the backend raises ValueError naming every declared reason.

    The call is eager (masks keep concrete arrays, so reasons print them as ``explain`` does);
    every backend validates before computing anything, so nothing is compiled.
    """
    d = backend_inputs(case)
    try:
        with x64_if(case):
            runner.fn(d["q"], d["k"], d["v"], mask=d["mask"], bias=d["bias"], sinks=d["sinks"],
                      dropout_rng=d["dropout_rng"], **_static_kwargs(case))
    except ValueError as e:
        missing = [r for r in reasons if r not in str(e)]
        if missing:
            raise AssertionError(f"{runner.name} refused {case.name} without naming {missing}: {e}") from e
        return
    raise AssertionError(f"{runner.name} declares it cannot serve {case.name} ({reasons}) but ran it")


def status(case: Case, runner: Runner) -> str:
    """``pass`` / ``refuse`` / ``env`` (refused only for reasons of this machine) for the table."""
    reasons = declared_reasons(case, runner)
    if not reasons:
        return "pass"
    if all(r.startswith(runner.environment) for r in reasons) and runner.environment:
        return "env"
    return "refuse"


def table() -> str:
    """The pass/refuse markdown table (cases x runners) of the registered backends."""
    rs = registered_runners()
    lines = ["| case | " + " | ".join(r.name for r in rs) + " |", "|---|" + "---|" * len(rs)]
    for c in CASES.values():
        lines.append(f"| {c.name} | " + " | ".join(status(c, r) for r in rs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if "--table" not in sys.argv[1:]:
        raise SystemExit("usage: python -m tests.softmax.conformance --table")
    print(table())
