"""DeltaNet / Gated DeltaNet: every form against the token-by-token reference (values, final
state and VJPs), packed == per-document, prefill + decode == full forward, bf16, bad inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.core import testing as tk
import attn_jax as aj
from attn_jax.linear.delta_rule import DELTA, delta_rule, delta_rule_step, gated_delta_rule

IMPLS = ("reference", "recurrent", "parallel", "chunk")
GRAD_NAMES = ("dq", "dk", "dv", "dbeta", "dlog_alpha", "dh0")
F64_TOL = 1e-9

# XLA:CPU compile time dominates.  The fast level changes no result of these functions (checked
# against the default level in float64: rel-RMSE < 1e-15 with identical cotangents).


def _inputs(seed, *, B=2, T=37, H=4, K=2, Dk=12, Dv=20, dtype=jnp.float64, log_alpha_range=(-5.0, -1e-3),
            beta="sigmoid"):
    """(q, k, v, beta, log_alpha, h0); numpy RNG (eager jax.random would compile op by op)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, Dk))
    k = rng.standard_normal((B, T, K, Dk))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)                 # the caller normalises keys
    v = rng.standard_normal((B, T, K, Dv))
    if beta == "sigmoid":
        b = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, H))))
    else:                                                          # "extreme": beta near 0 and near 1
        b = np.where(rng.random((B, T, H)) < 0.5, 1e-3, 1.0 - 1e-3)
    lo, hi = log_alpha_range                                       # log-uniform strength in [lo, hi]
    la = -np.exp(rng.uniform(np.log(-hi), np.log(-lo), (B, T, H)))
    h0 = rng.standard_normal((B, H, Dk, Dv))
    if jnp.dtype(dtype) == jnp.float64:
        with tk.float64():
            return tuple(jnp.asarray(x, jnp.float64) for x in (q, k, v, b, la, h0))
    return tuple(jnp.asarray(x.astype(np.float32)).astype(dtype) for x in (q, k, v, b, la, h0))


def _fn(impl, gated, *, chunk_size=16, segment_ids=None, with_h0=True):
    def f(q, k, v, beta, log_alpha, h0):
        kw = dict(initial_state=h0 if with_h0 else None, return_final_state=True, segment_ids=segment_ids,
                  impl=impl, chunk_size=chunk_size)
        if gated:
            return gated_delta_rule(q, k, v, beta, log_alpha, **kw)
        return delta_rule(q, k, v, beta, **kw)
    return f


def _vjp_program(fn, primals, seed=42):
    """``(program, cotangents)``: ``program(primals, cotangents) -> (out, grads)`` compiled.

    Like ``tk.vjp_with_random_cotangent`` (a random normal cotangent on every output), but the
    cotangent is drawn by numpy outside the program: sampled inside, it is not bit-identical
    across differently compiled programs at the fast compile level, which would cost the float64
    comparisons their 1e-9.
    """
    out_shape = jax.eval_shape(fn, *primals)
    rng = np.random.default_rng(seed)
    cts = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), out_shape)

    def run(p, c):
        out, pullback = jax.vjp(fn, *p)
        return out, pullback(c)

    return _compile(run, primals, cts), cts


def _jit_vjp(fn, primals):
    program, cts = _vjp_program(fn, primals)
    return program(primals, cts)


