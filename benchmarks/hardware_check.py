"""One prepared hardware run for every Pallas kernel configuration (issue 23).

``python -m benchmarks.hardware_check`` (``make hardware-check``) runs, for each configuration of
the lowering tests -- ``CONFIGS`` of tests/pallas/test_flash_lowering.py (flash attention,
``aj.attention(impl="pallas")``), ``LOWERING`` of tests/pallas/test_decode_kernels.py (split-K and
paged decode) and ``CONFIGS`` of tests/pallas/test_gla_lowering.py (chunked GLA) -- on one GPU:

1. **parity** at the lowering test's own sizes: the kernel's forward and, where it has one, its
   backward (a VJP with random cotangents over every differentiable input) against the XLA path
   on the same device (``impl="xla"``; decode: the ``split_k`` / paged ``xla`` entries; GLA: the
   ``chunk`` form), traced under ``jax.default_matmul_precision("highest")`` so float32 is held to
   the float32 row of :data:`attn_jax.core.testing.TOLERANCES` (the Triton kernels otherwise use
   TF32 dots, as XLA does); compile time per implementation is recorded;
2. **timing** at larger sizes (the same features; batch, heads and lengths scaled up, see
   ``TIMING``) at the default precision: forward and forward+backward of the kernel, the XLA path
   and ``jax.nn.dot_product_attention(implementation="cudnn")`` (on the nearest problem cuDNN
   can express; what was dropped is noted), median of ``--repeats`` (>= 5) runs after warm-up,
   each run a back-to-back burst of calls long enough to hide the launch latency; the kernel's
   outputs are compared with the XLA path's there too (``agreement``);
3. TFLOP/s (flash: matmul FLOPs over the visible pairs of the mask; decode and GLA: the model in
   each builder) against the H200's dense bf16 peak, decode also in GB/s against its HBM
   bandwidth, plus the matmul rate and copy bandwidth measured at the start (the ceilings).

Parity runs first for every configuration (pass 1: the compile check, cheap), timing second
(pass 2), so a run cut short has parity for all.  The programs of one configuration and pass
compile side by side in threads (compile seconds are wall times of those overlapping compiles);
runs and timings are sequential.  A compile failure, a refusal or a disagreement
is recorded for its configuration, not fatal.  Each configuration's timing has a budget
(``--config-budget-s``: past it the rest of its timing is skipped) and the run a global deadline
(``--deadline-s``: what has not started is listed as skipped, saying so; a watchdog ends a run
stuck in one compilation ``--grace-s`` later).  The JSON (``<out>/<UTC timestamp>.json``) and its
markdown table (``.md``) are rewritten after every configuration and pass, and one line is
printed (flushed) for each, so a run cut short still reports.  Families are interleaved (flash,
decode, GLA, flash, ...) so such a run covers all three.

``--dry-run`` runs the same code on this CPU: kernels with ``interpret=True`` (GPU semantics),
tiny sizes (``TINY``), parity at the default precision, cuDNN reported as refused, no ceilings.
``tests/benchmarks/test_hardware_check.py`` runs it so it cannot rot.  BUILD.md ("Hardware check")
has the device invocation: the script installs nothing and runs on the device image's own jax.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import sys
import threading
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

#: NVIDIA H200 (SXM) datasheet, nvidia.com/en-us/data-center/h200 (2024): BF16 Tensor Core
#: 1,979 TFLOP/s "with sparsity"; the dense rate is half of that.  HBM3e bandwidth 4.8 TB/s.
H200_BF16_DENSE_TFLOPS = 989.5
H200_HBM_TBPS = 4.8

#: The jax versions pyproject.toml pins (the device image may hold another; recorded, see BUILD.md).
JAX_PIN = (">=0.10.0", "<0.11")

FAMILIES = ("flash", "decode", "gla")

#: Size changes for the timing run (per family): multiply batch, heads and sequence lengths.
TIMING = {
    "flash": dict(B=8, heads=4, seq=16),
    "decode": dict(B=16, heads=4, seq=8),
    "gla": dict(B=8, heads=8, seq=16),
}
#: Size changes for ``--dry-run`` (interpret mode on a CPU): lengths divided, batch and heads kept.
TINY = {"flash": 8, "decode": 16, "gla": 8}


# ----------------------------------------------------------------------------- configurations


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel configuration of a lowering test: ``family`` (flash | decode | gla), its name there."""

    family: str
    name: str
    cfg: dict

    @property
    def key(self) -> str:
        return f"{self.family}/{self.name}"

    @property
    def dtype(self):
        return self.cfg["dtype"] if self.family != "flash" else self.cfg.get("dtype", jnp.float32)


def kernel_cases() -> list[Case]:
    """Every configuration of the three lowering tests, families interleaved (see module docstring)."""
    from tests.pallas.test_decode_kernels import LOWERING
    from tests.pallas.test_flash_lowering import CONFIGS as FLASH
    from tests.pallas.test_gla_lowering import CONFIGS as GLA

    lists = [[Case("flash", n, c) for n, c in FLASH.items()], [Case("decode", n, c) for n, c in LOWERING.items()],
             [Case("gla", n, c) for n, c in GLA.items()]]
    out = []
    for i in range(max(map(len, lists))):
        out += [lst[i] for lst in lists if i < len(lst)]
    return out


@dataclasses.dataclass
class Built:
    """A configuration at one size: inputs, the three implementations and the work it does.

    ``diff``: argnums differentiated in the backward (empty: forward-only kernel).  ``cudnn`` is
    None when cuDNN has no counterpart (``cudnn_note`` says why, else what was dropped).
    """

    args: tuple
    diff: tuple
    kernel: Callable
    xla: Callable
    cudnn: Callable | None
    cudnn_note: str
    flops_fwd: float
    flops_fwd_bwd: float | None
    bytes_fwd: float | None
    sizes: dict
    flops_model: str


