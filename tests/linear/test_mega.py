"""Mega (arXiv:2209.10655): the damped EMA forms against each other and a numpy loop, and the
Mega-chunk mixer against a dense-mask reference, decoding and packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax.core import testing as tk
from attn_jax.linear.mega import damped_ema, damped_ema_kernel, damped_ema_step
from attn_jax.nn.mega import MegaCache, MegaMixer, chunk_mask

B, T, D, N = 2, 13, 3, 4


def _ema_inputs(dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (B, T, D), dtype)
    alpha = jax.nn.sigmoid(jax.random.normal(k[1], (D, N), dtype))
    delta = jax.nn.sigmoid(2 * jax.random.normal(k[2], (D, N), dtype))   # strong and weak decays
    beta = jax.random.normal(k[3], (D, N), dtype)
    eta = jax.random.normal(k[4], (D, N), dtype)
    u0 = jax.random.normal(k[5], (B, D, N), dtype)
    return x, alpha, delta, beta, eta, u0


SEG = np.array([[1, 1, 1, 1, 0, 0, 1, 1, 2, 2, 2, 0, 3],
                [0, 0, 0, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]], np.int32)


def _numpy_ema(x, alpha, delta, beta, eta, seg=None, u0=None):
    """Direct loop over the paper's recurrence (transparent padding, resets at document starts)."""
    x, alpha, delta, beta, eta = (np.asarray(a, np.float64) for a in (x, alpha, delta, beta, eta))
    y = np.zeros(x.shape)
    finals = []
    for b in range(x.shape[0]):
        u = np.zeros((x.shape[2], alpha.shape[1])) if u0 is None else np.asarray(u0[b], np.float64).copy()
        last = None
        for t in range(x.shape[1]):
            s = 1 if seg is None else seg[b, t]
            if s == 0:
                continue
            if last is not None and s != last:
                u = np.zeros_like(u)
            last = s
            u = alpha * beta * x[b, t][:, None] + (1 - alpha * delta) * u
            y[b, t] = (eta * u).sum(-1)
        finals.append(u)
    return y, np.stack(finals)


def test_ema_forms_agree_values_and_grads_float64():
    with tk.float64():
        x, alpha, delta, beta, eta, u0 = _ema_inputs(jnp.float64)
        ct = jax.random.normal(jax.random.key(9), (B, T, D), jnp.float64)
        cts = jax.random.normal(jax.random.key(10), (B, D, N), jnp.float64)

        def run(impl, *a):
            return damped_ema(*a[:5], initial_state=a[5] if len(a) > 5 else None, return_final_state=True, impl=impl)

        def run_and_vjp(impl, *a):   # values and the VJP of a random cotangent, one compilation
            out, vjp = jax.vjp(lambda *p: run(impl, *p), *a)
            return out, vjp((ct, cts))

        grads = {}
        for state in (None, u0):
            args = (x, alpha, delta, beta, eta) + (() if state is None else (state,))
            ref_y, ref_s = _numpy_ema(x, alpha, delta, beta, eta, u0=state)
            for impl in ("scan", "parallel", "fft"):
                if state is None:
                    y, s = jax.jit(lambda *a, impl=impl: run(impl, *a))(*args)
                else:   # gradients w.r.t. x, alpha, delta, beta, eta and the initial state
                    (y, s), grads[impl] = jax.jit(lambda *a, impl=impl: run_and_vjp(impl, *a))(*args)
                tk.assert_close(y, ref_y, rel=1e-12, atol=1e-11, name=f"{impl}: y vs numpy loop")
                tk.assert_close(s, ref_s, rel=1e-12, atol=1e-11, name=f"{impl}: final state vs numpy loop")
        for impl in ("parallel", "fft"):
            for g, r in zip(grads[impl], grads["scan"]):
                tk.assert_close(g, r, rel=1e-11, atol=1e-10, name=f"{impl}: grad vs scan")


def test_ema_segments_reset_and_padding_transparent():
    with tk.float64():
        x, alpha, delta, beta, eta, u0 = _ema_inputs(jnp.float64, seed=1)
        seg = jnp.asarray(SEG)
        ref_y, ref_s = _numpy_ema(x, alpha, delta, beta, eta, seg=SEG, u0=u0)
        outs = {}
        for impl in ("scan", "parallel"):
            def run(x, a, d, impl=impl):
                return damped_ema(x, a, d, beta, eta, segment_ids=seg, initial_state=u0, return_final_state=True,
                                  impl=impl)

            def run_and_grad(*a, run=run):
                (y, s), vjp = jax.vjp(run, *a)
                return y, s, vjp((jnp.cos(y), jnp.ones_like(s)))

            y, s, outs[impl] = jax.jit(run_and_grad)(x, alpha, delta)
            tk.assert_close(y, ref_y, rel=1e-12, atol=1e-11, name=f"{impl}: packed y")
            tk.assert_close(s, ref_s, rel=1e-12, atol=1e-11, name=f"{impl}: packed final state")
        for g, r in zip(outs["parallel"], outs["scan"]):
            tk.assert_close(g, r, rel=1e-11, atol=1e-10, name="parallel: packed grad vs scan")
        # Document 2 of row 0 (positions 8..10) == that document alone, from a zero state.
        alone, _ = _numpy_ema(x[:1, 8:11], alpha, delta, beta, eta)
        np.testing.assert_allclose(np.asarray(y[0, 8:11]), alone[0], rtol=1e-12, atol=1e-12)
        assert np.all(np.asarray(y)[SEG == 0] == 0)
        # Row 1 starts with padding: its only document keeps the initial state (belongs to it).
        cont, _ = _numpy_ema(x[1:, 3:], alpha, delta, beta, eta, u0=u0[1:])
        np.testing.assert_allclose(np.asarray(y[1, 3:]), cont[0], rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="segment_ids"):
            damped_ema(x, alpha, delta, beta, eta, segment_ids=seg, impl="fft")


