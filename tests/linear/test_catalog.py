"""Catalogue-wide invariants: every form a mechanism claims equals its reference (values and
gradients w.r.t. every input, float64), with packed segments and an initial state where it
claims them, in both directions it defines; outputs are causal; jit == eager.

Padding is transparent and NaN-safe: where a mechanism claims segments, every padding token
(id 0) of every time-indexed input (q, k, v, gates, beta) holds NaN, and every output and
gradient must still be finite, equal the reference's, and the gradient at padding be exactly 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import mixers
from attn_jax.core import testing as tk
from attn_jax.linear import catalog

SEG = np.array([[1] * 10 + [2] * 15 + [0] * 4 + [3] * 8,
                [0] * 3 + [5] * 34])


def _kwargs(m, causal):
    kw = {"causal": causal}
    if m.segments:
        kw["segment_ids"] = jnp.asarray(SEG)
    return kw


TIME_INDEXED = ("q", "k", "v", "log_g", "log_g_scalar", "beta")


def _nan_at_padding(x):
    """The standard inputs with NaN at every padding token (SEG == 0) of the time-indexed arrays."""
    pad = jnp.asarray(SEG == 0)
    return {n: (jnp.where(pad.reshape(pad.shape + (1,) * (a.ndim - 2)), jnp.nan, a) if n in TIME_INDEXED else a)
            for n, a in x.items()}


def _perturb_future(x, names, i):
    """The inputs with every time-indexed array changed after position ``i`` (the state is not)."""
    out = []
    for n in names:
        a = x[n]
        if n == "h0":
            out.append(a)
            continue
        noise = jax.random.normal(jax.random.key(len(out) + 3), a.shape, a.dtype)
        new = {"log_g": -jnp.abs(noise) - 0.01, "log_g_scalar": -jnp.abs(noise) - 0.01,
               "beta": jax.nn.sigmoid(noise)}.get(n, 3 * noise)
        out.append(a.at[:, i + 1:].set(new[:, i + 1:]))
    return out


@pytest.mark.parametrize("name", [m.name for m in catalog.CATALOG])
def test_every_form_matches_reference_float64(name):
    """One compiled program per direction: the reference and every claimed form, each with its
    VJP for the same random cotangent (w.r.t. every input array), plus (causal) the first claimed
    form on inputs whose future (after T/2) is perturbed: its causal prefix must not change."""
    m = catalog.get(name)
    with tk.float64():
        x = catalog.standard_inputs(jax.random.key(0), dtype=jnp.float64)
        if m.segments:
            x = _nan_at_padding(x)
        names = sorted(x)
        T = x["q"].shape[1]
        for causal in [c for c, ok in ((True, m.causal), (False, m.noncausal)) if ok]:
            impls = ["reference"] + [f for f in m.forms if causal or f != "recurrent"]
            kw = _kwargs(m, causal)

            def run(impl, *arrays):
                d = dict(zip(names, arrays))
                init = d["h0"] if (m.initial_state and causal) else None
                return m.call(impl, d, initial_state=init, **kw)

            @jax.jit
            def all_forms(cot, arrays, perturbed):
                out = {}
                for impl in impls:
                    o, vjp = jax.vjp(lambda *a, impl=impl: run(impl, *a), *arrays)
                    out[impl] = (o, vjp(cot))
                if causal:
                    out["perturbed"] = run(impls[1], *perturbed)
                return out

            shape = jax.eval_shape(lambda *a: run("reference", *a), *[x[n] for n in names])
            ct = jax.random.normal(jax.random.key(1), shape.shape, shape.dtype)
            res = all_forms(ct, [x[n] for n in names], _perturb_future(x, names, T // 2) if causal else None)
            o_ref, g_ref = res["reference"]
            if m.segments:  # the reference itself is NaN-safe, and padding gets exactly zero gradient
                tk.assert_close(o_ref, o_ref, name=f"{name} reference causal={causal} (NaN at padding)")
                for n, g in zip(names, g_ref):
                    tk.assert_close(g, g, name=f"{name} reference causal={causal} d{n} (NaN at padding)")
                    if n in TIME_INDEXED and np.any(np.asarray(g)[SEG == 0] != 0):
                        raise AssertionError(f"{name} reference causal={causal}: d{n} is non-zero at padding")
            for impl in impls[1:]:
                o, g = res[impl]
                tk.assert_close(o, o_ref, name=f"{name} {impl} causal={causal}")
                for n, a, b in zip(names, g, g_ref):
                    tk.assert_close(a, b, grad=True, name=f"{name} {impl} causal={causal} d{n}")
            if causal:
                o0 = res[impls[1]][0]
                tk.assert_close(res["perturbed"][:, : T // 2 + 1], o0[:, : T // 2 + 1],
                                name=f"{name} {impls[1]}: causal prefix after perturbing the future")
                assert not np.allclose(np.asarray(res["perturbed"][:, T // 2 + 1:]), np.asarray(o0[:, T // 2 + 1:])), \
                    f"{name}: perturbing the future changed nothing (the causality check would be vacuous)"


@pytest.mark.slow  # eager JAX compiles op by op (minutes for the whole catalogue on 2 cores)
@pytest.mark.parametrize("name", [m.name for m in catalog.CATALOG])
def test_jit_matches_eager(name):
    m = catalog.get(name)
    x = catalog.standard_inputs(jax.random.key(2), B=1, T=24)
    impl = m.forms[0] if m.forms else "reference"

    def fn(q, k, v):
        return m.call(impl, dict(x, q=q, k=k, v=v))

    tk.check_jit_matches_eager(fn, x["q"], x["k"], x["v"])


@pytest.mark.parametrize("name", [m.name for m in catalog.CATALOG if m.mixer])
def test_mixer_is_registered(name):
    assert catalog.get(name).mixer in mixers.names()
