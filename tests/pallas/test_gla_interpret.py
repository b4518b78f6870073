"""Chunked GLA Pallas kernels in interpret mode (CPU) against the token recurrence: values and VJPs.

The kernels (:mod:`pallas_kernels.chunked_gla`) run through their public entry with
``interpret=`` from :func:`pallas_kernels.testing.interpret_params` (TPU: ``pltpu.InterpretParams``
with race detection, NaN-filled uninitialised memory and raising out-of-bounds reads).  The
reference is a ``lax.scan`` over tokens evaluated in float64; outputs, final state and all
gradients (dq, dk, dv, dlog_g, dh0) are compared under random cotangents on both ``o`` and the
final state.  Interpret mode is slow: shapes are tiny and each test combines several features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.core import testing as tk
from pallas_kernels.chunked_gla import chunked_gla, unsupported_reasons
from pallas_kernels.chunked_gla.reference import gla_reference
from pallas_kernels.testing import interpret_params, tpu_race_check

PLATFORMS = ["gpu", "tpu"]
GRADS = ["dq", "dk", "dv", "dlog_g", "dh0"]

# XLA:CPU compile time dominates; the optimisation level does not change results.


def _log_gates(key, shape, kind):
    if kind == "mixed":       # per-step log gates log-uniform in [-5, -1e-3]: strong to weak
        return -jnp.exp(jax.random.uniform(key, shape, minval=np.log(1e-3), maxval=np.log(5.0)))
    if kind == "strong":      # -5 per step, some steps far stronger (exp(-40) ~ 4e-18)
        return jnp.where(jax.random.uniform(key, shape) < 0.1, -40.0, -5.0)
    if kind == "weak":
        return jnp.full(shape, -1e-3)
    raise ValueError(kind)


def _inputs(key, *, T, Dk, Dv, gates=("mixed", "strong", "weak"), scalar=False, h0=True, dtype=jnp.float32, B=1):
    """One head per gate regime in ``gates`` (so one kernel call covers strong and weak gates)."""
    H = len(gates)
    kq, kk, kv, kg, kh = jax.random.split(key, 5)
    q = jax.random.normal(kq, (B, T, H, Dk), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, H, Dk), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, H, Dv), jnp.float32).astype(dtype)
    shape = (B, T) if scalar else (B, T, Dk)
    lg = jnp.stack([_log_gates(kk_, shape, g) for kk_, g in zip(jax.random.split(kg, H), gates)], axis=2)
    h = jax.random.normal(kh, (B, H, Dk, Dv), jnp.float32) if h0 else None
    return q, k, v, lg.astype(jnp.float32), h


def _run(fn, primals, key, jit_opts=None):
    g = jax.jit(lambda p: tk.vjp_with_random_cotangent(fn, p, key))
    return g.lower(primals).compile(jit_opts)(primals)


def _check(platform, q, k, v, lg, h0, *, dtype=None, chunk_size=None, scale=None, block_v=None, segment_ids=None):
    """Kernel (interpret) vs float64 reference on o, final state and every gradient; returns rel-RMSEs."""
    has_h0 = h0 is not None

    def kern(q, k, v, lg, *h):
        return chunked_gla(q, k, v, lg, initial_state=h[0] if h else None, scale=scale, chunk_size=chunk_size,
                           block_v=block_v, platform=platform, interpret=interpret_params(platform),
                           segment_ids=segment_ids)

    def ref(q, k, v, lg, *h):
        return gla_reference(q, k, v, lg, initial_state=h[0] if h else None, scale=scale, segment_ids=segment_ids)

    primals = (q, k, v, lg, *((h0,) if has_h0 else ()))
    key = jax.random.key(42)
    with tpu_race_check() as races:
        (o, st), grads = jax.block_until_ready(_run(kern, primals, key, tk.FAST_COMPILE))
    assert not races.races_found, "TPU interpret mode detected a data race"
    assert platform != "tpu" or races.states, "race detection did not run"
    assert o.dtype == q.dtype and st.dtype == jnp.float32 and st.shape == (q.shape[0], q.shape[2], q.shape[3],
                                                                          v.shape[3])
    with tk.float64():
        p64 = tuple(np.asarray(x, np.float64) for x in primals)
        (ro, rst), rgrads = jax.tree.map(np.asarray, _run(ref, p64, key, tk.FAST_COMPILE))
    errs = {}
    tk.assert_close(o, ro, dtype=dtype, name="o")
    tk.assert_close(st, rst, dtype=dtype, name="final_state")
    errs["o"], errs["final_state"] = tk.rel_rmse(o, ro), tk.rel_rmse(st, rst)
    for name, g, rg in zip(GRADS, grads, rgrads):
        assert g.shape == rg.shape and g.dtype == primals[GRADS.index(name)].dtype, name
        # dlog_g sums O(T) terms of O(1): compare its max-abs error relative to its scale
        atol = None if name != "dlog_g" else tk.tolerance(dtype or g.dtype, grad=True)[1] * max(1.0, np.abs(rg).max())
        tk.assert_close(g, rg, dtype=dtype, grad=True, name=name, atol=atol)
        errs[name] = tk.rel_rmse(g, rg)
    # heads hold different gate regimes: also hold each head to the tolerance on its own scale
    for h in range(q.shape[2]):
        for name, x, r in (("o", o, ro), ("final_state", st, rst), ("dlog_g", grads[3], rgrads[3])):
            xh, rh = (x[:, h], r[:, h]) if name == "final_state" else (x[:, :, h], r[:, :, h])
            scale_ = max(1.0, np.abs(np.asarray(rh, np.float64)).max())
            tk.assert_close(xh, rh, dtype=dtype, grad=name == "dlog_g", name=f"{name}[head {h}]",
                            atol=tk.tolerance(dtype or xh.dtype, grad=name == "dlog_g")[1] * scale_)
    return errs


@pytest.mark.parametrize("platform", PLATFORMS)
def test_vector_gates_odd_T_dk_ne_dv_h0(platform):
    """Per-channel gates (heads: mixed / strong / weak), T = 37 (padded to chunk multiples),
    Dk = 16 != Dv = 32, nonzero h0; on GPU two Dv tiles (partial dq / dk sums across programs)."""
    q, k, v, lg, h0 = _inputs(jax.random.key(0), T=37, Dk=16, Dv=32)
    _check(platform, q, k, v, lg, h0, block_v=16 if platform == "gpu" else None)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_scalar_gates_multi_chunk_h0(platform):
    """Scalar gates [B, T, H] (RetNet / Mamba-2 path; heads: mixed / strong / weak), T = 45 in
    chunks of 16, Dk = 32 != Dv = 16, nonzero h0, explicit scale."""
    q, k, v, lg, h0 = _inputs(jax.random.key(1), T=45, Dk=32, Dv=16, scalar=True)
    _check(platform, q, k, v, lg, h0, chunk_size=16, scale=0.3)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bf16_zero_state(platform):
    """bfloat16 inputs (float32 accumulation), default chunking, no initial state."""
    q, k, v, lg, _ = _inputs(jax.random.key(2), T=40, Dk=32, Dv=32, gates=("mixed", "strong"), h0=False,
                             dtype=jnp.bfloat16)
    _check(platform, q, k, v, lg, None, dtype=jnp.bfloat16)


# Packed documents (T = 40 in chunks of 16): row 0 has documents starting mid-chunk (t=10) and at a
# chunk boundary (t=16), padding inside a document (t=23..25, the document continues after it), a
# document starting mid-chunk after padding (t=28) and trailing padding; row 1 is one document
# after leading padding (so h0 reaches its final state).
SEGMENTS = np.array([[1] * 10 + [2] * 6 + [3] * 7 + [0] * 3 + [3] * 2 + [4] * 10 + [0] * 2,
                     [0] * 5 + [9] * 35], np.int32)


# 5-15 s each in interpret mode: the GPU kernel with vector gates runs by default, the rest under -m slow
@pytest.mark.parametrize("platform,scalar", [
    ("gpu", False),
    *[pytest.param(p, s, marks=pytest.mark.slow) for p, s in ((p, s) for p in PLATFORMS for s in (False, True))
      if (p, s) != ("gpu", False)],
])
def test_packed_segments_h0(platform, scalar):
    """segment_ids: state resets at document starts, padding transparent, h0 only in the first
    document; o, final state and every gradient against the float64 scan reference with the
    same segments (itself checked against the attn_jax engine below)."""
    q, k, v, lg, h0 = _inputs(jax.random.key(3), T=40, Dk=16, Dv=16, gates=("mixed", "strong"), scalar=scalar, B=2)
    _check(platform, q, k, v, lg, h0, chunk_size=16, segment_ids=jnp.asarray(SEGMENTS))


@pytest.mark.slow  # float64 compile of the engine's chunk form under vjp dominates (~15-20 s)
@pytest.mark.parametrize("scalar", [False, True], ids=["vector", "scalar"])
def test_reference_segments_match_the_engine_chunk_form(scalar):
    """``gla_reference(segment_ids=...)`` agrees with ``attn_jax``'s XLA chunk form on packed
    segments (values and all gradients), so the kernel tests above check the engine's semantics."""
    from attn_jax.linear import gated_linear_attention

    q, k, v, lg, h0 = _inputs(jax.random.key(4), T=40, Dk=8, Dv=8, gates=("mixed", "strong"), scalar=scalar, B=2)
    seg = jnp.asarray(SEGMENTS)
    eng = lambda q, k, v, lg, h: gated_linear_attention(q, k, v, lg, initial_state=h, segment_ids=seg, scale=0.5,
                                                        return_final_state=True, impl="chunk", chunk_size=16)
    ref = lambda q, k, v, lg, h: gla_reference(q, k, v, lg, initial_state=h, segment_ids=seg, scale=0.5)
    with tk.float64():
        p64 = tuple(np.asarray(x, np.float64) for x in (q, k, v, lg, h0))
        key = jax.random.key(7)
        (ro, rst), rg = _run(ref, p64, key)
        (eo, est), eg = _run(eng, p64, key)
    tk.assert_close(eo, ro, name="o")
    tk.assert_close(est, rst, name="final_state")
    for name, a, b in zip(GRADS, eg, rg):
        tk.assert_close(a, b, grad=True, name=name)


