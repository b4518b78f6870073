"""generate(): greedy decoding consistent with the full forward for every mixer, ragged and
left/right-padded prompts, stop tokens, top-k / top-p / temperature, and a single compilation."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import mixers
from attn_jax.core import testing as tk
from attn_jax.models import DecoderConfig, DecoderLM, generate, sample_logits

gen_module = importlib.import_module("attn_jax.models.generate")
V, P, N = 50, 6, 6
LENGTHS = np.array([6, 3])


def _model(pattern="softmax"):
    cfg = DecoderConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mixer_pattern=pattern)
    return DecoderLM(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompts():
    tok = np.array(jax.random.randint(jax.random.key(0), (2, P), 1, V))
    tok[1, LENGTHS[1]:] = 0
    return tok


@pytest.mark.parametrize("name", tk.mixer_params(mixers.names(causal=True)))
def test_greedy_matches_full_forward_for_ragged_prompts(name):
    model = _model(name)
    prompts = _prompts()
    out = generate(model, prompts, prompt_lengths=LENGTHS, max_new_tokens=N)
    assert out.tokens.shape == (2, N) and out.lengths.tolist() == [N, N]
    # Teacher-forced check: each row's prompt + generation, right-padded (causal: padding after
    # a position cannot change it), in one full forward.
    seqs = np.zeros((2, P + N), np.int32)
    for b, n in enumerate(LENGTHS):
        seqs[b, :n + N] = np.concatenate([prompts[b, :n], np.asarray(out.tokens[b])])
    logits = jax.jit(lambda s, t: nnx.merge(*s)(t)[0])(nnx.split(model), jnp.asarray(seqs))
    for b, n in enumerate(LENGTHS):
        expected = np.asarray(jnp.argmax(logits[b, n - 1:n - 1 + N], -1))
        np.testing.assert_array_equal(np.asarray(out.tokens[b]), expected, err_msg=f"{name}: row {b}")


def test_left_padding_equals_right_padding(model):
    prompts = _prompts()
    left = np.zeros_like(prompts)
    for b, n in enumerate(LENGTHS):
        left[b, P - n:] = prompts[b, :n]
    a = generate(model, prompts, prompt_lengths=LENGTHS, max_new_tokens=N)
    b = generate(model, left, prompt_lengths=LENGTHS, padding="left", max_new_tokens=N)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_stop_tokens_end_rows(model):
    prompts = _prompts()
    greedy = np.asarray(generate(model, prompts, prompt_lengths=LENGTHS, max_new_tokens=N).tokens)
    stop = int(greedy[0, 2])
    first = [int(np.nonzero(row == stop)[0][0]) if (row == stop).any() else None for row in greedy]
    out = generate(model, prompts, prompt_lengths=LENGTHS, max_new_tokens=N, stop_tokens=(stop,), pad_id=-1)
    for b, k in enumerate(first):
        row = np.asarray(out.tokens[b])
        if k is None:
            np.testing.assert_array_equal(row, greedy[b])
            assert int(out.lengths[b]) == N
        else:
            np.testing.assert_array_equal(row[:k + 1], greedy[b, :k + 1])
            assert (row[k + 1:] == -1).all() and int(out.lengths[b]) == k + 1


def test_sampling_settings(model):
    prompts = _prompts()
    greedy = generate(model, prompts, prompt_lengths=LENGTHS, max_new_tokens=N).tokens
    kw = dict(prompt_lengths=LENGTHS, max_new_tokens=N, temperature=1.0, rng=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(generate(model, prompts, top_k=1, **kw).tokens), np.asarray(greedy))
    np.testing.assert_array_equal(np.asarray(generate(model, prompts, top_p=1e-6, **kw).tokens), np.asarray(greedy))
    a = generate(model, prompts, **kw).tokens
    b = generate(model, prompts, **{**kw, "rng": jax.random.key(4)}).tokens
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="^rng:"):
        generate(model, prompts, max_new_tokens=2, temperature=0.5)
    with pytest.raises(ValueError, match="^top_p:"):
        generate(model, prompts, max_new_tokens=2, temperature=0.5, top_p=0.0, rng=jax.random.key(0))


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * 512))
    keys = jax.random.key(0)
    k2 = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=2))
    assert set(k2.tolist()) == {0, 1}
    p = np.asarray(sample_logits(logits, jax.random.key(1), temperature=1.0, top_p=0.65))
    assert set(p.tolist()) == {0, 1}  # 0.4 < 0.65 <= 0.4 + 0.3
    everything = np.asarray(sample_logits(logits, jax.random.key(2), temperature=1.0))
    assert set(everything.tolist()) == {0, 1, 2, 3}
    assert np.asarray(sample_logits(logits, keys)).tolist() == [0] * 512


def test_compiles_once_no_per_token_retrace(model):
    prompts = _prompts()
    kw = dict(prompt_lengths=LENGTHS, max_new_tokens=9, temperature=0.7, top_k=10, top_p=0.9)
    generate(model, prompts, rng=jax.random.key(0), **kw)
    before = dict(gen_module.TRACE_COUNTS)
    out = generate(model, (prompts + 1) % V, rng=jax.random.key(1), **{**kw, "prompt_lengths": np.array([2, 5])})
    generate(model, prompts, **{**kw, "temperature": 0.0, "top_k": None, "top_p": None})
    generate(model, prompts, rng=jax.random.key(2), **{**kw, "temperature": 1.3, "top_k": 3, "top_p": 0.5})
    generate(model, prompts, padding="left", stop_tokens=(7,), pad_id=-1, **{**kw, "temperature": 0.0})
    assert dict(gen_module.TRACE_COUNTS) == before, (
        "same shapes must reuse the executable for any sampling setting, stop id, pad id or padding side")
    assert out.tokens.shape == (2, 9)
    # A fresh compilation traces the decode step exactly once however many tokens it makes.
    generate(model, prompts, rng=jax.random.key(0), **{**kw, "max_new_tokens": 17})
    assert gen_module.TRACE_COUNTS["decode_step"] == before["decode_step"] + 1
    assert gen_module.TRACE_COUNTS["generate"] == before["generate"] + 1


def test_max_len_too_small_for_prompt_and_new_tokens_raises(model):
    prompts = _prompts()[:, :4]
    with pytest.raises(ValueError, match=r"max_len: .*max_len >= prompt length P \+ max_new_tokens - 1 = "
                                         r"4 \+ 8 - 1 = 11; got max_len=6"):
        generate(model, prompts, max_new_tokens=8, max_len=6)
    for bad in (10, 11.0, "12"):
        with pytest.raises(ValueError, match=r"max_len: .* = 11; got max_len="):
            generate(model, prompts, max_new_tokens=8, max_len=bad)


def test_prefill_past_the_cache_capacity_raises_and_the_smallest_max_len_suffices():
    import attn_jax as aj
    cfg = DecoderConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, mixer_kwargs={"softmax": {"impl": "reference"}})
    make = lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))        # initialised in one compiled program (cheaper than eager)
    model = nnx.merge(nnx.split(nnx.eval_shape(make))[0], tk.fast_jit(lambda: nnx.split(make())[1])())
    prompts = jnp.asarray(_prompts())
    with pytest.raises(ValueError, match=r"k: chunk of T_new=6 tokens exceeds the cache capacity max_len=4"):
        jax.eval_shape(lambda t: model(t, cache=model.init_cache(2, 4)), prompts)
    # The last generated token is never fed back, so P + N - 1 cache slots suffice: with value checks
    # on, any append past the cache capacity would raise (tests/core/test_checks.py).
    out = aj.checked(generate)(model, prompts, prompt_lengths=LENGTHS, max_new_tokens=N, max_len=P + N - 1)
    assert out.tokens.shape == (2, N)
    with pytest.raises(ValueError, match=r"max_len: .* = 11; got max_len=10"):
        generate(model, prompts, max_new_tokens=N, max_len=P + N - 2)
