"""Encoder classifier (CLS / mean pooling), ViT (patches, 2-D positions) and the seq2seq model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax.core import testing as tk
from attn_jax.models import EncoderClassifier, EncoderConfig, Seq2Seq, Seq2SeqConfig, ViT, ViTConfig
from attn_jax.models.vit import patchify, sincos_2d

V, D = 50, 32


# Programs compile with tk.FAST_COMPILE (compile time dominates these tests; float32 results agree).
_randint = tk.fast_jit(lambda key, shape, n: jax.random.randint(key, shape, 0, n), static_argnums=(1, 2))


def _call(model, *args, **kw):
    graphdef, state = nnx.split(model)
    return tk.fast_jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kw))(state, *args)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encoder_classifier_padding_invariance_and_bidirectionality(pooling):
    cfg = EncoderConfig(vocab_size=V, num_classes=3, d_model=D, num_heads=4, pooling=pooling)
    model = EncoderClassifier(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    f = tk.fast_jit(lambda s, t, m: nnx.merge(graphdef, s)(t, padding_mask=m))
    tok = _randint(jax.random.key(0), (2, 10), V)
    mask = jnp.arange(10)[None, :] < jnp.array([[10], [6]])
    logits = f(state, tok, mask)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    changed_pad = tok.at[1, 6:].set((tok[1, 6:] + 7) % V)
    tk.assert_close(f(state, changed_pad, mask), logits, name="padding tokens must not matter")
    changed_last = tok.at[0, 9].set((tok[0, 9] + 7) % V)
    assert float(jnp.abs(f(state, changed_last, mask)[0] - logits[0]).max()) > 1e-6
    assert all(not b.mixer.causal for b in model.encoder.blocks)
    with pytest.raises(ValueError, match="^pooling:"):
        EncoderClassifier(EncoderConfig(vocab_size=V, num_classes=3, d_model=D, pooling="max"), rngs=nnx.Rngs(0))


def test_patchify_and_sincos_2d():
    img = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    p = patchify(img, 2)
    assert p.shape == (2, 6, 12)
    np.testing.assert_array_equal(np.asarray(p[0, 4]), np.asarray(img[0, 2:4, 2:4].reshape(-1)))
    e = sincos_2d(2, 3, 8)
    assert e.shape == (6, 8)
    np.testing.assert_allclose(np.asarray(e[4, :4]), np.asarray(e[3, :4]))   # same row 1
    np.testing.assert_allclose(np.asarray(e[4, 4:]), np.asarray(e[1, 4:]))   # same column 1


@pytest.mark.parametrize("position_embedding, pooling", [("learned", "cls"), ("sincos2d", "mean")])
def test_vit_shapes_and_parameter_count(position_embedding, pooling):
    cfg = ViTConfig(num_classes=5, image_size=(8, 12), patch_size=4, channels=3, d_model=D, num_heads=4,
                    position_embedding=position_embedding, pooling=pooling)
    model = ViT(cfg, rngs=nnx.Rngs(0))
    out = _call(model, jnp.ones((2, 8, 12, 3)))
    assert out.shape == (2, 5) and np.isfinite(np.asarray(out)).all()
    n = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    f = 4 * D
    block = 2 * 2 * D + 4 * D * D + (2 * D * f + f + D)
    expected = (48 * D + D) + (6 * D if position_embedding == "learned" else 0) + (D if pooling == "cls" else 0) \
        + 2 * block + 2 * D + D * 5 + 5
    assert n == expected
    with pytest.raises(ValueError, match="^patch_size:"):
        ViT(ViTConfig(num_classes=5, image_size=10, patch_size=4), rngs=nnx.Rngs(0))


def test_seq2seq_incremental_decoding_equals_teacher_forcing():
    cfg = Seq2SeqConfig(src_vocab_size=V, tgt_vocab_size=40, d_model=D, num_heads=4, num_kv_heads=2)
    model = Seq2Seq(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    src = _randint(jax.random.key(0), (2, 9), V)
    tgt = _randint(jax.random.key(1), (2, 7), 40)
    src_mask = jnp.arange(9)[None, :] < jnp.array([[9], [5]])
    forward = tk.fast_jit(lambda s, a, b, m: nnx.merge(graphdef, s)(a, b, src_padding_mask=m))
    full = forward(state, src, tgt, src_mask)
    assert full.shape == (2, 7, 40)
    # Padding source tokens do not matter.
    src2 = src.at[1, 5:].set(0)
    full2 = forward(state, src2, tgt, src_mask)
    tk.assert_close(full2, full, name="source padding")

    @tk.fast_jit
    def start(s, src, m):
        mdl = nnx.merge(graphdef, s)
        return mdl.init_cache(mdl.encode(src, src_padding_mask=m), m, max_len=8)

    @tk.fast_jit
    def step(s, tok, cache):
        return nnx.merge(graphdef, s).decode(tok, cache=cache)

    cache = start(state, src, src_mask)
    outs = []
    for t in range(7):
        logits, cache = step(state, tgt[:, t:t + 1], cache)
        outs.append(logits)
    tk.assert_close(jnp.concatenate(outs, 1), full, name="seq2seq incremental decoding")


@pytest.mark.parametrize("kw, field", [
    (dict(num_heads=5), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(decoder_mixer_pattern="sofmax"), "decoder_mixer_pattern"),
    (dict(num_encoder_layers=0), "num_encoder_layers"),
])
def test_seq2seq_bad_config(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        Seq2Seq(Seq2SeqConfig(src_vocab_size=V, d_model=D, **kw), rngs=nnx.Rngs(0))