# ----------------------------------------------------------------------------- cheap unit tests


def test_reference_matches_closed_form():
    """The scan reference equals o_t = scale sum_{j<=t} (q_t * exp(L_t - L_j)) . k_j v_j + scale (q_t * exp(L_t)) h0."""
    q, k, v, lg, h0 = _inputs(jax.random.key(5), T=12, Dk=4, Dv=3, gates=("mixed", "weak"))
    with tk.float64():
        q, k, v, lg, h0 = (np.asarray(x, np.float64) for x in (q, k, v, lg, h0))
        o, st = gla_reference(q, k, v, lg, initial_state=h0, scale=0.5)
        L = np.cumsum(lg, axis=1)                                       # [B, T, H, Dk]
        dec = np.exp(L[:, :, None] - L[:, None, :])                     # [B, t, j, H, Dk]
        causal = np.tril(np.ones((12, 12)))[None, :, :, None]
        A = np.einsum("bthd,btjhd,bjhd->bhtj", q, dec, k) * np.moveaxis(causal, 3, 1)
        ro = 0.5 * (np.einsum("bhtj,bjhe->bthe", A, v) + np.einsum("bthd,bhde->bthe", q * np.exp(L), h0))
        rst = np.einsum("bjhd,bjhe->bhde", k * np.exp(L[:, -1:] - L), v) + np.exp(L[:, -1])[..., None] * h0
        tk.assert_close(o, ro, name="o")
        tk.assert_close(st, rst, name="state")


