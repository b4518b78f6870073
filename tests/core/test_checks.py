"""Opt-in value checks (attn_jax.checked / attn_jax.core.checks): each check raises a ValueError
naming the argument when enabled, and when disabled nothing is raised and results are unchanged
(the compiled program of a checked op equals the unchecked one, bit for bit)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import checks
from attn_jax.core import testing as tk
from attn_jax.linear.delta_rule import delta_rule_step, gated_delta_rule
from attn_jax.linear.gated import gated_linear_attention, recurrent_step
from attn_jax.models import DecoderConfig, DecoderLM
from attn_jax.models.encoder import EncoderClassifier, EncoderConfig
from attn_jax.models.seq2seq import Seq2Seq, Seq2SeqConfig
from attn_jax.softmax.kv_cache import KVCache

B, T, H, D = 2, 8, 2, 8
REF = {"softmax": {"impl": "reference"}}      # the cheapest attention to compile


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _checked(fn, **kw):
    """``fn`` checked, as one fast-compiled program."""
    return aj.checked(fn, jit=True, compiler_options=tk.FAST_COMPILE, **kw)


def _build(make):
    """``(graphdef, state)`` of the module ``make()`` builds, initialised in one compiled program
    (eager initialisation compiles every initialiser op separately: several times slower)."""
    graph, _ = nnx.split(nnx.eval_shape(make))
    return graph, tk.fast_jit(lambda: nnx.split(make())[1])()


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- the entry point

def test_checked_is_pure_and_a_plain_debug_check_costs_nothing():
    def f(x):
        checks.check(x > 0, "x: expected positive values, got {} bad", jnp.sum(x <= 0))
        return 2 * x

    x = jnp.array([1.0, -1.0])
    np.testing.assert_array_equal(f(x), [2.0, -2.0])                 # eager, off: no error
    np.testing.assert_array_equal(jax.jit(f)(x), [2.0, -2.0])        # jit, off: no error
    with pytest.raises(ValueError, match=r"x: expected positive values, got 1 bad"):
        aj.checked(f)(x)
    np.testing.assert_array_equal(jax.jit(f)(x), [2.0, -2.0])        # no state left behind
    # Off, the predicate is gone from the compiled program: same HLO as without the check.
    hlo = lambda g: re.sub(r", metadata=\{[^}]*\}", "", jax.jit(g).lower(x).compile().as_text().split("ENTRY")[1])
    assert hlo(f) == hlo(lambda x: 2 * x)
    with pytest.raises(TypeError, match="fn: expected a callable"):
        aj.checked(3)


# ----------------------------------------------------------------------------- log gates

def _gla_inputs():
    q, k, v = (_normal(i, (B, T, H, D)) for i in range(3))
    log_g = -jax.nn.softplus(_normal(3, (B, T, H, D)))
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 0, 0], [1] * T], jnp.int32)
    return q, k, v, log_g, seg


def test_positive_log_gates_raise_naming_the_gate():
    q, k, v, log_g, seg = _gla_inputs()
    gla = lambda q, k, v, g, s: gated_linear_attention(q, k, v, g, segment_ids=s)[0]
    plain, chk = tk.fast_jit(gla), _checked(gla)                    # one program each
    good = plain(q, k, v, log_g, seg)
    _assert_same(good, chk(q, k, v, log_g, seg))                    # enabled, valid input: same result
    # A positive gate at padding (segment id 0) is allowed: padding is transparent.
    padded = log_g.at[0, 7].set(3.0)
    _assert_same(plain(q, k, v, padded, seg), chk(q, k, v, padded, seg))
    bad = log_g.at[1, 2, 0, 0].set(2.0)
    assert plain(q, k, v, bad, seg).shape == good.shape             # disabled: no error (a wrong answer)
    with pytest.raises(ValueError, match=r"log_g: log gates must be <= 0 .*got 1 positions .*largest 2\.0"):
        chk(q, k, v, bad, seg)


def test_positive_gated_delta_and_decode_step_gates_raise():
    q, k, v, _, seg = _gla_inputs()
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.nn.sigmoid(_normal(5, (B, T, H)))
    log_a = (-jax.nn.softplus(_normal(6, (B, T, H)))).at[0, 3, 1].set(0.5)
    f = lambda q, k, v, b, a, s: gated_delta_rule(q, k, v, b, a, segment_ids=s)[0]
    tk.fast_jit(f)(q, k, v, beta, log_a, seg)                       # disabled: no error
    with pytest.raises(ValueError, match=r"log_g: log gates must be <= 0"):
        _checked(f)(q, k, v, beta, log_a, seg)
    state = jnp.zeros((B, H, D, D))
    g_t = jnp.full((B, H, D), -0.1).at[1, 0, 0].set(0.1)
    tk.fast_jit(recurrent_step)(q[:, 0], k[:, 0], v[:, 0], g_t, state)   # disabled: no error
    with pytest.raises(ValueError, match=r"g_t: log gates must be <= 0"):
        _checked(recurrent_step)(q[:, 0], k[:, 0], v[:, 0], g_t, state)
    with pytest.raises(ValueError, match=r"log_g_t: log gates must be <= 0"):
        _checked(delta_rule_step)(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], state, log_g_t=log_a[:, 3])


# ----------------------------------------------------------------------------- token ids

def test_out_of_range_token_ids_raise_in_the_decoder():
    cfg = DecoderConfig(vocab_size=11, d_model=16, num_layers=1, num_heads=2, mixer_kwargs=REF)
    graph, state = _build(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    f = lambda s, t, seg: nnx.merge(graph, s)(t, segment_ids=seg)[0]
    fwd, chk = tk.fast_jit(f), _checked(f)
    tokens = jnp.array([[1, 2, 3, 4], [5, 6, 7, 0]], jnp.int32)
    seg = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]], jnp.int32)
    _assert_same(fwd(state, tokens, seg), chk(state, tokens, seg))
    _assert_same(fwd(state, tokens, seg)[0], chk(state, tokens.at[1, 3].set(-1), seg)[0])  # -1 at padding
    bad = tokens.at[0, 2].set(11)
    assert fwd(state, bad, seg).shape == (2, 4, 11)                  # disabled: no error
    with pytest.raises(ValueError, match=r"tokens: token ids must lie in \[0, vocab_size=11\); got 1 out-of-range "
                                         r"ids \(smallest 11, largest 11\)"):
        chk(state, bad, seg)


def test_out_of_range_token_ids_raise_in_encoder_and_seq2seq():
    cfg = EncoderConfig(vocab_size=7, num_classes=3, d_model=16, num_layers=1, num_heads=2, mixer_kwargs=REF)
    enc = nnx.merge(*_build(lambda: EncoderClassifier(cfg, rngs=nnx.Rngs(0))))
    tokens = jnp.array([[1, 2, 9]], jnp.int32)
    run = _checked(lambda t, m: enc(t, padding_mask=m))
    run(tokens, jnp.array([[True, True, False]]))                         # id 9 sits in padding
    with pytest.raises(ValueError, match=r"tokens: token ids must lie in \[0, vocab_size=7\)"):
        run(tokens, jnp.array([[True, True, True]]))
    cfg = Seq2SeqConfig(src_vocab_size=7, tgt_vocab_size=5, d_model=16, num_encoder_layers=1, num_decoder_layers=1,
                        num_heads=2, mixer_kwargs=REF)
    s2s = nnx.merge(*_build(lambda: Seq2Seq(cfg, rngs=nnx.Rngs(0))))
    run = _checked(lambda src, tgt: s2s(src, tgt))
    with pytest.raises(ValueError, match=r"src: token ids must lie in \[0, vocab_size=7\)"):
        run(jnp.array([[1, 7]]), jnp.array([[1, 2]]))
    with pytest.raises(ValueError, match=r"tgt: token ids must lie in \[0, vocab_size=5\)"):
        run(jnp.array([[1, 6]]), jnp.array([[1, 5]]))


# ----------------------------------------------------------------------------- NaN in attention inputs

@pytest.mark.parametrize("T_", [8, 300])          # 300: the mask is evaluated in blocks of query rows
def test_nan_in_attention_inputs_raises_only_where_the_mask_uses_it(T_):
    q, k, v = (_normal(i, (B, T_, 4, D)) for i in range(3))
    k, v = k[:, :, :2], v[:, :, :2]                                   # GQA: 4 query heads, 2 kv heads
    seg = jnp.ones((B, T_), jnp.int32).at[1, T_ - 2:].set(0)          # row 1 ends in 2 padding tokens
    f = lambda q, k, v, seg: aj.attention(q, k, v, mask=masks.causal() & masks.segments(seg), impl="reference")
    att, chk = tk.fast_jit(f), _checked(f)
    ref = att(q, k, v, seg)
    _assert_same(ref, chk(q, k, v, seg))
    # NaN at padding (query and key of segment 0) is allowed and does not leak.
    qp, kp, vp = (x.at[1, T_ - 1].set(jnp.nan) for x in (q, k, v))
    out = chk(qp, kp, vp, seg)
    np.testing.assert_array_equal(np.asarray(out[:, :T_ - 2]), np.asarray(ref[:, :T_ - 2]))
    with pytest.raises(ValueError, match=r"q: NaN at 1 \(batch, query, head\) positions that attend to keys"):
        chk(q.at[0, T_ - 1, 3, 0].set(jnp.nan), k, v, seg)
    with pytest.raises(ValueError, match=r"v: NaN at 1 \(batch, key, kv head\) positions that some query attends"):
        chk(q, k, v.at[1, 0, 1, 2].set(jnp.nan), seg)
    assert np.isnan(np.asarray(att(q, k, v.at[1, 0, 1, 2].set(jnp.nan), seg))).any()   # disabled: no error


def test_nan_check_without_a_mask_and_with_a_head_specific_mask():
    q, k, v = (_normal(i, (1, 4, 2, D)) for i in range(3))
    k, v = k[:, :, :1], v[:, :, :1]
    with pytest.raises(ValueError, match=r"^k: NaN"):
        _checked(aj.attention)(q, k.at[0, 3, 0, 0].set(jnp.nan), v)
    # Head 0 sees no key at all, head 1 sees every key: NaN in head 0's queries is padding.
    dense = jnp.stack([jnp.zeros((4, 4), bool), jnp.ones((4, 4), bool)])[None]
    run = _checked(lambda q, k, v: aj.attention(q, k, v, mask=dense))
    run(q.at[0, 1, 0].set(jnp.nan), k, v)
    with pytest.raises(ValueError, match=r"q: NaN at 1 "):
        run(q.at[0, 1, 1].set(jnp.nan), k, v)


# ----------------------------------------------------------------------------- cache capacity

def test_decoding_past_the_cache_capacity_raises():
    def decode(cache, k, steps):
        def body(i, c):
            k_i = jax.lax.dynamic_slice_in_dim(k, i, 1, axis=1)
            return c.append(k_i, k_i)
        return jax.lax.fori_loop(0, steps, body, cache)

    run, chk = tk.fast_jit(decode, static_argnames="steps"), _checked(decode, static_argnames="steps")
    cache = KVCache.init(B, 4, 1, D)
    k = _normal(7, (B, 6, 1, D))
    full = chk(cache, k, steps=4)                          # exactly fills the cache
    _assert_same(full, run(cache, k, steps=4))
    over = run(cache, k, steps=6)                                      # disabled: silently saturates
    np.testing.assert_array_equal(over.lengths, [4, 4])
    with pytest.raises(ValueError, match=r"k_new: appending past the cache capacity max_len=4: a row holding 4 "
                                         r"tokens receives 1 more"):
        chk(cache, k, steps=6)