def test_ema_kernel_is_the_impulse_response():
    with tk.float64():
        x, alpha, delta, beta, eta, _ = _ema_inputs(jnp.float64, seed=2)
        impulse = np.zeros((1, T, D))
        impulse[0, 0] = 1.0
        y, _ = _numpy_ema(impulse, alpha, delta, beta, eta)
        np.testing.assert_allclose(y[0].T, np.asarray(damped_ema_kernel(alpha, delta, beta, eta, T)),
                                   rtol=1e-12, atol=1e-14)


def test_ema_decode_steps_equal_full():
    x, alpha, delta, beta, eta, u0 = _ema_inputs(jnp.float32, seed=3)
    full, final = jax.jit(lambda *a: damped_ema(*a[:5], initial_state=a[5], return_final_state=True))(
        x, alpha, delta, beta, eta, u0)
    state, ys = u0, []
    step = jax.jit(damped_ema_step)
    for t in range(T):
        y, state = step(x[:, t], state, alpha, delta, beta, eta)
        ys.append(y)
    tk.assert_close(jnp.stack(ys, 1), full, name="step-by-step vs full")
    tk.assert_close(state, final, name="final state")
    # An invalid row keeps its state and outputs zero.
    y, s2 = jax.jit(damped_ema_step)(x[:, 0], u0, alpha, delta, beta, eta, valid=jnp.array([True, False]))
    assert float(jnp.abs(y[1]).max()) == 0 and np.array_equal(np.asarray(s2[1]), np.asarray(u0[1]))


def test_ema_rejects_bad_shapes():
    x, alpha, delta, beta, eta, u0 = _ema_inputs(jnp.float32)
    with pytest.raises(ValueError, match="beta"):
        damped_ema(x, alpha, delta, beta[:, :2], eta)
    with pytest.raises(ValueError, match="initial_state"):
        damped_ema(x, alpha, delta, beta, eta, initial_state=u0[:, :, :2])
    with pytest.raises(ValueError, match="impl"):
        damped_ema(x, alpha, delta, beta, eta, impl="chunk")


# ----------------------------------------------------------------------------- the mixer

DM, C = 16, 4


def _mixer(**kw):
    m = MegaMixer(DM, 4, z_dim=8, h_dim=12, ema_dim=3, chunk_size=C, num_kv_heads=2, head_dim=5, rngs=nnx.Rngs(0),
                  **kw)
    # Larger q/k scales, relative bias and U_h than the N(0, 0.02) init, so attention matters.
    m.qk_scale[...] = jax.random.normal(jax.random.key(1), m.qk_scale[...].shape)
    m.qk_offset[...] = 0.3 * jax.random.normal(jax.random.key(2), m.qk_offset[...].shape)
    if m.rel_bias is not None:
        m.rel_bias[...] = jax.random.normal(jax.random.key(3), m.rel_bias[...].shape)
    m.u_h[...] = 0.3 * jax.random.normal(jax.random.key(4), m.u_h[...].shape)
    graphdef, state = nnx.split(m)

    @jax.jit
    def call(state, x, positions=None, segment_ids=None, cache=None):
        return nnx.merge(graphdef, state)(x, positions=positions, segment_ids=segment_ids, cache=cache)

    return m, state, call


@pytest.fixture(scope="module")
def mega():
    return _mixer()


def _x(seed, t=T):
    return jax.random.normal(jax.random.key(seed), (B, t, DM))


@jax.jit
def _reference_mixer(m: MegaMixer, x, visible):
    """The module docstring's equations with a dense boolean mask and the scan EMA."""
    p = lambda v: v[...]  # noqa: E731
    alpha, delta, beta, eta = m.ema_coefficients()
    ema, _ = damped_ema(x, alpha, delta, beta, eta, impl="scan")
    xp = jax.nn.silu(ema + x * p(m.ema_omega))
    v = jax.nn.silu(x @ p(m.w_v) + p(m.b_v))
    phi = jax.nn.sigmoid(xp @ p(m.w_phi) + p(m.b_phi))
    z = jax.nn.silu(xp @ p(m.w_z) + p(m.b_z))
    gamma = jax.nn.silu(xp @ p(m.w_gamma) + p(m.b_gamma))
    q = z * p(m.qk_scale)[0] + p(m.qk_offset)[0]
    k = z * p(m.qk_scale)[1] + p(m.qk_offset)[1]
    Tn = x.shape[1]
    rel = np.arange(Tn)[:, None] - np.arange(Tn)[None, :]
    bias = 0.0 if m.rel_bias is None else p(m.rel_bias)[np.clip(rel, 0, C - 1)]
    s = jnp.einsum("btz,bsz->bts", q, k) / np.sqrt(m.z_dim) + bias
    s = jnp.where(visible, s, -jnp.inf)
    o = jnp.einsum("bts,bsv->btv", jax.nn.softmax(s, axis=-1), v)
    h = jax.nn.silu(xp @ p(m.w_h) + p(m.b_h) + (gamma * o) @ p(m.u_h))
    return phi * h + (1 - phi) * x


