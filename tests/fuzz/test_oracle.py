"""The fuzzer's float64 oracle is itself checked: dense forward == the Python loop form, analytic
VJP == central finite differences (every input: q, k, v, bias, sinks; with softcap, sinks, GQA,
T != S, fully masked rows), the NaN rule, and the linear token loops against closed forms.
NumPy only (no XLA), cases drawn by the fuzzer's own strategies, derandomised."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import oracle
from tests.fuzz.strategies import mask_specs

FAST = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@st.composite
def small_problems(draw):
    B = draw(st.sampled_from([1, 2]))
    T, S = draw(st.sampled_from([1, 3, 6])), draw(st.sampled_from([1, 4, 7]))
    K = draw(st.sampled_from([1, 2]))
    H = K * draw(st.sampled_from([1, 2]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    Dk, Dv = 3, draw(st.sampled_from([2, 3]))
    p = dict(q=rng.standard_normal((B, T, H, Dk)) * 2, k=rng.standard_normal((B, S, K, Dk)),
             v=rng.standard_normal((B, S, K, Dv)), vis=oracle.visibility(draw(mask_specs(B, H, T, S)), B, H, T, S))
    p["bias"] = rng.standard_normal((1, H, T, S)) if draw(st.booleans()) else None
    p["sinks"] = rng.standard_normal(H) if draw(st.booleans()) else None
    p["softcap"] = draw(st.sampled_from([None, 1.5]))
    p["do"], p["dlse"] = rng.standard_normal((B, T, H, Dv)), rng.standard_normal((B, T, H))
    p["rng"] = rng
    return p


def _kw(p):
    return dict(bias=p["bias"], softcap=p["softcap"], sinks=p["sinks"])


@FAST
@given(small_problems())
def test_dense_oracle_equals_loop_form(p):
    o, lse = oracle.attention(p["q"], p["k"], p["v"], p["vis"], **_kw(p))
    o2, lse2 = oracle.attention_loop(p["q"], p["k"], p["v"], p["vis"], **_kw(p))
    np.testing.assert_allclose(o, o2, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse2))
    np.testing.assert_allclose(lse[np.isfinite(lse)], lse2[np.isfinite(lse2)], rtol=1e-12, atol=1e-12)


@FAST
@given(small_problems())
def test_analytic_vjp_equals_finite_differences(p):
    """<grad, u> == d/de L(x + e u) for L = sum(o do) + sum(lse dlse) (finite lse), every input."""
    kw = _kw(p)
    g = oracle.attention_vjp(p["q"], p["k"], p["v"], p["vis"], p["do"], p["dlse"], **kw)
    o, lse = oracle.attention(p["q"], p["k"], p["v"], p["vis"], **kw)
    finite = np.isfinite(lse)

    def loss(args):
        o, lse = oracle.attention(args["q"], args["k"], args["v"], p["vis"], bias=args["bias"],
                                  softcap=p["softcap"], sinks=args["sinks"])
        return float((o * p["do"]).sum() + np.where(finite, lse * p["dlse"], 0.0).sum())

    base = dict(q=p["q"], k=p["k"], v=p["v"], bias=p["bias"], sinks=p["sinks"])
    grads = dict(q=g["dq"], k=g["dk"], v=g["dv"], bias=None if p["bias"] is None else g["dbias"].sum(0, keepdims=True),
                 sinks=g["dsinks"])
    for name, x in base.items():
        if x is None:
            continue
        u = p["rng"].standard_normal(x.shape)
        fd = oracle.finite_difference(lambda e: loss(dict(base, **{name: x + e * u})), 0.0, 1.0, eps=1e-6)
        an = float((grads[name] * u).sum())
        assert abs(an - fd) <= 1e-6 * max(1.0, abs(fd)), f"d{name}: analytic {an} vs finite difference {fd}"


@FAST
@given(small_problems())
def test_oracle_nan_rule(p):
    """NaN/Inf in rows and columns no visible pair uses changes no output and no gradient."""
    rows, cols = oracle._used(p["vis"], p["k"].shape[2])
    bad = lambda x, used: np.where(used[..., None], x, np.resize([np.nan, np.inf, -np.inf], x.shape))  # noqa: E731
    q, k, v = bad(p["q"], rows), bad(p["k"], cols), bad(p["v"], cols)
    kw = _kw(p)
    clean = oracle.attention(p["q"], p["k"], p["v"], p["vis"], **kw)
    for a, b in zip(oracle.attention(q, k, v, p["vis"], **kw), clean):
        np.testing.assert_array_equal(a, b)
    g1 = oracle.attention_vjp(q, k, v, p["vis"], p["do"], p["dlse"], **kw)
    g0 = oracle.attention_vjp(p["q"], p["k"], p["v"], p["vis"], p["do"], p["dlse"], **kw)
    for n in ("dq", "dk", "dv", "dbias"):
        np.testing.assert_array_equal(g1[n], g0[n])


def test_oracle_masks_against_hand_written_cases():
    v = oracle.visibility
    np.testing.assert_array_equal(v({"kind": "causal", "offset": None}, 1, 1, 2, 3)[0, 0], [[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(v({"kind": "window", "left": 1, "right": 0, "offset": 0}, 1, 1, 3, 3)[0, 0],
                                  [[1, 0, 0], [1, 1, 0], [0, 1, 1]])
    np.testing.assert_array_equal(v({"kind": "window", "left": 0, "right": 2 ** 31 - 1, "offset": 0}, 1, 1, 3, 3)[0, 0],
                                  np.triu(np.ones((3, 3))))
    np.testing.assert_array_equal(v({"kind": "segments", "q": [[1, 0, 2]], "kv": None}, 1, 1, 3, 3)[0, 0],
                                  [[1, 0, 0], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(v({"kind": "chunked", "size": 2, "offset": -1}, 1, 1, 3, 3)[0, 0],
                                  [[0, 0, 0], [1, 1, 0], [1, 1, 0]])     # p = -1 is in chunk -1 (floor)
    either = {"kind": "or", "parts": [{"kind": "prefix", "n": 1, "offset": 0}, {"kind": "key_padding", "lengths": [0]}]}
    np.testing.assert_array_equal(v(either, 1, 1, 2, 2)[0, 0], [[1, 0], [1, 1]])
    np.testing.assert_allclose(oracle.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    np.testing.assert_allclose(oracle.alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


def test_linear_loops_against_closed_forms():
    """Token loops == the quadratic forms written independently: ungated o_i = scale q_i sum_{j<=i}
    k_j^T v_j per document (plus h0 in the first), decayed weights prod exp(g), and the delta rule
    with beta = 0 is linear attention over the initial state only."""
    rng = np.random.default_rng(0)
    B, T, H, Dk, Dv = 1, 7, 2, 3, 2
    q, k, v = rng.standard_normal((B, T, H, Dk)), rng.standard_normal((B, T, 1, Dk)), rng.standard_normal((B, T, 1, Dv))
    h0 = rng.standard_normal((B, H, Dk, Dv))
    seg = np.array([[1, 1, 0, 1, 2, 2, 0]])
    o, state = oracle.gated_loop(q, k, v, None, scale=0.5, initial_state=h0, segment_ids=seg)
    docs = {0: [0, 1, 3], 1: [0, 1, 3], 3: [0, 1, 3], 4: [4, 5], 5: [4, 5]}
    for i, ctx in docs.items():
        Sm = sum(np.outer(k[0, j, 0], v[0, j, 0]) for j in ctx if j <= i)
        for h in range(H):
            want = 0.5 * q[0, i, h] @ (Sm + (h0[0, h] if i < 4 else 0))
            np.testing.assert_allclose(o[0, i, h], want, rtol=1e-12)
    assert not o[0, 2].any() and not o[0, 6].any()
    np.testing.assert_allclose(state[0, 0], sum(np.outer(k[0, j, 0], v[0, j, 0]) for j in (4, 5)), rtol=1e-12)
    g = -rng.uniform(0.1, 1.0, (B, T, H))
    o, _ = oracle.gated_loop(q, k, v, g)
    G = np.cumsum(g[0, :, 0])
    want = sum(np.exp(G[T - 1] - G[j]) * (q[0, T - 1, 0] @ k[0, j, 0]) * v[0, j, 0] for j in range(T)) * Dk ** -0.5
    np.testing.assert_allclose(o[0, T - 1, 0], want, rtol=1e-12)
    o, _ = oracle.delta_loop(q, k, v, np.zeros((B, T, H)), initial_state=h0)
    np.testing.assert_allclose(o[0, :, 1], Dk ** -0.5 * q[0, :, 1] @ h0[0, 1], rtol=1e-12)
    fq, fk = oracle.elu_plus_one(q[0, :, 0]), oracle.elu_plus_one(k[0, :, 0])
    A = np.tril(fq @ fk.T)
    np.testing.assert_allclose(oracle.normalised_loop(q, k, v)[0, :, 0], (A @ v[0, :, 0]) / (A.sum(1) + 1e-6)[:, None],
                               rtol=1e-12)
