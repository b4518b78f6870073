"""Causal depthwise short convolution: direct loop, reference scan, causality, segments, decode cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax.core import testing as tk
from attn_jax.nn.short_conv import ShortConv, causal_conv1d, causal_conv1d_reference

B, T, F, W = 2, 11, 3, 4


def _inputs(seed=0, b=B, t=T, f=F, w=W):
    k = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(k[0], (b, t, f)), jax.random.normal(k[1], (w, f)), jax.random.normal(k[2], (f,)),
            jax.random.normal(k[3], (b, w - 1, f)))


def _loop(x, weight, bias=None, state=None, silu=False):
    """y[b, t] = sum_i weight[i] * x[b, t - (w-1) + i] with zeros (or ``state``) before t = 0."""
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    b_, t_, _ = x.shape
    w = weight.shape[0]
    prev = np.zeros((b_, w - 1, x.shape[2])) if state is None else np.asarray(state, np.float64)
    xp = np.concatenate([prev, x], axis=1)
    y = np.zeros_like(x)
    for b in range(b_):
        for t in range(t_):
            for i in range(w):
                y[b, t] += weight[i] * xp[b, t + i]
    if bias is not None:
        y += np.asarray(bias, np.float64)
    if silu:
        y = y / (1 + np.exp(-y))
    return y


def test_matches_direct_loop():
    x, w, b, s = _inputs()
    y, _ = causal_conv1d(x, w)
    tk.assert_close(y, _loop(x, w).astype(np.float32), name="plain")
    y, new = causal_conv1d(x, w, bias=b, conv_state=s, activation="silu")
    tk.assert_close(y, _loop(x, w, b, s, silu=True).astype(np.float32), name="bias + state + silu")
    np.testing.assert_array_equal(np.asarray(new), np.asarray(x[:, -(W - 1):]))


def test_matches_reference_with_segments_and_state():
    x, w, b, s = _inputs(1, b=3)
    seg = jnp.array([[1, 1, 1, 0, 0, 1, 1, 2, 2, 2, 2],      # padding inside a document is skipped
                     [0, 0, 3, 3, 4, 0, 4, 4, 5, 0, 0],      # leading padding, three documents, tail padding
                     [1] * T], jnp.int32)
    for kw in (dict(segment_ids=seg), dict(segment_ids=seg, conv_state=s, bias=b, activation="silu")):
        y, new = causal_conv1d(x, w, **kw)
        y_ref, new_ref = causal_conv1d_reference(x, w, **kw)
        tk.assert_close(y, y_ref, name="output")
        tk.assert_close(new, new_ref, name="new state")
    assert float(jnp.abs(y[seg == 0]).max()) == 0.0


def test_causality():
    x, w, b, _ = _inputs(2)
    fn = lambda q, k, v: causal_conv1d(q, w, bias=b, activation="silu")[0]  # noqa: E731
    tk.check_causality_by_perturbation(fn, x, x, x)


def test_packed_documents_equal_each_alone():
    """No leakage across documents; padding (anywhere) is transparent."""
    x, w, _, _ = _inputs(3, b=1)
    seg = np.array([[1, 1, 0, 1, 1, 2, 2, 2, 0, 2, 0]], np.int32)
    y, _ = causal_conv1d(x, w, segment_ids=jnp.asarray(seg))
    for doc in (1, 2):
        idx = np.nonzero(seg[0] == doc)[0]
        alone, _ = causal_conv1d(x[:, idx], w)
        tk.assert_close(y[:, idx], alone, name=f"document {doc}")
    assert float(jnp.abs(y[0, seg[0] == 0]).max()) == 0.0


def test_ragged_prefill_then_steps_equal_full():
    """Rows with different valid counts keep their own last w-1 valid inputs."""
    x, w, b, _ = _inputs(4)
    conv = jax.jit(lambda x, seg, s: causal_conv1d(x, w, bias=b, segment_ids=seg, conv_state=s, activation="silu"))
    n_valid = np.array([7, 2])
    seg = (np.arange(7)[None] < n_valid[:, None]).astype(np.int32)
    y, state = conv(x[:, :7], jnp.asarray(seg), jnp.zeros((B, W - 1, F)))
    outs = [[y[r, :n_valid[r]]] for r in range(B)]
    rows = [list(range(n_valid[r])) for r in range(B)]
    for t in range(7, T):                         # row 1 pauses at t = 8 (a padding step)
        step_seg = np.array([[1], [0 if t == 8 else 1]], np.int32)
        y, state = conv(x[:, t:t + 1], jnp.asarray(step_seg), state)
        for r in range(B):
            if step_seg[r, 0]:
                outs[r].append(y[r])
                rows[r].append(t)
            else:
                assert float(jnp.abs(y[r]).max()) == 0.0
    for r in range(B):
        full, _ = causal_conv1d(x[r:r + 1, np.array(rows[r])], w, bias=b, activation="silu")
        tk.assert_close(jnp.concatenate(outs[r], axis=0), full[0], name=f"row {r}")


def test_module_params_cache_and_bf16():
    m = ShortConv((2, 3), 4, axes=("heads", "head_dim"), use_bias=True, rngs=nnx.Rngs(0))
    assert m.kernel[...].shape == (4, 2, 3) and float(jnp.abs(m.kernel[...]).max()) <= 0.5
    specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
    assert tuple(specs["kernel"].get_value()) == (None, "heads", "head_dim")
    assert tuple(specs["bias"].get_value()) == ("heads", "head_dim")
    x = jax.random.normal(jax.random.key(5), (2, 6, 2, 3))
    y, s = m(x)
    y1, s1 = m(x[:, :4], conv_state=m.init_state(2))
    y2, s2 = m(x[:, 4:], conv_state=s1)
    tk.assert_close(jnp.concatenate([y1, y2], axis=1), y, name="prefill + continue")
    tk.assert_close(s2, s, name="state")
    m16 = ShortConv(3, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    y16, s16 = m16(x[:, :, 0].astype(jnp.float32))
    assert y16.dtype == jnp.bfloat16 and m16.kernel[...].dtype == jnp.bfloat16
    ref, _ = causal_conv1d(x[:, :, 0], m16.kernel[...].astype(jnp.float32), activation="silu")
    tk.assert_close(y16, ref, dtype=jnp.bfloat16, name="bf16")


@pytest.mark.parametrize("kw, field", [
    (dict(weight=jnp.ones((4, 2))), "weight"),
    (dict(conv_state=jnp.zeros((B, 2, F))), "conv_state"),
    (dict(segment_ids=jnp.ones((B, T))), "segment_ids"),
    (dict(activation="gelu"), "activation"),
])
def test_errors_name_the_argument(kw, field):
    x, w, _, _ = _inputs()
    kw = {"weight": w, **kw}
    with pytest.raises((ValueError, TypeError), match=f"^{field}:"):
        causal_conv1d(x, kw.pop("weight"), **kw)
