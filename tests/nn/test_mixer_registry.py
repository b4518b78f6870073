"""Invariants every registered decoder token mixer must satisfy (parametrized over
attn_jax.mixers.names(causal=True); the encoder-only / bidirectional route is
tests/nn/test_encoder_mixers.py).

A family that registers a mixer is covered here the day it registers: shapes, jit == eager,
finite gradients, causality, prefill + step decode == full forward, ragged prefill (per-row
valid counts), packed == padded.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import mixers
from attn_jax.core import testing as tk
from attn_jax.nn.protocol import FEATURE_KEYS, TokenMixer
from tests.nn.mixer_tiers import eager_params

B, T, D, H = 2, 16, 32, 4
CACHE_LEN = T + 4   # one cache size for every test, so the decode-step program compiles once per mixer


@pytest.fixture(scope="module", params=mixers.names(causal=True))
def mixer(request):
    m = tk.build_module(mixers.get(request.param), D, H, num_kv_heads=2)
    graphdef, state = nnx.split(m)

    @tk.fast_jit
    def call(state, x, positions=None, segment_ids=None, cache=None):
        y, cache = nnx.merge(graphdef, state)(x, positions=positions, segment_ids=segment_ids, cache=cache)
        return y, cache

    return request.param, m, state, call


def _x(seed=0, b=B, t=T):
    return jax.random.normal(jax.random.key(seed), (b, t, D), jnp.float32)


def test_protocol(mixer):
    name, m, state, call = mixer
    assert isinstance(m, TokenMixer)
    y, cache = call(state, _x())
    assert y.shape == (B, T, D) and cache is None


@pytest.mark.parametrize("mixer", eager_params(mixers.names(causal=True)), indirect=True)
def test_jit_matches_eager(mixer):
    name, m, state, call = mixer
    x = _x()
    y, cache = m(x)
    assert y.shape == (B, T, D) and cache is None
    tk.assert_close(call(state, x)[0], y, name=f"{name}: jit vs eager")


def test_finite_gradients(mixer):
    name, m, state, call = mixer
    x = _x(1)

    def loss(state, x):  # the un-jitted body: compiler options belong to the outermost jit only
        return jnp.sum(call.__wrapped__(state, x)[0] ** 2)

    gs, gx = tk.fast_jit(jax.grad(loss, argnums=(0, 1)))(state, x)
    leaves = jax.tree.leaves(gs) + [gx]
    assert leaves
    for g in leaves:
        assert np.isfinite(np.asarray(g)).all()
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(gs))


def test_causality(mixer):
    name, m, state, call = mixer
    x = _x(2)
    fn = lambda q, k, v: call(state, q)[0]  # noqa: E731  (the kit perturbs q, k and v together)
    tk.check_causality_by_perturbation(fn, x, x, x)


def test_prefill_then_decode_equals_full(mixer):
    name, m, state, call = mixer
    x = _x(3)
    full = call(state, x)[0]
    y, _ = tk.prefill_then_decode(lambda c, cache: call(state, c, cache=cache), x,
                                  m.init_cache(B, CACHE_LEN, jnp.float32), 9)
    tk.assert_close(y, full, name=f"{name}: prefill + decode vs full")


def test_ragged_prefill_matches_rows(mixer):
    """Right-padded chunk with per-row valid counts (segment_ids != 0) == each row alone."""
    name, m, state, call = mixer
    x = _x(4)
    lengths = np.array([T, 11])
    valid = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    cache = m.init_cache(B, CACHE_LEN, jnp.float32)
    y, cache = call(state, x, segment_ids=jnp.asarray(valid), cache=cache)
    full = call(state, x)[0]
    tk.assert_close(y[0], full[0], name=f"{name}: full row")
    tk.assert_close(y[1, :11], full[1, :11], name=f"{name}: short row")
    assert float(jnp.abs(y[1, 11:]).max()) == 0.0
    # The next token of the short row continues at position 11 (not 16).
    x_next = _x(5, t=1)
    y_next, _ = call(state, x_next, cache=cache)
    # reference: row 1's 11 tokens then the new one, in the [B, T] program already compiled (the
    # mixers are causal, so the tokens after position 11 do not touch it)
    ref = call(state, x.at[1, 11].set(x_next[1, 0]))[0]
    tk.assert_close(y_next[1, 0], ref[1, 11], name=f"{name}: decode after ragged prefill")


def test_packed_equals_padded(mixer):
    """Two documents packed in one row (positions restart) == each document alone, right-padded."""
    name, m, state, call = mixer
    # Both calls take [B=2, T] with explicit positions and segment ids: one compiled program.
    x = jnp.broadcast_to(_x(6, b=1), (B, T, D))
    seg = np.array([[1] * 7 + [2] * 6 + [0] * 3] * B, np.int32)
    pos = np.array([list(range(7)) + list(range(6)) + [0] * 3] * B, np.int32)
    packed = call(state, x, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))[0]
    padded_x = jnp.zeros((2, T, D)).at[0, :7].set(x[0, :7]).at[1, :6].set(x[0, 7:13])
    padded_seg = np.zeros((2, T), np.int32)
    padded_seg[0, :7] = 1
    padded_seg[1, :6] = 1
    padded_pos = np.tile(np.arange(T, dtype=np.int32), (2, 1))
    padded = call(state, padded_x, positions=jnp.asarray(padded_pos), segment_ids=jnp.asarray(padded_seg))[0]
    tk.assert_close(packed[1], packed[0], name=f"{name}: identical packed rows")
    tk.assert_close(packed[0, :7], padded[0, :7], name=f"{name}: document 1")
    tk.assert_close(packed[0, 7:13], padded[1, :6], name=f"{name}: document 2")
    assert float(jnp.abs(packed[0, 13:]).max()) == 0.0, "padding tokens must give zero output"


def test_registry_features_are_known():
    for name in mixers.names():
        feats = mixers.features(name)
        assert feats <= FEATURE_KEYS, f"{name}: unknown feature keys {sorted(feats - FEATURE_KEYS)}"


def test_names_by_direction():
    every, dec, enc = mixers.names(), mixers.names(causal=True), mixers.names(causal=False)
    assert set(dec) | set(enc) == set(every)
    assert {"softmax", "sliding_window", "linear", "performer", "cosformer"} <= set(dec) & set(enc)
    assert {"efficient", "agent"} <= set(enc) - set(dec)          # encoder-only
    assert {"mega", "gla", "deltanet", "ssd"} <= set(dec) - set(enc)
    for name in dec:
        assert "causal" in mixers.features(name)
    for name in enc:
        assert "bidirectional" in mixers.features(name)
    with pytest.raises(TypeError, match="^causal:"):
        mixers.names(causal="yes")
