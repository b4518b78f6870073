"""The gated linear-attention engine: reference ⇄ recurrent ⇄ parallel ⇄ chunk on values and on
every gradient (dq, dk, dv, dlog_g, dh0), with segments, initial state, GQA, odd sizes, weak to
strong gates; decode; the scalar-decay mechanisms built on it; bad input.  Non-causal forms and
causality are checked for every mechanism by tests/linear/test_catalog.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import linear
from attn_jax.core import testing as tk

def _inputs(key, B=2, T=37, H=4, K=2, Dk=12, Dv=20, gate="vector", strength=1.0, dtype=jnp.float64):
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (B, T, H, Dk), dtype)
    k = jax.random.normal(ks[1], (B, T, K, Dk), dtype)
    v = jax.random.normal(ks[2], (B, T, K, Dv), dtype)
    shape = {"none": None, "scalar": (B, T, H), "vector": (B, T, H, Dk)}[gate]
    g = None if shape is None else (-strength * jax.random.uniform(ks[3], shape, dtype, 0.05, 1.0))
    h0 = jax.random.normal(ks[4], (B, H, Dk, Dv), dtype)
    return q, k, v, g, h0


SEG = np.array([[1] * 10 + [2] * 15 + [0] * 4 + [3] * 8,
                [0] * 3 + [5] * 34])


def _run(impl, segment_ids, with_h0=True, chunk_size=16):
    def f(q, k, v, g, h0):
        return linear.gated_linear_attention(q, k, v, g, initial_state=h0 if with_h0 else None,
                                             return_final_state=True, segment_ids=segment_ids, impl=impl,
                                             chunk_size=chunk_size)
    return jax.jit(f)


@pytest.mark.parametrize("gate,strength", [("scalar", 5.0), ("vector", 1e-3), ("vector", 5.0)])
def test_chunk_agrees_weak_to_strong_gates_float64(gate, strength):
    """Every form at moderate gates is covered by tests/linear/test_catalog.py; here the chunk
    form (the one with exponent bookkeeping) meets weak and strong gates."""
    with tk.float64():
        q, k, v, g, h0 = _inputs(jax.random.key(1), gate=gate, strength=strength)
        seg = jnp.asarray(SEG)
        args = (q, k, v, g, h0)
        ref_out, ref_grads = tk.vjp_with_random_cotangent(_run("reference", seg), args, jax.random.key(2))
        for impl in ("chunk",):
            out, grads = tk.vjp_with_random_cotangent(_run(impl, seg), args, jax.random.key(2))
            tk.assert_close(out[0], ref_out[0], name=f"{impl} o")
            tk.assert_close(out[1], ref_out[1], name=f"{impl} final state")
            for name, a, b in zip(("dq", "dk", "dv", "dlog_g", "dh0"), grads, ref_grads):
                if b is None:
                    assert a is None
                    continue
                tk.assert_close(a, b, grad=True, name=f"{impl} {name}")


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_chunk_float32_matches_float64_reference(gate):
    q, k, v, g, h0 = _inputs(jax.random.key(3), B=1, T=100, H=2, K=2, Dk=16, Dv=16, gate=gate, strength=2.0,
                             dtype=jnp.float32)
    o, s = _run("chunk", None, chunk_size=64)(q, k, v, g, h0)
    with tk.float64():
        ref_o, ref_s = _run("reference", None)(*(x.astype(jnp.float64) for x in (q, k, v, g, h0)))
    tk.assert_close(o, ref_o, dtype=jnp.float32, name="o")
    tk.assert_close(s, ref_s, dtype=jnp.float32, name="state")


_reference_alone = jax.jit(lambda q, k, v, g, h: linear.gated_linear_attention(q, k, v, g, initial_state=h,
                                                                               impl="reference"))


def test_segments_equal_per_document_loop():
    """Packed rows == each document run alone (the first with the initial state, padding skipped)."""
    with tk.float64():
        q, k, v, g, h0 = _inputs(jax.random.key(4), gate="vector", strength=0.5)
        o, _ = _run("chunk", jnp.asarray(SEG))(q, k, v, g, h0)
        for b in range(SEG.shape[0]):
            ids = SEG[b]
            starts = [t for t in range(len(ids)) if ids[t] and (t == 0 or ids[t] != ids[t - 1])]
            np.testing.assert_array_equal(np.asarray(o[b, ids == 0]), 0.0)
            for n, s in enumerate(starts):
                e = s
                while e < len(ids) and ids[e] == ids[s]:
                    e += 1
                sl = slice(s, e)
                h = h0[b:b + 1] if n == 0 else None
                single, _ = _reference_alone(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl], g[b:b + 1, sl], h)
                tk.assert_close(o[b:b + 1, sl], single, name=f"row {b} doc {n}")


def test_prefill_then_decode_equals_full():
    q, k, v, g, h0 = _inputs(jax.random.key(6), B=2, T=20, gate="vector", strength=1.0, dtype=jnp.float32)
    gla = jax.jit(linear.gla, static_argnames=("return_final_state",))
    full, _ = gla(q, k, v, g, initial_state=h0)
    n = 13
    o1, state = gla(q[:, :n], k[:, :n], v[:, :n], g[:, :n], initial_state=h0, return_final_state=True)
    step = jax.jit(linear.recurrent_step)
    outs = [o1]
    for t in range(n, 20):
        o_t, state = step(q[:, t], k[:, t], v[:, t], g[:, t], state)
        outs.append(o_t[:, None])
    tk.assert_close(jnp.concatenate(outs, axis=1), full, name="prefill + decode")


def test_bf16_in_bf16_out():
    q, k, v, g, h0 = _inputs(jax.random.key(8), B=1, T=40, gate="vector", dtype=jnp.float32)
    gla = jax.jit(linear.gla, static_argnames=("return_final_state",))
    o32, _ = gla(q, k, v, g)
    o16, s16 = gla(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), g,
                   return_final_state=True)
    assert o16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
    tk.assert_close(o16, o32, dtype=jnp.bfloat16)


def test_vmap_and_grad_of_chunk():
    q, k, v, g, _ = _inputs(jax.random.key(9), B=2, T=16, gate="vector", dtype=jnp.float32)
    f = lambda q, k, v, g: linear.gla(q[None], k[None], v[None], g[None])[0][0]
    batched = jax.jit(jax.vmap(f))(q, k, v, g)
    tk.assert_close(batched, jax.jit(linear.gla)(q, k, v, g)[0])
    grads = jax.jit(jax.grad(lambda g: jnp.sum(linear.gla(q, k, v, g)[0] ** 2)))(g)
    assert np.isfinite(np.asarray(grads)).all() and float(jnp.abs(grads).max()) > 0


def test_scalar_decay_mechanisms_match_their_definitions():
    """RetNet's parallel definition (Q K^T ⊙ D) V with D = γ^(n-m); Lightning-1 = plain causal linear attention."""
    with tk.float64():
        q, k, v, _, _ = _inputs(jax.random.key(10), B=1, T=21, H=3, K=3, Dk=8, Dv=8, gate="none")
        gam = linear.retnet_decays(3)
        n = np.arange(21)
        D = np.where(n[:, None] >= n[None, :], gam[:, None, None] ** (n[:, None] - n[None, :]), 0.0)
        ref = np.einsum("bihd,bjhd,hij,bjhv->bihv", q, k, D, v) / np.sqrt(8)
        tk.assert_close(linear.retention(q, k, v, chunk_size=16)[0], ref, name="retention")
        ref1 = np.einsum("bihd,bjhd,ij,bjhv->bihv", q, k, np.tril(np.ones((21, 21))), v)
        tk.assert_close(linear.lightning_attention(q, k, v, decays=None, chunk_size=16)[0], ref1, name="lightning-1")


def test_bad_inputs_name_the_argument():
    q, k, v, g, h0 = _inputs(jax.random.key(11), B=1, T=8, gate="vector", dtype=jnp.float32)
    with pytest.raises(ValueError, match="log_g"):
        linear.gla(q, k, v, g[..., :3])
    with pytest.raises(ValueError, match="initial_state"):
        linear.gla(q, k, v, g, initial_state=h0[:, :1])
    with pytest.raises(ValueError, match="log_g"):
        linear.gated_linear_attention(q, k, v, g, causal=False)
    with pytest.raises(ValueError, match="k:"):
        linear.gla(q, k[:, :4], v[:, :4], g)
    with pytest.raises(ValueError, match="chunk_size"):
        linear.gla(q, k, v, g, chunk_size=24)
    with pytest.raises(ValueError, match="^log_g:"):
        linear.ssd(q, k, v, g)  # SSD takes one decay per head
    with pytest.raises(ValueError, match="impl"):
        linear.gla(q, k, v, g, impl="flash")