def test_unsupported_reasons_and_errors():
    S = jax.ShapeDtypeStruct
    q, v, g = S((1, 64, 2, 64), jnp.float32), S((1, 64, 2, 64), jnp.float32), S((1, 64, 2), jnp.float32)
    assert unsupported_reasons(q, q, v, g, platform="cuda") == []
    assert unsupported_reasons(q, q, v, g, platform="tpu") == []
    assert any("head dim" in r for r in unsupported_reasons(S((1, 64, 2, 8), jnp.float32), q, v, g, platform="tpu"))
    assert any("Dv=512" in r for r in unsupported_reasons(q, q, S((1, 64, 2, 512), jnp.float32), g, platform="gpu"))
    assert any("float16" in r for r in unsupported_reasons(*(S((1, 64, 2, 64), jnp.float16),) * 3, g,
                                                           platform="gpu"))
    assert any("power of two" in r for r in unsupported_reasons(q, q, v, g, chunk_size=48, platform="gpu"))
    bf = S((1, 64, 2, 64), jnp.bfloat16)
    assert any("multiple of 16" in r for r in unsupported_reasons(bf, bf, bf, g, chunk_size=24, platform="tpu"))
    assert unsupported_reasons(q, q, v, g, chunk_size=24, platform="tpu") == []
    assert any("platform" in r for r in unsupported_reasons(q, q, v, g, platform="cpu"))
    x = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="log_g"):
        chunked_gla(x, x, x, jnp.zeros((1, 8, 2, 8)), platform="gpu")
    with pytest.raises(ValueError, match="initial_state"):
        chunked_gla(x, x, x, jnp.zeros((1, 8, 2)), initial_state=jnp.zeros((1, 2, 16, 8)), platform="gpu")
    with pytest.raises(ValueError, match="head dim"):
        chunked_gla(*(jnp.zeros((1, 8, 2, 8)),) * 3, jnp.zeros((1, 8, 2)), platform="tpu")
