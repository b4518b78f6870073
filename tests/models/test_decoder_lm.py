"""DecoderLM over every registered mixer: prefill + decode == full forward, packed == padded,
finite gradients; plus parameter counts, hybrids, sharding axes and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attn_jax import mixers
from attn_jax.core import testing as tk
from attn_jax.models import DecoderConfig, DecoderLM

V, D, L, H, KV, T = 50, 32, 2, 4, 2, 12


def _model(pattern, **kw):
    cfg = DecoderConfig(vocab_size=V, d_model=D, num_layers=L, num_heads=H, num_kv_heads=KV, mixer_pattern=pattern,
                        **kw)
    return DecoderLM(cfg, rngs=nnx.Rngs(0))


def _jitted(model):
    graphdef, state = nnx.split(model)

    @tk.fast_jit
    def f(state, tokens, positions=None, segment_ids=None, cache=None):
        return nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids, cache=cache)

    return graphdef, state, f


@pytest.fixture(scope="module", params=tk.mixer_params(mixers.names(causal=True)))
def lm(request):
    model = _model(request.param)
    return (request.param, model) + _jitted(model)


def _tokens(seed, b=2, t=T):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, V)


def test_prefill_then_decode_equals_full_forward(lm):
    name, model, _, state, f = lm
    tok = _tokens(0)
    full, _ = f(state, tok)
    cache = model.init_cache(2, T)
    logits, cache = f(state, tok[:, :5], cache=cache)
    outs = [logits]
    for t in range(5, T):
        logits, cache = f(state, tok[:, t:t + 1], cache=cache)
        outs.append(logits)
    tk.assert_close(jnp.concatenate(outs, 1), full, name=f"{name}: prefill + decode logits")


def test_packed_equals_padded(lm):
    name, model, _, state, f = lm
    tok = _tokens(1, b=1)
    seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    pos = jnp.asarray([list(range(5)) + list(range(7))], jnp.int32)
    packed, _ = f(state, tok, positions=pos, segment_ids=seg)
    padded_tok = jnp.zeros((2, T), tok.dtype).at[0, :5].set(tok[0, :5]).at[1, :7].set(tok[0, 5:])
    padded_seg = (jnp.arange(T)[None, :] < jnp.array([[5], [7]])).astype(jnp.int32)
    padded, _ = f(state, padded_tok, segment_ids=padded_seg)
    tk.assert_close(packed[0, :5], padded[0, :5], name=f"{name}: document 1")
    tk.assert_close(packed[0, 5:], padded[1, :7], name=f"{name}: document 2")


def test_shapes_and_gradients_are_finite(lm):
    """(jit == eager is checked per mixer in tests/nn/test_mixer_registry.py; eager models are slow.)"""
    name, model, graphdef, state, f = lm
    tok = _tokens(2)
    logits, _ = f(state, tok)
    assert logits.shape == (2, T, V) and logits.dtype == jnp.float32

    gdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits, _ = nnx.merge(gdef, params, rest)(tok[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()

    grads = tk.fast_jit(jax.grad(loss))(params)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == len(jax.tree.leaves(params))
    for g in leaves:
        assert np.isfinite(np.asarray(g)).all()
    assert all(float(jnp.abs(g).max()) > 0 for g in leaves), "every parameter must receive gradient"


def _expected_params(cfg: DecoderConfig) -> int:
    d, f = cfg.d_model, cfg.hidden
    dk = cfg.head_dim or d // cfg.num_heads
    kv = cfg.num_kv_heads or cfg.num_heads
    norm = 2 * d if cfg.norm == "layer" else d
    attn = d * cfg.num_heads * dk + 2 * d * kv * dk + cfg.num_heads * dk * d
    mlp = 3 * d * f if cfg.mlp == "swiglu" else 2 * d * f + f + d
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    return cfg.vocab_size * d + cfg.num_layers * (2 * norm + attn + mlp) + norm + head


@pytest.mark.parametrize("kw", [
    dict(),
    dict(tie_embeddings=False, mlp="gelu", norm="layer"),
    dict(num_kv_heads=1, head_dim=16, mlp_hidden=40),
])
def test_parameter_count_matches_formula(kw):
    cfg = DecoderConfig(vocab_size=V, d_model=D, num_layers=L, num_heads=H, **kw)
    model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == _expected_params(cfg)
    assert cfg.hidden == (88 if cfg.mlp == "swiglu" and cfg.mlp_hidden is None else cfg.hidden)


def test_hybrid_pattern_and_sharding_axes():
    cfg = DecoderConfig(vocab_size=V, d_model=D, num_layers=4, num_heads=H, mixer_pattern="softmax,sliding_window",
                        mixer_kwargs={"sliding_window": {"window": 3}})
    model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    assert [b.mixer_name for b in model.blocks] == ["softmax", "sliding_window"] * 2
    assert model.blocks[1].mixer.window == 3 and model.blocks[0].mixer.window is None
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(specs["embed"]["embedding"].get_value()) == ("vocab", "embed")
    assert tuple(specs["blocks"][0]["mlp"]["w_gate"].get_value()) == ("embed", "mlp")
    assert tuple(specs["blocks"][0]["mlp"]["w_down"].get_value()) == ("mlp", "embed")
    assert tuple(specs["blocks"][0]["mixer"]["w_q"].get_value()) == ("embed", "heads", "head_dim")
    assert list(cfg.layer_mixers()) == ["softmax", "sliding_window"] * 2
    assert DecoderConfig(vocab_size=V, mixer_pattern=["softmax", "softmax"]).layer_mixers() == ["softmax"] * 2


def test_bf16_compute():
    model = _model("softmax", dtype=jnp.bfloat16)
    assert model.embed.embedding[...].dtype == jnp.float32
    logits, _ = tk.fast_jit(lambda s, t: nnx.merge(*s)(t))(nnx.split(model), _tokens(3))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("kw, field", [
    (dict(num_heads=3), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(mixer_pattern="softmax,sofmax"), "mixer_pattern"),
    (dict(mixer_pattern="softmax,softmax,softmax"), "mixer_pattern"),
    (dict(mixer_kwargs={"gla_typo": {}}), "mixer_kwargs"),
    (dict(mlp="relu"), "mlp"),
    (dict(norm="batch"), "norm"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_bad_config_raises_naming_the_field(kw, field):
    args = dict(vocab_size=V, d_model=D, num_layers=L, num_heads=H)
    args.update(kw)
    with pytest.raises(ValueError, match=f"^{field}:") as e:
        DecoderLM(DecoderConfig(**args), rngs=nnx.Rngs(0))
    if kw.get("mixer_pattern") == "softmax,sofmax":
        assert "did you mean 'softmax'" in str(e.value) and "sliding_window" in str(e.value)