#: Arrays up to this many elements are drawn on the host (NumPy: no compilation, which dominates the
#: dry run); larger ones with jax.random on the device (host generation of gigabytes is slow).
HOST_DRAW_MAX = 1 << 20


def _normal(key, shape, dtype):
    """Standard normal ``shape`` in ``dtype`` from ``key`` (fresh inputs per build)."""
    if math.prod(shape) <= HOST_DRAW_MAX:
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)
    return _device_normal(key, tuple(shape), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _device_normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _host_rng(key) -> np.random.Generator:
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def _log_gates(key, shape):
    """Per-step log forget gates ``-exp(u)``, ``u`` uniform in ``[log 1e-3, 0)``: weak to moderately strong
    decay (host for small shapes, as :func:`_normal`)."""
    if math.prod(shape) <= HOST_DRAW_MAX:
        return jnp.asarray(-np.exp(_host_rng(key).uniform(math.log(1e-3), 0.0, shape)).astype(np.float32))
    return _device_log_gates(key, tuple(shape))


@functools.partial(jax.jit, static_argnums=(1,))
def _device_log_gates(key, shape):
    return -jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(1e-3), 0.0))


def _scaled(n: int, f: int, *, up: bool) -> int:
    """``n`` scaled up by ``f`` or down by ``f`` (lengths of 1 stay 1: single-query cases)."""
    if n == 1:
        return 1
    return n * f if up else max(2, n // f)


def _sizes(case: Case, scale: str) -> dict:
    """Batch/heads/lengths of ``case`` at ``scale`` ("test" | "timing" | "tiny")."""
    c = case.cfg
    if case.family == "flash":
        from tests.pallas import test_flash_lowering as fl
        base = dict(B=fl.B, H=fl.H, K=fl.K, T=c.get("T", fl.T), S=c.get("S", fl.S))
    elif case.family == "gla":
        from tests.pallas import test_gla_lowering as gl
        base = dict(B=gl.B, H=gl.H, T=c.get("T", gl.T))
    else:
        base = {k: c[k] for k in ("B", "H", "K", "T")}
        base.update({k: c[k] for k in ("S", "num_splits", "max_pages", "pages_per_split") if k in c})
    if scale == "test":
        return base
    s = dict(base)
    if scale == "timing":
        m = TIMING[case.family]
        s["B"] = base["B"] * m["B"]
        s["H"] = base["H"] * m["heads"]
        if "K" in base:
            s["K"] = base["K"] * m["heads"]
        seq_keys = ("T", "S") if case.family != "decode" else ("S", "max_pages")
        for k in seq_keys:
            if k in base:
                s[k] = _scaled(base[k], m["seq"], up=True)
    elif scale == "tiny":
        f = TINY[case.family]
        if case.family == "decode":
            if "S" in base:
                s["S"] = max(16 * base["num_splits"], base["S"] // f)
            else:
                s["max_pages"], s["pages_per_split"] = 4, 2
        else:
            for k in ("T", "S"):
                if k in base:
                    s[k] = _scaled(base[k], f, up=False)
    else:
        raise ValueError(f"scale: expected 'test', 'timing' or 'tiny', got {scale!r}")
    return s


def build(case: Case, scale: str, *, interpret: bool, key) -> Built:
    """``case`` at ``scale`` with fresh random inputs; kernels in interpret mode when ``interpret``."""
    return {"flash": _build_flash, "decode": _build_decode, "gla": _build_gla}[case.family](
        case, _sizes(case, scale), interpret=interpret, key=key)


def _build_flash(case: Case, z: dict, *, interpret: bool, key) -> Built:
    import attn_jax as aj
    from attn_jax.core import masks as M
    from attn_jax.positional.alibi import ALiBi
    from attn_jax.softmax import pallas as P

    c = case.cfg
    B, H, K, T, S = z["B"], z["H"], z["K"], z["T"], z["S"]
    dt = c.get("dtype", jnp.float32)
    Dk = c.get("Dk", 64)
    Dv = c.get("Dv", Dk)
    ks = jax.random.split(key, 6)
    args = [_normal(ks[0], (B, T, H, Dk), dt), _normal(ks[1], (B, S, K, Dk), dt), _normal(ks[2], (B, S, K, Dv), dt)]
    extras = []
    if "bias" in c:
        shape = c["bias"](T, S).shape
        extras.append("bias")
        args.append(_normal(ks[3], shape, jnp.float32))
    if c.get("slopes"):
        extras.append("slopes")
        args.append(jnp.asarray(np.exp2(-np.arange(1, H + 1, dtype=np.float32) * 8.0 / H)))
    if c.get("sinks"):
        extras.append("sinks")
        args.append(_normal(ks[4], (H,), jnp.float32))
    mask = c["mask"](T, S) if "mask" in c else None
    drop = c.get("dropout", 0.0)
    rng = jax.random.key(7) if drop else None

    def call(impl):
        def fn(q, k, v, *xs):
            kw = dict(zip(extras, xs))
            bias = ALiBi(kw["slopes"]) if "slopes" in kw else kw.get("bias")
            a = dict(mask=mask, bias=bias, sinks=kw.get("sinks"), softcap=c.get("softcap"), dropout_rate=drop,
                     dropout_rng=rng)
            if impl == "pallas" and interpret:
                return P.flash_attention(q, k, v, platform="gpu", interpret=True, **a)
            return aj.attention(q, k, v, impl=impl, **a)
        return fn

    # cuDNN through jax.nn: the nearest problem it can express (timing peer only, never parity)
    dropped, nn_kw = [], {}
    for m in (() if mask is None else mask.conjuncts()):
        if isinstance(m, M.Causal):
            nn_kw["is_causal"] = True
            if T != S:
                dropped.append("causal is top-left aligned")
        elif isinstance(m, M.SlidingWindow):
            nn_kw["local_window_size"] = (int(m.left), int(m.right))
        elif isinstance(m, M.KeyPadding):
            nn_kw["key_value_seq_lengths"] = jnp.broadcast_to(jnp.asarray(m.lengths, jnp.int32), (B,))
        else:
            dropped.append(type(m).__name__)
    dropped += [n for n, on in (("ALiBi", c.get("slopes")), ("softcap", c.get("softcap")), ("sinks", c.get("sinks")),
                                ("dropout", drop)) if on]
    nn_dt = jnp.bfloat16 if dt == jnp.float32 else dt
    if nn_dt != dt:
        dropped.append("float32 run in bfloat16")
    has_bias = "bias" in extras

    def cudnn(q, k, v, *xs):
        bias = xs[extras.index("bias")].astype(nn_dt) if has_bias else None
        return jax.nn.dot_product_attention(q.astype(nn_dt), k.astype(nn_dt), v.astype(nn_dt), bias=bias,
                                            implementation="cudnn", **nn_kw)

    density = 1.0 if mask is None else float(_mask_density(mask, T, S))
    pairs = B * H * T * S * density
    return Built(
        args=tuple(args), diff=tuple(range(len(args))), kernel=call("pallas"), xla=call("xla"), cudnn=cudnn,
        cudnn_note=("dropped: " + ", ".join(dropped)) if dropped else "same problem",
        flops_fwd=2 * pairs * (Dk + Dv), flops_fwd_bwd=2 * pairs * (4 * Dk + 3 * Dv), bytes_fwd=None,
        sizes=dict(z, Dk=Dk, Dv=Dv, dtype=jnp.dtype(dt).name, mask_density=round(density, 4)),
        flops_model="matmul FLOPs over visible pairs (fwd 2 matmuls, bwd 5)")


def _mask_density(mask, T: int, S: int):
    """Fraction of visible (query, key) pairs (one compiled program, not eager ops)."""
    return jax.jit(lambda: jnp.mean(mask.materialize(T, S).astype(jnp.float32)))()


def _build_decode(case: Case, z: dict, *, interpret: bool, key) -> Built:
    from attn_jax.softmax.decode import decode_attention as xla_decode, paged_attention
    from attn_jax.softmax.kv_cache import PagedKVCache
    from pallas_kernels.decode_attention import decode_attention, paged_decode_attention

    c = case.cfg
    B, H, K, T, D, dt = z["B"], z["H"], z["K"], z["T"], c["head_dim"], c["dtype"]
    paged = c["layout"] == "paged"
    ks = jax.random.split(key, 6)
    q = _normal(ks[0], (B, T, H, D), dt)
    sinks = _normal(ks[1], (H,), jnp.float32)
    if paged:
        ps, Mp, pps = c["page_size"], z["max_pages"], z["pages_per_split"]
        S, P = Mp * ps, B * Mp
    else:
        S = z["S"]
    # lengths in [T, S], the last row full: every split sees keys somewhere
    rng = _host_rng(ks[2])
    lengths = rng.integers(T, S + 1, (B,)).astype(np.int32)
    lengths[-1] = S
    lengths = jnp.asarray(lengths)
    softcap = c.get("softcap")
    if paged:
        kp, vp = _normal(ks[3], (P, ps, K, D), dt), _normal(ks[4], (P, ps, K, D), dt)
        table = jnp.asarray(rng.permutation(P).reshape(B, Mp).astype(np.int32))
        args = (q, kp, vp, table, lengths, sinks)

        def kernel(q, kp, vp, table, lengths, sinks):
            return paged_decode_attention(q, kp, vp, table, lengths, pages_per_split=pps, softcap=softcap,
                                          sinks=sinks, platform="gpu", interpret=interpret)

        def xla(q, kp, vp, table, lengths, sinks):
            cache = PagedKVCache(kp, vp, table, lengths)
            return paged_attention(q, cache, pages_per_split=pps, softcap=softcap, sinks=sinks, impl="xla",
                                   return_lse=True)

        def contiguous(kp, table):  # [B, S, K, D] in sequence order
            return kp[table].reshape(B, S, K, D)
    else:
        k, v = _normal(ks[3], (B, S, K, D), dt), _normal(ks[4], (B, S, K, D), dt)
        args = (q, k, v, lengths, sinks)
        n = z["num_splits"]

        def kernel(q, k, v, lengths, sinks):
            return decode_attention(q, k, v, lengths, num_splits=n, softcap=softcap, sinks=sinks, platform="gpu",
                                    interpret=interpret)

        def xla(q, k, v, lengths, sinks):
            return xla_decode(q, k, v, lengths=lengths, softcap=softcap, sinks=sinks, impl="split_k", num_splits=n,
                              return_lse=True)

    nn_dt = jnp.bfloat16 if dt == jnp.float32 else dt
    dropped = [n for n, on in (("sinks", True), ("softcap", softcap), ("float32 run in bfloat16", nn_dt != dt),
                               ("paged (contiguous cache)", paged), ("causal offset (length mask only)", T > 1))
               if on]

    def cudnn(*a):
        if paged:
            q, kp, vp, table, lengths, _ = a
            k, v = contiguous(kp, table), contiguous(vp, table)
        else:
            q, k, v, lengths, _ = a
        return jax.nn.dot_product_attention(q.astype(nn_dt), k.astype(nn_dt), v.astype(nn_dt),
                                            key_value_seq_lengths=lengths, implementation="cudnn")

    keys = float(jnp.sum(lengths))
    itemsize = jnp.dtype(dt).itemsize
    return Built(
        args=args, diff=(), kernel=kernel, xla=xla, cudnn=cudnn, cudnn_note="dropped: " + ", ".join(dropped),
        flops_fwd=2 * H * T * keys * 2 * D, flops_fwd_bwd=None,
        bytes_fwd=keys * K * 2 * D * itemsize + 2 * B * T * H * D * itemsize,
        sizes=dict(z, S=S, D=D, dtype=jnp.dtype(dt).name, layout=c["layout"], mean_length=round(keys / B, 1)),
        flops_model="2 matmuls over the valid keys; bytes: valid K/V rows + q + o")


def _build_gla(case: Case, z: dict, *, interpret: bool, key) -> Built:
    from attn_jax.linear.gated import gated_linear_attention
    from pallas_kernels.chunked_gla import DEFAULT_CHUNK, chunked_gla
    from pallas_kernels.common import next_pow2

    c = case.cfg
    B, H, T, dt, Dk, Dv = z["B"], z["H"], z["T"], c["dtype"], c["Dk"], c["Dv"]
    ks = jax.random.split(key, 5)
    gate = (B, T, H) if c["scalar"] else (B, T, H, Dk)
    lg = _log_gates(ks[3], gate)
    args = [_normal(ks[0], (B, T, H, Dk), dt), _normal(ks[1], (B, T, H, Dk), dt) / math.sqrt(Dk),
            _normal(ks[2], (B, T, H, Dv), dt), lg]
    if c.get("h0"):
        args.append(_normal(ks[4], (B, H, Dk, Dv), jnp.float32))
    cs = c.get("chunk_size")

    def kernel(q, k, v, lg, *h0):
        return chunked_gla(q, k, v, lg, initial_state=h0[0] if h0 else None, chunk_size=cs, platform="gpu",
                           interpret=interpret)

    def xla(q, k, v, lg, *h0):
        return gated_linear_attention(q, k, v, lg, initial_state=h0[0] if h0 else None, return_final_state=True,
                                      impl="chunk")

    C = cs or min(DEFAULT_CHUNK["scalar" if c["scalar"] else "vector"], max(16, next_pow2(T)))
    flops = B * H * T * (2 * C * (Dk + Dv) + 4 * Dk * Dv)
    return Built(
        args=tuple(args), diff=tuple(range(len(args))), kernel=kernel, xla=xla, cudnn=None,
        cudnn_note="no cuDNN counterpart (linear attention)", flops_fwd=flops, flops_fwd_bwd=3 * flops,
        bytes_fwd=None, sizes=dict(z, Dk=Dk, Dv=Dv, dtype=jnp.dtype(dt).name, chunk=C, scalar_gate=c["scalar"]),
        flops_model="chunk form: per token 2C(Dk+Dv) + 4 Dk Dv; fwd+bwd = 3x fwd")


# ----------------------------------------------------------------------------- programs, parity, timing


def program(b: Built, fn: Callable, *, backward: bool, key) -> Callable:
    """``args -> out`` (forward) or ``args -> (out, grads)`` (VJP with random cotangents over ``b.diff``)."""
    from attn_jax.core.testing import vjp_with_random_cotangent

    if not backward or not b.diff:
        return fn

    def run(*args):
        def f(*d):
            full = list(args)
            for i, x in zip(b.diff, d):
                full[i] = x
            return fn(*full)
        return vjp_with_random_cotangent(f, [args[i] for i in b.diff], key)
    return run


def compile_program(fn: Callable, args, *, options: dict | None, precision: str | None):
    """``(compiled, seconds)``: ``jax.jit(fn)`` lowered and compiled for ``args`` (traced under ``precision``)."""
    t0 = time.perf_counter()
    ctx = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
    with ctx:
        compiled = jax.jit(fn).lower(*args).compile(options)
    return compiled, time.perf_counter() - t0


_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=6, thread_name_prefix="hardware_check-compile")


def compile_concurrently(programs: dict, args, *, options: dict | None, precision: str | None) -> dict:
    """``{name: future of (compiled, seconds)}``: the programs traced and compiled in threads (XLA and
    its Triton pipeline compile outside the GIL, so a configuration's programs compile side by side;
    timing stays sequential)."""
    return {name: _POOL.submit(compile_program, fn, args, options=options, precision=precision)
            for name, fn in programs.items()}


def compare(out, ref, dtype, *, grad: bool) -> dict:
    """``out`` vs ``ref`` with the tolerance of ``dtype`` from :mod:`attn_jax.core.testing`.

    NaN fails; non-finite entries must coincide; on the finite ones the relative RMSE is held to
    the relative tolerance and the max-abs error, divided by ``max(1, RMS of ref)``, to the
    absolute one.  The division keeps one rounding step of a large value (a bfloat16 ulp at |x| = 20
    is 0.125, e.g. in gradients that grow with the sequence) from reading as a disagreement; the
    kit's unit-scale tests need no such scale.
    """
    from attn_jax.core.testing import rel_rmse, tolerance

    x, r = np.asarray(out).astype(np.float32), np.asarray(ref).astype(np.float32)
    rel_tol, abs_tol = tolerance(dtype, grad=grad)
    nan = int(np.isnan(x).sum())
    fin = np.isfinite(r)
    inf_ok = bool(np.array_equal(np.isinf(x), np.isinf(r)) and np.all(x[np.isinf(r)] == r[np.isinf(r)]))
    rel = rel_rmse(x[fin], r[fin]) if fin.any() else 0.0
    mx = float(np.abs(x[fin] - r[fin]).max()) if fin.any() else 0.0
    scale = max(1.0, float(np.sqrt(np.mean(np.square(r[fin].astype(np.float64)))))) if fin.any() else 1.0
    ratio = max(rel / rel_tol, mx / scale / abs_tol)
    ok = bool(nan == 0 and inf_ok and np.isfinite(ratio) and ratio <= 1.0)
    return dict(ok=ok, rel_rmse=rel, max_abs=mx, ref_rms_scale=scale, rel_tol=rel_tol, abs_tol=abs_tol,
                worst_over_tol=ratio, nan=nan, inf_match=inf_ok)


def compare_all(out, ref, dtype, names: list[str]) -> dict:
    """:func:`compare` over the leaves of ``(outputs, grads)`` (or outputs alone), named."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (tuple, list)) and names[-1].startswith("d"):
        o, g = out
        r_o, r_g = ref
        leaves = [(n, a, b, False) for n, a, b in zip(names, jax.tree.leaves(o), jax.tree.leaves(r_o))]
        gnames = [n for n in names if n.startswith("d")]
        leaves += [(n, a, b, True) for n, a, b in zip(gnames, g, r_g)]
    else:
        leaves = [(n, a, b, False) for n, a, b in zip(names, jax.tree.leaves(out), jax.tree.leaves(ref))]
    res = {n: compare(a, b, dtype, grad=gr) for n, a, b, gr in leaves}
    worst = max(d["worst_over_tol"] for d in res.values())
    return dict(ok=all(d["ok"] for d in res.values()), worst_over_tol=worst, leaves=res)


def leaf_names(case: Case, b: Built) -> list[str]:
    """Names of the output leaves then the gradients (``d<input>``) of ``case``'s programs."""
    if case.family == "flash":
        outs, ins = ["o"], ["q", "k", "v"] + [n for n in ("bias", "slopes", "sinks") if n in case.cfg]
    elif case.family == "decode":
        return ["o", "lse"]
    else:
        outs, ins = ["o", "state"], ["q", "k", "v", "log_g"] + (["h0"] if case.cfg.get("h0") else [])
    return outs + ["d" + n for n in ins][:len(b.diff)]


def time_compiled(fn: Callable, args, *, repeats: int, warmup: int, burst_s: float = 2e-3) -> dict:
    """Median seconds per call over ``repeats`` bursts after ``warmup`` calls; a burst is ``n`` calls
    back to back (``n`` so that a burst lasts about ``burst_s``), synchronised once at its end."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    n = int(min(50, max(1, burst_s / max(time.perf_counter() - t0, 1e-7))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            r = fn(*args)
        jax.block_until_ready(r)
        times.append((time.perf_counter() - t0) / n)
    return dict(median_s=statistics.median(times), min_s=min(times), calls_per_burst=n, repeats=repeats)


def _error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) < 1500 else msg[:1500] + " ..."


class OverBudget(Exception):
    pass


# ----------------------------------------------------------------------------- one configuration


def run_parity(case: Case, opts, rec: dict, stash: dict) -> None:
    """Fill ``rec["parity"]``: kernel vs XLA at the lowering test's sizes (dry run: the tiny sizes).

    The dry run leaves its built problem and compiled programs in ``stash`` for :func:`run_timing`
    (same sizes: nothing is compiled twice).
    """
    options = _compile_options(opts)
    key = jax.random.key(opts.seed)
    scale = "tiny" if opts.dry_run else "test"
    b = build(case, scale, interpret=opts.dry_run, key=jax.random.fold_in(key, 1))
    names = leaf_names(case, b)
    rec["sizes"] = {"parity": b.sizes}
    parity = rec["parity"] = {"scale": scale, "precision": opts.parity_precision or "default", "compile_s": {}}
    full = "fwd_bwd" if b.diff else "fwd"
    done = {}  # (impl, kind) -> (compiled, outputs, compile seconds)
    progs = {impl: program(b, getattr(b, impl), backward=True, key=jax.random.fold_in(key, 2))
             for impl in ("kernel", "xla")}
    compiling = compile_concurrently(progs, b.args, options=options, precision=opts.parity_precision)
    for impl in ("kernel", "xla"):
        try:
            compiled, secs = compiling[impl].result()
            parity["compile_s"][impl] = round(secs, 2)
            done[impl, full] = compiled, jax.block_until_ready(compiled(*b.args)), secs
        except Exception as e:  # noqa: BLE001 -- recorded per configuration
            parity[f"{impl}_error"] = _error(e)
            rec["status"] = "error" if impl == "kernel" else "xla-error"
            if opts.verbose:
                traceback.print_exc()
            return
    parity.update(compare_all(done["kernel", full][1], done["xla", full][1], case.dtype, names))
    rec["status"] = "ok" if parity["ok"] else "disagree"
    if opts.dry_run:
        stash.update(built=b, done=done)


def run_timing(case: Case, opts, rec: dict, stash: dict) -> None:
    """Fill ``rec["timing"]``: kernel, XLA and cuDNN at the timing sizes (dry run: the parity run's)."""
    start = time.perf_counter()
    options = _compile_options(opts)
    key = jax.random.key(opts.seed)
    timing = rec["timing"] = {}

    def check_budget(what):
        if time.perf_counter() - start > opts.config_budget_s:
            raise OverBudget(f"timing budget {opts.config_budget_s:.0f} s spent before {what}")

    try:
        if opts.dry_run:
            scale, b, done = "tiny", stash["built"], stash["done"]
        else:
            scale, done = "timing", {}
            b = build(case, scale, interpret=False, key=jax.random.fold_in(key, 3))
        full = "fwd_bwd" if b.diff else "fwd"
        rec["sizes"]["timing"] = b.sizes
        timing.update(scale=scale, cudnn_problem=b.cudnn_note, flops_fwd=b.flops_fwd, flops_fwd_bwd=b.flops_fwd_bwd,
                      bytes_fwd=b.bytes_fwd, flops_model=b.flops_model)
        kinds = ("fwd", "fwd_bwd") if b.diff else ("fwd",)
        impls = [i for i in ("kernel", "xla", "cudnn") if getattr(b, i) is not None]
        progs = {(i, k): program(b, getattr(b, i), backward=k == "fwd_bwd", key=jax.random.fold_in(key, 4))
                 for i in impls for k in kinds if (i, k) not in done}
        compiling = compile_concurrently(progs, b.args, options=options, precision=None)
        outs = {}
        for impl in ("kernel", "xla", "cudnn"):
            t = timing[impl] = {}
            if impl not in impls:
                t["refused"] = b.cudnn_note
                continue
            for kind in kinds:
                check_budget(f"{impl} {kind}")
                try:
                    if (impl, kind) in done:
                        compiled, out, secs = done[impl, kind]
                    else:
                        (compiled, secs), out = compiling[impl, kind].result(), None
                    t[f"compile_{kind}_s"] = round(secs, 2)
                    r = time_compiled(compiled, b.args, repeats=opts.repeats, warmup=opts.warmup)
                except Exception as e:  # noqa: BLE001
                    t["refused" if impl == "cudnn" else "error"] = _error(e)
                    if impl == "kernel":
                        rec["status"] = "timing-error"
                    if opts.verbose and impl != "cudnn":
                        traceback.print_exc()
                    break
                t[f"{kind}_s"] = r["median_s"]
                t[f"{kind}_timing"] = r
                if impl != "cudnn" and kind == full:
                    outs[impl] = jax.block_until_ready(compiled(*b.args)) if out is None else out
        if "kernel" in outs and "xla" in outs:
            agree = compare_all(outs["kernel"], outs["xla"], case.dtype, leaf_names(case, b))
            agree["precision"] = "default (TF32 dots for float32 on the GPU)" if not opts.dry_run else "default"
            timing["agreement"] = agree
        del outs
        _rates(timing)
    except OverBudget as e:
        timing["skipped"] = str(e)
        if rec["status"] == "ok":
            rec["status"] = "ok-partial"
    finally:
        stash.clear()


def _rates(timing: dict) -> None:
    k = timing.get("kernel", {})
    for kind, flops in (("fwd", timing.get("flops_fwd")), ("fwd_bwd", timing.get("flops_fwd_bwd"))):
        if flops and f"{kind}_s" in k:
            tf = flops / k[f"{kind}_s"] / 1e12
            k[f"{kind}_tflops"] = tf
            k[f"{kind}_fraction_of_peak"] = tf / H200_BF16_DENSE_TFLOPS
            for peer in ("xla", "cudnn"):
                if f"{kind}_s" in timing.get(peer, {}):
                    k[f"{kind}_speedup_vs_{peer}"] = timing[peer][f"{kind}_s"] / k[f"{kind}_s"]
    if timing.get("bytes_fwd") and "fwd_s" in k:
        k["fwd_tbps"] = timing["bytes_fwd"] / k["fwd_s"] / 1e12
        k["fwd_fraction_of_hbm"] = k["fwd_tbps"] / H200_HBM_TBPS


def _compile_options(opts) -> dict | None:
    if opts.dry_run:
        from attn_jax.core.testing import FAST_COMPILE
        return FAST_COMPILE
    return None


# ----------------------------------------------------------------------------- ceilings


def ceilings(opts) -> dict:
    """Measured bf16 matmul rate (8192^3) and copy bandwidth (1 GiB read + written) on this device."""
    out = {}
    try:
        n = 8192
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
        mm = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
        r = time_compiled(mm, (a, a), repeats=opts.repeats, warmup=2)
        out["matmul_bf16_8192_tflops"] = 2 * n ** 3 / r["median_s"] / 1e12
        x = jax.random.normal(jax.random.key(1), (1 << 29,), jnp.bfloat16)
        cp = jax.jit(lambda x: x + 1).lower(x).compile()
        r = time_compiled(cp, (x,), repeats=opts.repeats, warmup=2)
        out["copy_tbps"] = 2 * x.size * 2 / r["median_s"] / 1e12
        del a, x
    except Exception as e:  # noqa: BLE001
        out["error"] = _error(e)
    return out


# ----------------------------------------------------------------------------- report


def _fmt_ms(t: dict, kind: str) -> str:
    if f"{kind}_s" in t:
        return f"{t[f'{kind}_s'] * 1e3:.3f}"
    if "refused" in t:
        return "refused"
    if "error" in t:
        return "error"
    return "-"


def markdown(report: dict) -> str:
    """The report's table: one row per configuration (times in ms; rates of the kernel)."""
    m = report["meta"]
    lines = [f"# Hardware check {m['timestamp']}", "",
             f"device: {m['device']}; jax {m['jax']} (pyproject pins jax{''.join(JAX_PIN)}); "
             f"dry run: {m['dry_run']}; elapsed {report.get('elapsed_s', 0):.0f} s; "
             f"finished: {report['finished']}", ""]
    c = report.get("ceilings") or {}
    if c:
        lines += [f"ceilings measured here: bf16 matmul {c.get('matmul_bf16_8192_tflops', float('nan')):.0f} TFLOP/s, "
                  f"copy {c.get('copy_tbps', float('nan')):.2f} TB/s; datasheet: {H200_BF16_DENSE_TFLOPS} TFLOP/s "
                  f"dense bf16, {H200_HBM_TBPS} TB/s", ""]
    lines += ["Times in ms (median); decode kernels are forward-only, so their `*` columns are forward. "
              "err/tol: worst over outputs and gradients of max(rel RMSE / rel tol, scaled max-abs / abs tol).", "",
              "| config | dtype | status | parity (worst err/tol) | agreement | kernel fwd | kernel fwd+bwd | "
              "xla fwd+bwd* | cudnn fwd+bwd* | kernel TFLOP/s* | % bf16 peak | kernel TB/s (% HBM) | vs xla | "
              "vs cudnn | note |",
              "|" + "---|" * 15]
    for r in report["configs"]:
        if r["status"] == "not-selected":
            continue
        p, t = r.get("parity", {}), r.get("timing", {})
        k = t.get("kernel", {})
        kind = "fwd_bwd" if "fwd_bwd_s" in k else "fwd"
        par = f"{'pass' if p.get('ok') else 'FAIL'} {p['worst_over_tol']:.2g}" if "ok" in p else "-"
        ag = t.get("agreement", {})
        agree = f"{ag['worst_over_tol']:.2g}" if ag else "-"
        tf = k.get(f"{kind}_tflops")
        sp = {peer: k.get(f"{kind}_speedup_vs_{peer}") for peer in ("xla", "cudnn")}
        note = r.get("reason") or p.get("kernel_error") or p.get("xla_error") or k.get("error") or t.get("skipped")
        note = (note or t.get("cudnn_problem", "")).replace("|", "/").replace("\n", " ")[:120]
        cud = t.get("cudnn", {})
        cud_kind = "fwd_bwd" if "fwd_bwd_s" in cud else "fwd"
        ratio = {peer: "-" if v is None else f"{v:.2f}x" for peer, v in sp.items()}
        rate = "-" if tf is None else f"{tf:.1f}"
        frac = "-" if tf is None else f"{100 * tf / H200_BF16_DENSE_TFLOPS:.1f}"
        fb = _fmt_ms(k, "fwd_bwd") if kind == "fwd_bwd" else "(fwd only)"
        bw = f"{k['fwd_tbps']:.2f} ({100 * k['fwd_fraction_of_hbm']:.0f}%)" if "fwd_tbps" in k else "-"
        lines.append(f"| {r['key']} | {r['dtype']} | {r['status']} | {par} | {agree} | {_fmt_ms(k, 'fwd')} | {fb} | "
                     f"{_fmt_ms(t.get('xla', {}), kind)} | {_fmt_ms(cud, cud_kind)} | {rate} | {frac} | {bw} | "
                     f"{ratio['xla']} | {ratio['cudnn']} | {note} |")
    n = sum(r["status"] == "not-selected" for r in report["configs"])
    if n:
        lines += ["", f"{n} configurations not selected (--only/--families)."]
    return "\n".join(lines) + "\n"


def line(r: dict, phase: str = "") -> str:
    """One printed line per configuration and pass."""
    p, t = r.get("parity", {}), r.get("timing", {})
    k = t.get("kernel", {})
    bits = [f"[{r['index'] + 1}/{r['total']}{' ' + phase if phase else ''}] {r['key']} ({r['dtype']}): {r['status']}"]
    if "ok" in p and phase != "timing":
        bits.append(f"parity worst err/tol {p['worst_over_tol']:.2g}, compile {p['compile_s']}")
    for kind in ("fwd", "fwd_bwd"):
        if f"{kind}_s" in k:
            s = f"kernel {kind} {k[f'{kind}_s'] * 1e3:.3f} ms"
            if f"{kind}_tflops" in k:
                s += f" = {k[f'{kind}_tflops']:.1f} TFLOP/s"
            for peer in ("xla", "cudnn"):
                if f"{kind}_speedup_vs_{peer}" in k:
                    s += f", {k[f'{kind}_speedup_vs_{peer}']:.2f}x vs {peer}"
            bits.append(s)
    err = r.get("reason") or p.get("kernel_error") or p.get("xla_error") or k.get("error") or t.get("skipped")
    if phase == "timing" and "agreement" in t:
        bits.append(f"agreement worst err/tol {t['agreement']['worst_over_tol']:.2g}")
    if err:
        bits.append(err[:300])
    return "; ".join(bits)


class Writer:
    """Rewrites ``<out>/<stamp>.json`` and ``.md`` (atomically) after every configuration."""

    def __init__(self, out_dir: str, stamp: str):
        os.makedirs(out_dir, exist_ok=True)
        self.json_path = os.path.join(out_dir, f"{stamp}.json")
        self.md_path = os.path.join(out_dir, f"{stamp}.md")
        self.lock = threading.Lock()

    def write(self, report: dict) -> None:
        with self.lock:
            for path, text in ((self.json_path, json.dumps(report, indent=1, default=_json_default)),
                               (self.md_path, markdown(report))):
                with open(path + ".tmp", "w") as f:
                    f.write(text)
                os.replace(path + ".tmp", path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join("results", "hardware"), help="folder for <timestamp>.json/.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU: interpret mode, tiny sizes, no ceilings")
    ap.add_argument("--only", default="", help="comma-separated config names or family/name keys (default: all)")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of flash,decode,gla")
    ap.add_argument("--deadline-s", type=float, default=420.0, help="start no configuration after this")
    ap.add_argument("--grace-s", type=float, default=45.0, help="watchdog: exit this long after the deadline")
    ap.add_argument("--config-budget-s", type=float, default=40.0, help="per configuration's timing: then skip")
    ap.add_argument("--repeats", type=int, default=5, help="timed bursts per program (median; >= 5 on hardware)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of recorded errors")
    opts = ap.parse_args(argv)
    fams = [f for f in opts.families.split(",") if f]
    bad = [f for f in fams if f not in FAMILIES]
    if bad:
        ap.error(f"--families: expected a subset of {FAMILIES}, got {bad}")
    opts.families = fams
    if not opts.dry_run and opts.repeats < 5:
        ap.error(f"--repeats: expected >= 5 on hardware (median of at least five runs), got {opts.repeats}")
    opts.parity_precision = None if opts.dry_run else "highest"
    return opts


def select(cases: list[Case], opts) -> tuple[list[Case], list[Case]]:
    """``(run, not selected)`` by ``--families`` and ``--only``."""
    only = {s.strip() for s in opts.only.split(",") if s.strip()}
    known = {c.name for c in cases} | {c.key for c in cases}
    unknown = sorted(only - known)
    if unknown:
        raise ValueError(f"--only: unknown configuration(s) {unknown}; known: {sorted(c.key for c in cases)}")
    run = [c for c in cases if c.family in opts.families and (not only or c.name in only or c.key in only)]
    return run, [c for c in cases if c not in run]


def _run_all(run: list[Case], report: dict, writer: Writer, state: dict, opts, t_start: float) -> None:
    print(f"hardware_check: {len(run)} of {len(report['configs'])} configurations on {report['meta']['device']} "
          f"(jax {jax.__version__}, flax {report['meta']['flax']}, dry run {opts.dry_run}); writing "
          f"{writer.json_path}", flush=True)
    if not opts.dry_run:
        report["ceilings"] = ceilings(opts)
        print(f"ceilings: {report['ceilings']}", flush=True)
    writer.write(report)
    by_key = {r["key"]: r for r in report["configs"]}
    stashes: dict[str, dict] = {c.key: {} for c in run}
    # pass 1: parity of every configuration (the compile check first: a run cut short still has it for
    # all); pass 2: timing (the dry run reuses pass 1's programs, kept in the stashes)
    for phase in ("parity", "timing"):
        for c in run:
            rec = by_key[c.key]
            if phase == "timing" and rec["status"] not in ("ok", "disagree"):
                continue
            if time.perf_counter() - t_start > opts.deadline_s:
                why = f"global deadline {opts.deadline_s:.0f} s reached"
                if phase == "timing":
                    rec["timing"] = {"skipped": why}
                    rec["status"] = "ok-partial" if rec["status"] == "ok" else rec["status"]
                else:
                    rec.update(status="skipped", reason=why)
                print(line(rec), flush=True)
                continue
            state["case"], state["phase"] = rec, phase
            if phase == "parity":
                rec["status"] = "running"
            t0 = time.perf_counter()
            try:
                (run_parity if phase == "parity" else run_timing)(c, opts, rec, stashes[c.key])
            except Exception as e:  # noqa: BLE001 -- a failure belongs to its configuration
                rec.update(status="error", reason=_error(e))
                if opts.verbose:
                    traceback.print_exc()
            rec[f"{phase}_elapsed_s"] = round(time.perf_counter() - t0, 2)
            state["case"] = None
            report["elapsed_s"] = time.perf_counter() - t_start
            writer.write(report)
            print(line(rec, phase), flush=True)
    report["finished"] = True
    report["elapsed_s"] = time.perf_counter() - t_start
    counts: dict[str, int] = {}
    for r in report["configs"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    report["status_counts"] = counts
    writer.write(report)
    print(markdown(report), flush=True)
    print(f"hardware_check: {counts} in {report['elapsed_s']:.0f} s; {writer.json_path}", flush=True)


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    opts = parse_args(argv)
    if opts.dry_run:
        jax.config.update("jax_platforms", "cpu")
    backend = jax.default_backend()
    if not opts.dry_run and backend != "gpu":
        raise SystemExit(f"hardware_check: expected a GPU backend, got {backend!r} (use --dry-run on a CPU)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dev = jax.devices()[0]
    cases = kernel_cases()   # imports attn_jax (and with it flax)
    import flax
    import jaxlib
    run, not_selected = select(cases, opts)
    report: dict[str, Any] = {
        "meta": dict(timestamp=stamp, dry_run=opts.dry_run, backend=backend,
                     device=getattr(dev, "device_kind", str(dev)), jax=jax.__version__,
                     jaxlib=getattr(jaxlib, "__version__", "?"), flax=getattr(flax, "__version__", "?"),
                     jax_pin="".join(JAX_PIN),
                     python=sys.version.split()[0], argv=sys.argv[1:] if argv is None else list(argv),
                     peak_bf16_dense_tflops=H200_BF16_DENSE_TFLOPS, peak_hbm_tbps=H200_HBM_TBPS,
                     deadline_s=opts.deadline_s, config_budget_s=opts.config_budget_s, repeats=opts.repeats,
                     parity_precision=opts.parity_precision or "default", timing=TIMING, tiny=TINY),
        "ceilings": {}, "configs": [], "finished": False,
    }
    for i, c in enumerate(cases):
        rec = dict(key=c.key, family=c.family, name=c.name, dtype=jnp.dtype(c.dtype).name, index=i, total=len(cases),
                   status="pending")
        if c in not_selected:
            rec.update(status="not-selected", reason="not selected (--only/--families)")
        report["configs"].append(rec)
    writer = Writer(opts.out, stamp)
    state = {"phase": "start", "case": None}

    def watchdog():
        with contextlib.suppress(Exception):
            rec = state["case"]
            if rec is not None:
                rec.update(status="killed", reason=f"watchdog: still in {state['phase']} {opts.grace_s:.0f} s after "
                                                   f"the deadline")
            report["elapsed_s"] = time.perf_counter() - t_start
            writer.write(report)
            print(f"hardware_check: watchdog ended the run; partial results in {writer.json_path}", flush=True)
        os._exit(3)

    timer = threading.Timer(max(1.0, opts.deadline_s + opts.grace_s - (time.perf_counter() - t_start)), watchdog)
    timer.daemon = True
    timer.start()
    try:
        _run_all(run, report, writer, state, opts, t_start)
    finally:
        timer.cancel()
    return report


if __name__ == "__main__":
    main()