def _compile(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` at the fast compile level."""
    return jax.jit(fn).lower(*args).compile(tk.FAST_COMPILE)


def _check_all_impls(primals, gated, *, with_h0=True, impls=None, **kw):
    """``impls`` (default recurrent, parallel and chunk) against the reference on o, the final state
    and every gradient, at the kit's tolerance of the inputs' dtype; returns the worst relative RMSE."""
    (o_r, s_r), g_r = _jit_vjp(_fn("reference", gated, with_h0=with_h0, **kw), primals)
    worst = 0.0
    for impl in impls or IMPLS[1:]:
        (o, s), g = _jit_vjp(_fn(impl, gated, with_h0=with_h0, **kw), primals)
        pairs = [("o", o, o_r, False), ("final_state", s, s_r, False)]
        pairs += [(n, x, y, True) for n, x, y in zip(GRAD_NAMES, g, g_r)
                  if (gated or n != "dlog_alpha") and (with_h0 or n != "dh0")]
        for name, x, y, grad in pairs:
            tk.assert_close(x, y, grad=grad, name=f"{impl} {name}")
            worst = max(worst, tk.rel_rmse(x, y))
    return worst


def _packed_ids(T=37):
    """Documents with padding runs before, between, inside and after them (row-major [2, T])."""
    if T == 37:
        r0 = [1] * 7 + [0] * 3 + [2] * 12 + [3] * 9 + [0] * 6
        r1 = [0] * 4 + [1] * 20 + [0] * 2 + [1] * 5 + [4] * 6       # padding inside document 1 is transparent
    else:                                                          # T == 100, chunk 32
        r0 = [1] * 30 + [0] * 5 + [2] * 40 + [3] * 25               # resets inside chunks
        r1 = [0] * 3 + [1] * 61 + [2] * 20 + [0] * 16               # a reset exactly on a chunk boundary
    return jnp.asarray([r0, r1], jnp.int32)


# ----------------------------------------------------------------------------- float64 parity
@pytest.mark.parametrize("gated,T,H,K,chunk,packed,with_h0,beta,la_range,impls", [
    # Gated DeltaNet, GQA, odd T over 3 chunks, packed, beta near 0/1, gates from -5 to -1e-3: every form
    (True, 37, 4, 2, 16, True, True, "extreme", (-5.0, -1e-3), None),
    # DeltaNet, T = 100 over 4 chunks, resets inside chunks and on a chunk boundary (the chunk form's case)
    (False, 100, 2, 2, 32, True, True, "sigmoid", None, ("chunk",)),
    # T < chunk (one padded chunk), MQA, strong gates, no initial state (the chunk form's case)
    (True, 9, 2, 1, 64, False, False, "sigmoid", (-5.0, -1.0), ("chunk",)),
])
def test_float64_parity(gated, T, H, K, chunk, packed, with_h0, beta, la_range, impls):
    """reference == recurrent == parallel == chunk: o, final state and every gradient (kit float64
    tolerance: rel-RMSE 1e-10, 2e-10 for gradients -- tighter than 1e-9).  Every form at moderate
    gates is also checked by tests/linear/test_catalog.py."""
    with tk.float64():
        primals = _inputs(T + H, T=T, H=H, K=K, beta=beta, log_alpha_range=la_range or (-1.0, -0.1))
        seg = _packed_ids(T) if packed else None
        worst = _check_all_impls(primals, gated, chunk_size=chunk, segment_ids=seg, with_h0=with_h0, impls=impls)
    assert worst <= F64_TOL
    print(f"float64 worst rel-RMSE {worst:.2e}")


# ----------------------------------------------------------------------------- float32 / bf16
def test_float32_parity_and_finite_under_strong_gates():
    """float32 chunk/parallel against the float64 reference on the same inputs, kit tolerances.

    Gates down to -20 per token make exp(G) underflow to zero within a chunk: no NaN/Inf may appear.
    """
    primals = _inputs(11, T=37, dtype=jnp.float32, log_alpha_range=(-20.0, -1e-3))
    with tk.float64():
        ref = tuple(x.astype(jnp.float64) for x in primals)
        (o_r, s_r), g_r = _jit_vjp(_fn("reference", True), ref)
    worst = 0.0
    for impl in ("chunk", "parallel"):
        (o, s), g = _jit_vjp(_fn(impl, True), primals)
        assert o.dtype == jnp.float32 and s.dtype == jnp.float32
        for name, a, b, grad in [("o", o, o_r, False), ("final_state", s, s_r, False),
                                 *[(n, a, b, True) for n, a, b in zip(GRAD_NAMES, g, g_r)]]:
            tk.assert_close(a, b.astype(jnp.float32), dtype="float32", grad=grad, name=f"{impl} {name}")
            worst = max(worst, tk.rel_rmse(a, b))
    print(f"float32 worst rel-RMSE {worst:.2e}")


def test_bfloat16_inputs():
    primals = _inputs(12, T=37, dtype=jnp.bfloat16)
    (o, s), g = _jit_vjp(_fn("chunk", True), primals)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    up = tuple(x.astype(jnp.float32) for x in primals)
    (o_r, s_r), g_r = _jit_vjp(_fn("reference", True), up)
    tk.assert_close(o, o_r, dtype="bfloat16", name="o")
    tk.assert_close(s, s_r, dtype="bfloat16", name="final_state")
    for name, a, b in zip(GRAD_NAMES, g, g_r):
        assert a.dtype == jnp.bfloat16, name
        tk.assert_close(a, b, dtype="bfloat16", grad=True, name=name)


# ----------------------------------------------------------------------------- packed == per document
def test_packed_equals_per_document():
    """Each document run alone (padding dropped; the first with the initial state) equals the packed run."""
    with tk.float64():
        q, k, v, b, la, h0 = _inputs(21, T=37)
        seg = _packed_ids()
        o, s = _compile(_fn("chunk", True, segment_ids=seg), q, k, v, b, la, h0)(q, k, v, b, la, h0)
        single = _fn("chunk", True)
        q, k, v, b, la, h0 = (np.asarray(x) for x in (q, k, v, b, la, h0))   # slice on the host
        ids = np.asarray(seg)
        for r in range(ids.shape[0]):
            valid = ids[r] != 0
            assert not np.asarray(o[r, ~valid]).any(), "padding output must be zero"
            docs = list(dict.fromkeys(ids[r][valid].tolist()))
            for i, d in enumerate(docs):
                pos = np.nonzero(ids[r] == d)[0]
                args = [jnp.asarray(x[r:r + 1, pos]) for x in (q, k, v, b, la)]
                args.append(jnp.asarray(h0[r:r + 1] if i == 0 else np.zeros_like(h0[r:r + 1])))
                o_d, s_d = _compile(single, *args)(*args)
                tk.assert_close(o[r:r + 1, pos], o_d, rel=F64_TOL, name=f"row {r} doc {d}")
                if i == len(docs) - 1:
                    tk.assert_close(s[r:r + 1], s_d, rel=F64_TOL, name=f"row {r} final state")


def test_nan_in_padding_does_not_leak():
    """NaN in every input at padding positions: same outputs and gradients as zeros there, and zero
    gradients at the padding positions."""
    primals = _inputs(25, B=2, T=20, H=2, K=1, dtype=jnp.float32)
    seg = np.asarray([[1] * 6 + [0] * 4 + [2] * 7 + [0] * 3, [0] * 2 + [1] * 18], np.int32)
    pad = seg == 0
    poison = lambda fill: tuple(jnp.asarray(np.where(pad.reshape(pad.shape + (1,) * (x.ndim - 2)), fill, x))
                                for x in map(np.asarray, primals[:5])) + primals[5:]
    fn = _fn("chunk", True, segment_ids=jnp.asarray(seg))
    clean, dirty = poison(0.0), poison(np.nan)
    program, cts = _vjp_program(fn, clean)
    (o_clean, _), g_clean = program(clean, cts)
    (o_dirty, _), g_dirty = program(dirty, cts)
    assert not np.asarray(o_dirty)[pad].any(), "padding output must be zero"
    tk.assert_close(o_dirty, o_clean, name="o")
    for name, a, b in zip(GRAD_NAMES, g_dirty, g_clean):
        tk.assert_close(a, b, grad=True, name=name)
        if name != "dh0":
            assert not np.asarray(a)[pad].any(), f"{name} at padding positions must be zero"


# ----------------------------------------------------------------------------- decode
def test_prefill_then_decode_equals_full():
    """chunk prefill of 21 tokens (two chunks of 16) with return_final_state, then delta_rule_step."""
    n_prefill = 21
    q, k, v, b, la, h0 = _inputs(31, T=30, dtype=jnp.float32)
    run = _fn("chunk", True)
    full_o, full_s = _compile(run, q, k, v, b, la, h0)(q, k, v, b, la, h0)
    pre = [x[:, :n_prefill] for x in (q, k, v, b, la)] + [h0]
    o_pre, state = _compile(run, *pre)(*pre)
    q, k, v, b, la = (np.asarray(x) for x in (q, k, v, b, la))
    step_args = lambda t, s: (q[:, t], k[:, t], v[:, t], b[:, t], la[:, t], s)
    step = _compile(lambda q_t, k_t, v_t, b_t, la_t, s: delta_rule_step(q_t, k_t, v_t, b_t, s, log_g_t=la_t),
                    *step_args(n_prefill, state))
    outs = [o_pre]
    for t in range(n_prefill, q.shape[1]):
        o_t, state = step(*step_args(t, state))
        outs.append(o_t[:, None])
    tk.assert_close(jnp.concatenate(outs, axis=1), full_o, name="prefill + decode vs full forward")
    tk.assert_close(state, full_s, name="decode final state")


# ----------------------------------------------------------------------------- misc invariants
def test_jit_matches_eager():
    q, k, v, b, la, h0 = _inputs(41, B=1, T=20, H=2, K=1, dtype=jnp.float32)
    tk.check_jit_matches_eager(_fn("chunk", True), q, k, v, b, la, h0)


def test_dispatch_and_explain():
    q, k, v, b, la, _ = _inputs(61, B=1, T=8, H=2, K=2, dtype=jnp.float32)
    assert DELTA.names() == ["chunk", "parallel", "recurrent", "reference"]
    assert aj.explain(gated_delta_rule, q, k, v, b, la, platform="cpu").chosen == {"cpu": "chunk"}
    assert aj.explain(delta_rule, q, k, v, b, impl="parallel", platform="tpu").chosen == {"tpu": "parallel"}


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_name_the_argument():
    q, k, v, b, la, h0 = _inputs(71, B=1, T=8, H=2, K=2, dtype=jnp.float32)
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, k, v, b[..., :1])
    with pytest.raises(TypeError, match="beta"):
        delta_rule(q, k, v, b.astype(jnp.int32))
    with pytest.raises(ValueError, match="log_g"):
        gated_delta_rule(q, k, v, b, jnp.zeros((1, 8, 2, 12)))
    with pytest.raises(ValueError, match="causal"):
        delta_rule(q, k, v, b, causal=False)
    with pytest.raises(ValueError, match="causal"):
        gated_delta_rule(q, k, v, b, la, causal=False)
    with pytest.raises(ValueError, match="initial_state"):
        delta_rule(q, k, v, b, initial_state=h0[:, :1])
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule(q, k, v, b, chunk_size=24)
    with pytest.raises(ValueError, match="impl"):
        delta_rule(q, k, v, b, impl="pallas")
    with pytest.raises(ValueError, match="beta_t"):
        delta_rule_step(q[:, 0], k[:, 0], v[:, 0], b[:, 0, :1], h0)
    with pytest.raises(ValueError, match="log_g_t"):
        delta_rule_step(q[:, 0], k[:, 0], v[:, 0], b[:, 0], h0, log_g_t=la[:, 0, :1])
