"""The exact reference against an independent float64 NumPy einsum and against jax.nn."""

import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import random as aj_random
from attn_jax.core.testing import (assert_close, check_causality, check_deterministic, check_jit_matches_eager,
                                   check_packed_equals_padded, compiled, compiled_vjp, fast_jit, float64,
                                   random_qkv_compiled, random_segment_ids, vjp_with_random_cotangent)
from attn_jax.positional import ALiBi, alibi_slopes


def numpy_attention(q, k, v, *, visible=None, bias=None, scale=None, softcap=None, sinks=None, keep=None,
                    rate=0.0):
    """Float64 NumPy attention written from the definition, with explicit K/V repeat for GQA."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    k = np.repeat(k, H // K, axis=2)
    v = np.repeat(v, H // K, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * (D ** -0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    vis = np.ones(s.shape, bool) if visible is None else np.broadcast_to(np.asarray(visible), s.shape)
    s = np.where(vis, s, -np.inf)
    cols = [s]
    if sinks is not None:
        cols.append(np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None], (B, H, T, 1)))
    allv = np.concatenate(cols, axis=-1)
    m = allv.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(allv - m)
    denom = e.sum(-1, keepdims=True)
    p = np.where(denom > 0, e / np.where(denom > 0, denom, 1), 0)[..., :S]
    if keep is not None:
        p = np.where(keep, p / (1 - rate), 0)
    o = np.einsum("bhts,bshd->bthd", p, v)
    lse = np.where(denom[..., 0] > 0, m[..., 0] + np.log(np.where(denom[..., 0] > 0, denom[..., 0], 1)), -np.inf)
    return o, lse.transpose(0, 2, 1)


KEY = jax.random.key(0)

# Tests run jitted (one XLA program per configuration, fast-compiled unless a tight float64 check
# needs the default options): eager op-by-op dispatch compiles every primitive at every shape
# separately and dominated the runtime.  Inputs come from one fast-compiled random_qkv per shape.
_random_qkv = random_qkv_compiled

CASES = {
    "plain": dict(),
    "causal": dict(mask=masks.causal()),
    "causal_T_lt_S": dict(T=5, S=11, mask=masks.causal()),
    "causal_T_gt_S": dict(T=9, S=4, mask=masks.causal()),
    "window": dict(mask=masks.sliding_window(3, 1)),
    "chunked_causal": dict(mask=masks.chunked(4) & masks.causal()),
    "prefix": dict(mask=masks.prefix_lm(5)),
    "gqa": dict(H=4, K=2, mask=masks.causal()),
    "mqa": dict(H=4, K=1),
    "dk_ne_dv": dict(Dk=12, Dv=20, mask=masks.causal()),
    "odd": dict(T=7, S=13, Dk=5, Dv=3),
    "t1": dict(T=1, S=9, mask=masks.causal()),
    "softcap": dict(softcap=2.0, scale=0.9),
    "sinks": dict(sinks=True, mask=masks.causal()),
    "bias": dict(bias=(1, 4, 10, 10)),
    "bias_b": dict(bias=(2, 1, 10, 10), mask=masks.sliding_window(2)),
}


def build(case):
    c = dict(case)
    B, T, S = 2, c.pop("T", 10), c.pop("S", None)
    H, K = c.pop("H", 4), c.pop("K", None)
    Dk, Dv = c.pop("Dk", 8), c.pop("Dv", None)
    q, k, v = _random_qkv(KEY, B=B, T=T, S=S, H=H, K=K, Dk=Dk, Dv=Dv, dtype=jnp.float64)
    if c.get("sinks"):
        c["sinks"] = fast_jit(lambda: jax.random.normal(jax.random.key(3), (H,), jnp.float64))()
    if "bias" in c:
        shape = c["bias"]
        c["bias"] = fast_jit(lambda: jax.random.normal(jax.random.key(4), shape, jnp.float64))()
    return q, k, v, c


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_numpy_float64(name):
    with float64():
        q, k, v, kw = build(CASES[name])
        m = kw.get("mask")

        def f(q, k, v):
            o, lse = aj.attention(q, k, v, impl="reference", return_lse=True, **kw)
            return o, lse, (None if m is None else m.materialize(q.shape[1], k.shape[1]))

        o, lse, vis = jax.jit(f)(q, k, v)
        o_np, lse_np = numpy_attention(q, k, v, visible=vis, bias=kw.get("bias"), scale=kw.get("scale"),
                                       softcap=kw.get("softcap"), sinks=kw.get("sinks"))
        assert_close(o, o_np, dtype="float64", name="output")
        assert_close(lse, lse_np, dtype="float64", name="lse")


@pytest.mark.parametrize("name", ["plain", "causal", "gqa", "softcap", "sinks", "bias", "window", "dk_ne_dv"])
def test_reference_gradients_match_finite_differences(name):
    with float64():
        q, k, v, kw = build(CASES[name])
        extra = {n: kw.pop(n) for n in ("bias", "sinks") if n in kw}

        def f(q, k, v, *arrays):
            named = dict(zip(extra, arrays))
            o, lse = aj.attention(q, k, v, impl="reference", return_lse=True, **kw, **named)
            return (o * jnp.cos(o)).sum() + jnp.where(jnp.isfinite(lse), lse, 0).sum() * 0.3

        args = (q, k, v, *extra.values())
        jax.test_util.check_grads(jax.jit(f), args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)


def _jax_nn_compatible(name):
    return name in ("plain", "causal", "gqa", "mqa", "bias", "window")


@pytest.mark.parametrize("name", [n for n in CASES if _jax_nn_compatible(n)])
def test_reference_matches_jax_nn(name):
    q, k, v, kw = build(CASES[name])

    def both(q, k, v, kw):
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        if "bias" in kw:
            kw["bias"] = kw["bias"].astype(jnp.float32)
        jkw = {}
        m = kw.get("mask")
        if m is not None:
            jkw["mask"] = m.materialize(q.shape[1], k.shape[1])
        if "bias" in kw:
            jkw["bias"] = kw["bias"]

        def ours(q, k, v):
            return aj.attention(q, k, v, impl="reference", **kw)

        def theirs(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, implementation="xla", **jkw)

        return (vjp_with_random_cotangent(ours, (q, k, v), jax.random.key(9)),
                vjp_with_random_cotangent(theirs, (q, k, v), jax.random.key(9)))

    (o1, g1), (o2, g2) = fast_jit(both)(q, k, v, kw)
    assert_close(o1, o2, name="output vs jax.nn")
    for n, a, b in zip("qkv", g1, g2):
        assert_close(a, b, grad=True, name=f"d{n} vs jax.nn")


def test_fully_masked_rows_zero_output_zero_finite_grads():
    q, k, v = _random_qkv(KEY, B=2, T=6, H=2, Dk=8)
    lengths = jnp.array([0, 4], jnp.int32)  # row 0 sees no key at all
    m = masks.key_padding(lengths) & masks.causal()

    def f(q, k, v):
        o, lse = aj.attention(q, k, v, mask=m, impl="reference", return_lse=True)
        return o, lse

    (o, lse), grads = compiled_vjp(f, (q, k, v), jax.random.key(1))
    assert np.all(np.asarray(o[0]) == 0)
    assert np.all(np.isneginf(np.asarray(lse[0])))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[0][0]) == 0) and np.all(np.asarray(grads[1][0]) == 0)
    assert np.all(np.asarray(grads[2][0]) == 0)


def test_fully_masked_row_with_sinks_is_zero_with_finite_lse():
    q, k, v = _random_qkv(KEY, B=1, T=5, S=3, H=2, Dk=8)
    sinks = jnp.array([0.5, -1.0])
    o, lse = compiled(aj.attention, q, k, v, mask=masks.causal(), sinks=sinks, impl="reference", return_lse=True)
    assert np.all(np.asarray(o[0, :2]) == 0)  # T > S: first two queries see no key
    np.testing.assert_allclose(np.asarray(lse[0, :2]), np.broadcast_to(np.asarray(sinks), (2, 2)), rtol=1e-6)


def test_nan_in_padded_keys_values_and_queries_does_not_leak():
    q, k, v = _random_qkv(KEY, B=2, T=8, H=2, Dk=8)
    ids = jnp.array([[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]], jnp.int32)
    pad = np.asarray(ids == 0)[:, :, None, None]
    qn, kn, vn = (np.where(pad, np.nan, np.asarray(x)) for x in (q, k, v))

    def f(q, k, v):
        return aj.attention(q, k, v, mask=masks.segments(ids) & masks.causal(), impl="reference")

    o, grads = compiled_vjp(f, (qn, kn, vn), jax.random.key(2))
    assert not np.isnan(np.asarray(o)).any()
    for g in grads:
        assert not np.isnan(np.asarray(g)).any()
    assert np.all(np.asarray(o)[np.asarray(ids) == 0] == 0)
    o_clean = compiled(f, q, k, v)
    assert_close(o, o_clean, name="NaN-padded vs clean")


def test_dropout_matches_numpy_with_the_same_keep_mask():
    q, k, v = _random_qkv(KEY, B=2, T=7, S=9, H=2, Dk=8)
    rng = jax.random.key(11)
    rate = 0.3
    b, h, i, j = np.ix_(np.arange(2), np.arange(2), np.arange(7), np.arange(9))

    def run(q, k, v):
        o = aj.attention(q, k, v, dropout_rate=rate, dropout_rng=rng, impl="reference")
        seed = aj_random.dropout_seed(rng)
        keep = aj_random.keep_mask(seed, rate, b, h, i, j)
        o2 = aj.attention(q, k, v, dropout_rate=rate, dropout_rng=jax.random.key(12), impl="reference")
        return o, keep, jnp.abs(o - o2).max()

    o, keep, diff = fast_jit(run)(q, k, v)
    keep = np.asarray(keep)
    assert 0.55 < keep.mean() < 0.85  # ~ 1 - rate
    o_np, _ = numpy_attention(q, k, v, keep=keep, rate=rate)
    assert_close(o, o_np, dtype="float32", name="dropout output")
    assert float(diff) > 1e-3  # a different key drops different entries


def test_dropout_keep_rate_statistics():
    def run():
        seed = aj_random.dropout_seed(jax.random.key(5))
        keep = aj_random.keep_mask(seed, 0.1, 0, jnp.arange(4)[:, None, None], jnp.arange(128)[None, :, None],
                                   jnp.arange(128)[None, None, :])
        return keep, keep.mean()

    keep, frac = compiled(run)
    frac = float(frac)
    assert abs(frac - 0.9) < 0.01, frac
    # Neighbouring entries are not correlated (a weak hash would show runs).
    k = np.asarray(keep, np.float64)
    corr = np.corrcoef(k[..., :-1].ravel(), k[..., 1:].ravel())[0, 1]
    assert abs(corr) < 0.02, corr


def test_alibi_structured_bias_equals_dense():
    q, k, v = _random_qkv(KEY, B=1, T=6, S=9, H=4, Dk=8)
    ab = ALiBi(alibi_slopes(4))

    def run(q, k, v, ab):
        o1 = aj.attention(q, k, v, bias=ab, mask=masks.causal(), impl="reference")
        o2 = aj.attention(q, k, v, bias=ab.materialize(6, 9), mask=masks.causal(), impl="reference")
        return o1, o2

    o1, o2 = fast_jit(run)(q, k, v, ab)
    assert_close(o1, o2, name="ALiBi object vs dense")


def test_bf16_and_fp16_close_to_fp32():
    q, k, v = _random_qkv(KEY, B=2, T=16, H=4, Dk=16)
    dts = (jnp.bfloat16, jnp.float16)

    def run(q, k, v):
        ref = aj.attention(q, k, v, mask=masks.causal(), impl="reference")
        return ref, [aj.attention(q.astype(dt), k.astype(dt), v.astype(dt), mask=masks.causal(), impl="reference")
                     for dt in dts]

    ref, outs = fast_jit(run)(q, k, v)
    for dt, o in zip(dts, outs):
        assert o.dtype == dt
        assert_close(o, ref, dtype=dt, name=f"{jnp.dtype(dt).name} output")


def test_merge_attention_is_exact():
    q, k, v = _random_qkv(KEY, B=2, T=5, S=12, H=2, Dk=8)

    def run(q, k, v):
        full, lse = aj.attention(q, k, v, impl="reference", return_lse=True)
        parts = [aj.attention(q, k[:, a:b], v[:, a:b], impl="reference", return_lse=True) for a, b in
                 ((0, 4), (4, 9), (9, 12))]
        merged, mlse = aj.merge_attention(parts, return_lse=True)
        # A part with no visible key (lse = -inf) contributes nothing.
        empty = aj.attention(q, k[:, :3], v[:, :3], mask=masks.key_padding(jnp.zeros(2, jnp.int32)),
                             impl="reference", return_lse=True)
        return full, lse, merged, mlse, aj.merge_attention(parts + [empty]), aj.merge_attention([empty, empty])

    full, lse, merged, mlse, merged_empty, o0 = fast_jit(run)(q, k, v)
    assert_close(merged, full, name="merged output")
    assert_close(mlse, lse, name="merged lse")
    assert_close(merged_empty, full, name="merge with an empty part")
    assert np.all(np.asarray(o0) == 0)


_causal_jit = fast_jit(lambda q, k, v: aj.attention(q, k, v, mask=masks.causal(), impl="reference"))


def test_invariants_of_the_reference():
    q, k, v = _random_qkv(KEY, B=2, T=12, H=2, Dk=8)
    causal = lambda q, k, v: aj.attention(q, k, v, mask=masks.causal(), impl="reference")
    # Causality and packing run one compiled program per sequence length, on NumPy inputs and
    # outputs (eager slicing would compile a slice per position); determinism and jit-vs-eager
    # keep the eager path (check_jit_matches_eager compares against it on purpose).
    causal_np = lambda q, k, v: np.asarray(_causal_jit(q, k, v))
    qn, kn, vn = (np.asarray(x) for x in (q, k, v))
    check_causality(causal_np, qn, kn, vn)
    check_deterministic(causal, q, k, v)
    check_jit_matches_eager(causal, q, k, v)
    ids = random_segment_ids(jax.random.key(3), 2, 12, max_segments=3)
    packed = fast_jit(lambda q, k, v, ids: aj.attention(q, k, v, mask=masks.segments(ids) & masks.causal(),
                                                        impl="reference"))
    check_packed_equals_padded(lambda *a: np.asarray(packed(*a)), causal_np, qn, kn, vn, ids)


def test_vmap_over_an_extra_axis():
    q, k, v = _random_qkv(KEY, B=2, T=6, H=2, Dk=8)
    f = lambda q, k, v: aj.attention(q, k, v, mask=masks.causal(), impl="reference")

    def run(q, k, v):
        stacked = jax.vmap(f)(jnp.stack([q, q * 2]), jnp.stack([k, k]), jnp.stack([v, -v]))
        return stacked[1], f(q * 2, k, -v)

    a, b = fast_jit(run)(q, k, v)
    assert_close(a, b, name="vmap slice")
