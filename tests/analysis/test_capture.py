"""attn_jax.analysis.capture: captured maps equal hand-written attention weights; capture on ==
capture off for the model outputs; mixers without weights are refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import mixers
from attn_jax.analysis.capture import attention_layers, capture, capture_all, capturing
from attn_jax.core import testing as tk
from attn_jax.models import DecoderConfig, DecoderLM
from attn_jax.positional import alibi

B, T, D, H, K = 2, 7, 16, 4, 2
FAST = dict(compiler_options=tk.FAST_COMPILE)


def _x(seed, shape=(B, T, D)):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)


def _qk(m, x):
    x = np.asarray(x, np.float64)
    return (np.einsum("btd,dhf->bhtf", x, np.asarray(m.w_q[...], np.float64)),
            np.einsum("btd,dkf->bktf", x, np.asarray(m.w_k[...], np.float64)))


def _causal_same_segment(ids):
    causal = np.tril(np.ones((T, T), bool))
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] != 0)
    return causal[None] & same                                   # [B, T, S]


def test_softmax_weights_equal_the_hand_written_probabilities():
    """ALiBi, softcap, learned sinks (non-zero), GQA and packed segments with padding."""
    m = tk.build_module(mixers.get("softmax"), D, H, num_kv_heads=K, positional="alibi", softcap=3.0, sinks=True)
    m.sinks[...] = jnp.array([0.5, -1.0, 2.0, 0.0])
    x = _x(1)
    ids = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
    got = capture_all(m, x, segment_ids=ids, **FAST)
    q, k = _qk(m, x)
    s = np.einsum("bhtf,bhsf->bhts", q, np.repeat(k, H // K, axis=1)) * (D // H) ** -0.5
    s = 3.0 * np.tanh(s / 3.0) + np.asarray(alibi(H, causal=True).materialize(T, T), np.float64)
    vis = _causal_same_segment(ids)[:, None]
    e = np.where(vis, np.exp(s - s.max(-1, keepdims=True)), 0.0)
    sink = np.exp(np.array([0.5, -1.0, 2.0, 0.0])[None, :, None] - s.max(-1))
    p = e / np.where(vis.any(-1), e.sum(-1) + sink, 1.0)[..., None]
    maps = got.maps[""]
    tk.assert_close(maps["weights"], p, dtype=jnp.float32, name="weights")
    assert np.all(maps["weights"][0, :, 6] == 0)                  # the padding query attends nowhere
    np.testing.assert_array_equal(np.isinf(maps["logits"]), ~np.broadcast_to(vis, p.shape))
    assert np.all(maps["weights"].sum(-1)[..., :6] < 1)            # the sinks take their share


def test_probed_weights_of_sigmoid_attention_and_unchanged_output():
    """A normaliser mixer (``attention_fn``) is probed with the identity value basis: W = σ(s + b)."""
    m = tk.build_module(mixers.get("sigmoid"), D, H, positional="none", train_length=4)
    x = _x(2)
    got = capture(m, x, **FAST)[""]
    q, k = _qk(m, x)
    s = np.einsum("bhtf,bhsf->bhts", q, k) * (D // H) ** -0.5
    w = np.where(np.tril(np.ones((T, T), bool)), 1 / (1 + np.exp(-(s - np.log(4.0)))), 0.0)
    tk.assert_close(got, w, dtype=jnp.float32, name="sigmoid weights")


def test_capture_on_equals_capture_off_and_linear_weights_are_the_normalised_elu_kernel():
    """A softmax + linear DecoderLM: the logits with capture on equal the plain forward; the linear
    layer's weights are φ(q_t)·φ(k_s) / Σ_s' φ(q_t)·φ(k_s') (φ = elu + 1) and W_o(o) is its output."""
    cfg = DecoderConfig(vocab_size=13, d_model=D, num_heads=H, num_kv_heads=K, num_layers=2,
                        mixer_pattern="softmax,linear")
    model = tk.build_module(DecoderLM, cfg)
    tokens = (np.arange(B * T).reshape(B, T) * 5) % 13
    off = tk.fast_jit(lambda state, t: nnx.merge(nnx.graphdef(model), state)(t)[0])(nnx.state(model), tokens)
    got = capture_all(model, tokens, hidden=True, **FAST)
    tk.assert_close(got.output[0], off, name="logits with capture on")
    assert sorted(got.maps) == ["blocks/0/mixer", "blocks/1/mixer"]
    assert sorted(got.hidden) == ["blocks/0", "blocks/1"] and got.hidden["blocks/1"].shape == (B, T, D)
    assert not any(m.capture_maps for m in attention_layers(model).values())   # restored
    with capturing(model) as layers:
        assert list(layers) == ["blocks/0/mixer"] and layers["blocks/0/mixer"].capture_maps

    mixer = model.blocks[1].mixer
    x_in = np.asarray(model.blocks[1].norm_mixer(jnp.asarray(got.hidden["blocks/0"])), np.float64)
    q, k = _qk(mixer, x_in)
    k = np.repeat(k, H // K, axis=1)
    phi = lambda z: np.where(z > 0, z + 1, np.exp(z))  # noqa: E731  elu + 1
    a = np.einsum("bhtf,bhsf->bhts", phi(q), phi(k)) * np.tril(np.ones((T, T)))
    w = got.maps["blocks/1/mixer"]["weights"]
    tk.assert_close(w, a / a.sum(-1, keepdims=True), dtype=jnp.float32, rel=1e-4, atol=1e-4, name="linear weights")
    # the captured o = W v is the mixer's own attention output: its W_o projection is the layer output
    y = np.einsum("bthf,hfd->btd", got.maps["blocks/1/mixer"]["output"], np.asarray(mixer.w_o[...]))
    tk.assert_close(y, mixer(jnp.asarray(x_in, jnp.float32))[0], name="W_o(o) vs mixer output")


def test_mixers_without_weights_are_refused_by_name():
    rela = tk.build_module(mixers.get("rela"), D, H, positional="none")
    with pytest.raises(ValueError, match="ReLA|not linear|cannot be probed"):
        capture(rela, _x(3))
    gla = tk.build_module(mixers.get("gla"), D, H)      # a linear mixer outside a TransformerBlock
    with pytest.raises(ValueError, match="'gla'"):
        capture(gla, _x(3))
    with pytest.raises(ValueError, match="others"):
        capture(gla, _x(3), others="ignore")


def test_probed_weights_of_a_subclass_overriding_attend():
    """Talking heads (``_attend`` overridden): with ``P_l = I`` and ``P_w = diag(w)`` the weights
    are ``w_h softmax(s_h)``, probed through the subclass's own attention."""
    m = tk.build_module(mixers.get("talking_heads"), D, H, positional="none")
    w_h = np.array([0.5, 1.0, 2.0, -1.0])
    m.weights_proj[...] = jnp.diag(jnp.asarray(w_h, jnp.float32))
    x = _x(4)
    got = capture(m, x, **FAST)[""]
    q, k = _qk(m, x)
    s = np.einsum("bhtf,bhsf->bhts", q, k) * (D // H) ** -0.5
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    tk.assert_close(got, w_h[None, :, None, None] * p / p.sum(-1, keepdims=True), dtype=jnp.float32,
                    name="talking-heads weights")
