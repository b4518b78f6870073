"""Catalogue-wide invariants: every form a mechanism claims equals its reference (values and
gradients w.r.t. every input, float64), with packed segments and an initial state where it
claims them, in both directions it defines; outputs are causal; jit == eager."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import mixers
from attn_jax.core import testing as tk
from attn_jax.linear import catalog

SEG = np.array([[1] * 10 + [2] * 15 + [0] * 4 + [3] * 8,
                [0] * 3 + [5] * 34])
CASES = [(m.name, f) for m in catalog.CATALOG for f in m.forms]


def _kwargs(m, causal):
    kw = {"causal": causal}
    if m.segments:
        kw["segment_ids"] = jnp.asarray(SEG)
    return kw


def _grad_fn(m, impl, causal, x):
    names = sorted(x)
    kw = _kwargs(m, causal)

    def f(*arrays):
        d = dict(zip(names, arrays))
        init = d["h0"] if (m.initial_state and causal) else None
        return m.call(impl, d, initial_state=init, **kw)

    return jax.jit(f), [x[n] for n in names], names


@pytest.mark.parametrize("name,impl", CASES)
def test_form_matches_reference_float64(name, impl):
    m = catalog.get(name)
    with tk.float64():
        x = catalog.standard_inputs(jax.random.key(0), dtype=jnp.float64)
        for causal in [c for c, ok in ((True, m.causal), (False, m.noncausal)) if ok]:
            if impl == "recurrent" and not causal:
                continue
            f_ref, args, names = _grad_fn(m, "reference", causal, x)
            f_impl, _, _ = _grad_fn(m, impl, causal, x)
            o_ref, g_ref = tk.vjp_with_random_cotangent(f_ref, args, jax.random.key(1))
            o, g = tk.vjp_with_random_cotangent(f_impl, args, jax.random.key(1))
            tk.assert_close(o, o_ref, name=f"{name} {impl} causal={causal}")
            for n, a, b in zip(names, g, g_ref):
                tk.assert_close(a, b, grad=True, name=f"{name} {impl} causal={causal} d{n}")


@pytest.mark.parametrize("name", [m.name for m in catalog.CATALOG if m.causal])
def test_causal_and_jit_matches_eager(name):
    m = catalog.get(name)
    x = catalog.standard_inputs(jax.random.key(2), B=1, T=24)
    impl = m.forms[0] if m.forms else "reference"

    def fn(q, k, v):
        return m.call(impl, dict(x, q=q, k=k, v=v))

    tk.check_causality_by_perturbation(fn, x["q"], x["k"], x["v"])
    tk.check_jit_matches_eager(fn, x["q"], x["k"], x["v"])


@pytest.mark.parametrize("name", [m.name for m in catalog.CATALOG if m.mixer])
def test_mixer_is_registered(name):
    assert catalog.get(name).mixer in mixers.names()