@pytest.mark.parametrize("rel_pos_bias", ["simple", "none"])
def test_mixer_equals_dense_mask_reference(mega, rel_pos_bias):
    m, state, call = mega if rel_pos_bias == "simple" else _mixer(rel_pos_bias="none")
    x = _x(5)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (i // C == j // C) & (j <= i)
    np.testing.assert_array_equal(np.asarray(chunk_mask(C, B, T).materialize(T, T))[0, 0], visible)
    tk.assert_close(call(state, x)[0], _reference_mixer(m, x, visible), rel=2e-5, atol=2e-5,
                    name="mixer vs dense reference")


def test_chunk_mask_follows_document_positions():
    seg = jnp.asarray(SEG)
    got = np.asarray(chunk_mask(C, B, T, segment_ids=seg).materialize(T, T))[:, 0]
    for b in range(B):
        pos, start, last = np.zeros(T, int), 0, None
        for t in range(T):   # index from the document's first token (padding inside a document counts)
            if SEG[b, t] != 0 and SEG[b, t] != last:
                start, last = t, SEG[b, t]
            pos[t] = t - start
        same = (SEG[b][:, None] == SEG[b][None, :]) & (SEG[b][:, None] != 0)
        want = same & (pos[:, None] // C == pos[None, :] // C) & (np.arange(T)[None, :] <= np.arange(T)[:, None])
        np.testing.assert_array_equal(got[b], want, err_msg=f"row {b}")


def test_mixer_prefill_chunks_and_steps_equal_full(mega):
    m, state, call = mega
    x = _x(6)
    full = call(state, x)[0]
    cache = m.init_cache(B, T, jnp.float32)
    assert isinstance(cache, MegaCache)
    outs = []
    # Prefill 5 (crosses a chunk boundary), one step, a chunk of 5 (> chunk_size, spans 3 chunks), steps.
    for a, b in ((0, 5), (5, 6), (6, 11), (11, 12), (12, 13)):
        y, cache = call(state, x[:, a:b], cache=cache)
        outs.append(y)
    tk.assert_close(jnp.concatenate(outs, axis=1), full, name="prefill + chunks + steps vs full")
    assert np.array_equal(np.asarray(cache.lengths), [T, T])


def test_mixer_ragged_prefill_then_decode(mega):
    m, state, call = mega
    x = _x(7)
    valid = jnp.asarray((np.arange(T)[None, :] < np.array([[T], [8]])).astype(np.int32))
    y, cache = call(state, x, segment_ids=valid, cache=m.init_cache(B, 32))
    full = call(state, x)[0]
    tk.assert_close(y[0], full[0], name="full row")
    tk.assert_close(y[1, :8], full[1, :8], name="short row")
    assert float(jnp.abs(y[1, 8:]).max()) == 0.0
    x_next = _x(8, t=5)
    y2, _ = call(state, x_next, cache=cache)
    ref = call(state, jnp.concatenate([x[:, :8], x_next], axis=1))[0]
    tk.assert_close(y2[1], ref[1, 8:], name="continuation of the short row")


def test_mixer_packed_equals_padded_small_chunks(mega):
    m, state, call = mega
    x = _x(9)
    seg = jnp.asarray(np.stack([SEG[0], SEG[0]]))
    packed = call(state, x.at[1].set(x[0]), segment_ids=seg)[0][0]
    # Each document alone at the start of a right-padded row (same compiled call).
    for lo, hi in ((8, 11), (12, 13), (0, 4)):
        row = np.zeros(T, np.int32)
        row[:hi - lo] = 1
        alone = call(state, jnp.zeros_like(x).at[:, :hi - lo].set(x[0, lo:hi]), segment_ids=jnp.asarray(
            np.stack([row, row])))[0][0]
        tk.assert_close(packed[lo:hi], alone[:hi - lo], name=f"document at {lo}:{hi} alone")
    assert float(jnp.abs(packed[np.asarray(SEG[0]) == 0]).max()) == 0.0


def test_mixer_protocol_errors():
    with pytest.raises(ValueError, match="causal"):
        MegaMixer(DM, 1, causal=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rel_pos_bias"):
        MegaMixer(DM, 1, rel_pos_bias="rotary", rngs=nnx.Rngs(0))
    m = MegaMixer(DM, 1, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="cache"):
        m(jnp.zeros((1, 3, DM)), cache=(1, 2))
