"""Invariants of the non-causal (encoder) route, over attn_jax.mixers.names(causal=False): every
mixer that accepts ``causal=False`` (softmax and sliding-window attention, the normalised linear
mixers, the encoder-only "efficient" and "agent").

jit == eager, finite gradients, non-causality (a future token changes earlier outputs),
right-padded rows == each row alone (padding outputs zero), packed == padded for mixers claiming
"segments"; plus the encoder model with the encoder-only mixers and the decoder's refusal of them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import mixers
from attn_jax.core import testing as tk
from attn_jax.models import DecoderConfig, DecoderLM, EncoderClassifier, EncoderConfig
from attn_jax.nn.protocol import TokenMixer
from tests.nn.mixer_tiers import eager_params

B, T, D, H = 2, 16, 32, 4


@pytest.fixture(scope="module", params=mixers.names(causal=False))
def mixer(request):
    m = tk.build_module(mixers.get(request.param), D, H, num_kv_heads=2, causal=False)
    graphdef, state = nnx.split(m)

    @tk.fast_jit
    def call(state, x, positions=None, segment_ids=None):
        return nnx.merge(graphdef, state)(x, positions=positions, segment_ids=segment_ids)[0]

    return request.param, m, state, call


_ARANGE = jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1))


def _x(seed=0, b=B, t=T):
    return jax.random.normal(jax.random.key(seed), (b, t, D), jnp.float32)


def test_registry_split():
    enc = set(mixers.names(causal=False))
    assert {"softmax", "sliding_window", "linear", "efficient", "agent"} <= enc
    assert not {"mega", "gla", "deltanet", "ssd", "retnet", "lightning", "gated_deltanet"} & enc
    assert {"efficient", "agent"}.isdisjoint(mixers.names(causal=True))


def test_protocol(mixer):
    name, m, state, call = mixer
    assert isinstance(m, TokenMixer)
    assert call(state, _x()).shape == (B, T, D)


@pytest.mark.parametrize("mixer", eager_params(mixers.names(causal=False)), indirect=True)
def test_jit_matches_eager(mixer):
    name, m, state, call = mixer
    x = _x()
    y, cache = m(x)
    assert y.shape == (B, T, D) and cache is None
    tk.assert_close(call(state, x), y, name=f"{name}: jit vs eager")


def test_finite_gradients(mixer):
    name, m, state, call = mixer
    gs, gx = tk.fast_jit(jax.grad(lambda s, x: jnp.sum(call.__wrapped__(s, x) ** 2), argnums=(0, 1)))(state, _x(1))
    for g in jax.tree.leaves(gs) + [gx]:
        assert np.isfinite(np.asarray(g)).all()
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(gs))
    assert float(jnp.abs(gx).max()) > 0


def test_future_tokens_change_earlier_outputs(mixer):
    name, m, state, call = mixer
    x = _x(2)
    x2 = x.at[:, -1].set(3.0 * _x(3, t=1)[:, 0])
    y, y2 = call(state, x), call(state, x2)
    for r in range(B):   # every row's second-to-last output sees the last token
        assert float(jnp.abs(y2[r, T - 2] - y[r, T - 2]).max()) > 1e-5, f"{name}: row {r} ignores the future"


def test_padded_rows_equal_rows_alone(mixer):
    """A right-padded row (segment_ids != 0 on its first 11 tokens) == that row alone; padding -> 0."""
    name, m, state, call = mixer
    x = _x(4)
    n = 11
    valid = jnp.asarray((np.arange(T)[None, :] < np.array([[T], [n]])).astype(np.int32))
    y = call(state, x, positions=_ARANGE, segment_ids=valid)   # the signature of the packed test: one program
    tk.assert_close(y[0], call(state, x)[0], name=f"{name}: full row")
    tk.assert_close(y[1, :n], call(state, x[:, :n])[1], name=f"{name}: padded row vs the row alone")
    assert float(jnp.abs(y[1, n:]).max()) == 0.0, "padding tokens must give zero output"


def test_packed_equals_padded(mixer):
    """Two documents packed in one row (positions restart) == each document alone, right-padded;
    a mixer that does not claim "segments" must refuse packed rows."""
    name, m, state, call = mixer
    x = jnp.broadcast_to(_x(6, b=1), (B, T, D))   # two identical packed rows: [B, T] like the padded call
    seg = np.array([[1] * 7 + [2] * 6 + [0] * 3] * B, np.int32)
    pos = np.array([list(range(7)) + list(range(6)) + [0] * 3] * B, np.int32)
    if "segments" not in mixers.features(name):
        with pytest.raises(ValueError, match="segment_ids"):
            m(x, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
        return
    packed = call(state, x, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
    padded_x = jnp.zeros((2, T, D)).at[0, :7].set(x[0, :7]).at[1, :6].set(x[0, 7:13])
    padded_seg = np.zeros((2, T), np.int32)
    padded_seg[0, :7] = 1
    padded_seg[1, :6] = 1
    padded = call(state, padded_x, positions=_ARANGE, segment_ids=jnp.asarray(padded_seg))
    tk.assert_close(packed[1], packed[0], name=f"{name}: identical packed rows")
    tk.assert_close(packed[0, :7], padded[0, :7], name=f"{name}: document 1")
    tk.assert_close(packed[0, 7:13], padded[1, :6], name=f"{name}: document 2")
    assert float(jnp.abs(packed[0, 13:]).max()) == 0.0, "padding tokens must give zero output"


def test_encoder_runs_with_encoder_only_mixers():
    cfg = EncoderConfig(vocab_size=50, num_classes=3, d_model=D, num_heads=H, mixer_pattern="efficient,agent",
                        pooling="mean")
    model = EncoderClassifier(cfg, rngs=nnx.Rngs(0))
    assert [b.mixer.decl.name for b in model.encoder.blocks] == ["efficient", "agent"]
    assert all(not b.mixer.causal for b in model.encoder.blocks)
    graphdef, state = nnx.split(model)
    f = tk.fast_jit(lambda s, t, mask: nnx.merge(graphdef, s)(t, padding_mask=mask))
    tok = jax.random.randint(jax.random.key(0), (2, 10), 0, 50)
    mask = jnp.arange(10)[None, :] < jnp.array([[10], [6]])
    logits = f(state, tok, mask)
    assert logits.shape == (2, 3) and np.isfinite(np.asarray(logits)).all()
    tk.assert_close(f(state, tok.at[1, 6:].set(1), mask), logits, name="padding tokens must not matter")


@pytest.mark.parametrize("name", ["efficient", "agent"])
def test_decoder_refuses_encoder_only_mixers(name):
    cfg = DecoderConfig(vocab_size=50, d_model=D, num_layers=1, num_heads=H, mixer_pattern=name)
    with pytest.raises(ValueError, match=f"'{name}'.*non-causal only"):
        DecoderLM(cfg, rngs=nnx.Rngs(0))
