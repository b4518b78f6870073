"""CoPE (Golovneva et al. 2024, arXiv:2405.18719): the fast form (position logits as a dense bias of
aj.attention) against the materialised reference on values and gradients, constant gates ==
relative-position attention, the positions themselves, the mixer's decode path with a non-zero
embedding table, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn_jax as aj
from attn_jax import masks, mixers
from attn_jax.core import testing as tk
from attn_jax.variants import cope_attention, cope_attention_reference, cope_positions

B, T, H, K, Dk, Dv = 2, 9, 4, 2, 8, 6


def _inputs(seed, npos, per_head=False):
    q, k, v = tk.random_qkv_compiled(jax.random.key(seed), B=B, T=T, H=H, K=K, Dk=Dk, Dv=Dv)
    shape = (H, npos, Dk) if per_head else (npos, Dk)
    e = jax.random.normal(jax.random.key(seed + 50), shape, jnp.float32)
    return q, k, v, e


@pytest.mark.parametrize("case", ["causal_clipped", "segments_sinks_per_head"])
def test_matches_reference_values_and_gradients(case):
    # npos = 5 < T: positions clip at 4 for far keys; npos = 12 > T: no clipping
    npos = 5 if case == "causal_clipped" else 12
    q, k, v, e = _inputs(0, npos, per_head=case != "causal_clipped")
    mask, sinks = masks.causal(), None
    if case != "causal_clipped":
        seg = jnp.asarray(np.array([[1] * 5 + [2] * 4, [1] * 6 + [0] * 3], np.int32))
        mask, sinks = mask & masks.segments(seg), jnp.array([0.5, -1.0, 0.0, 1.5], jnp.float32)
        q, k, v = (x.at[1, 6:].set(jnp.nan) for x in (q, k, v))      # NaN padding must not leak
    o, grads = tk.check_vjp_parity(lambda q, k, v, e: cope_attention(q, k, v, e, mask=mask, sinks=sinks),
                                   lambda q, k, v, e: cope_attention_reference(q, k, v, e, mask=mask, sinks=sinks),
                                   (q, k, v, e), ("q", "k", "v", "pos_emb"))
    assert float(jnp.abs(grads[3]).max()) > 0
    if case != "causal_clipped":   # padding rows: zero output and gradient
        assert float(jnp.abs(o[1, 6:]).max()) == 0.0 and float(jnp.abs(grads[0][1, 6:]).max()) == 0.0


def test_constant_gates_are_relative_position_attention():
    """Every key identical and q . k large: all gates σ(.) == 1, p_ij = i - j + 1, and the content
    logits are constant per row, so CoPE == softmax(scale * q_i . e[min(i - j + 1, npos - 1)]) v."""
    npos = 6
    q, _, v, e = _inputs(2, npos)
    q = jnp.abs(q) + 1.0                          # q . k >= 8 * 8 * 1 / sqrt(8) > 20 for k = 8
    k = jnp.full((B, T, K, Dk), 8.0)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    rel = np.minimum(np.maximum(i - j + 1, 0), npos - 1)           # [T, T]; j > i is masked anyway

    def run(q, k, v, e):
        bias = Dk ** -0.5 * jnp.einsum("bihd,ijd->bhij", q, e[rel])
        return (cope_attention(q, k, v, e, mask=masks.causal()),
                aj.attention(q, k, v, mask=masks.causal(), bias=bias, impl="reference"))

    o, o_rel = tk.compiled(run, q, k, v, e)
    tk.assert_close(o, o_rel, name="CoPE with constant gates vs relative-position attention")


def test_positions_count_the_gates_from_the_key_to_the_query():
    g = jnp.asarray(np.array([[[[0.5, 0.0, 0.0], [1.0, 0.25, 0.0], [0.5, 1.0, 0.75]]]], np.float32))
    p = np.asarray(cope_positions(g, 100))
    np.testing.assert_allclose(p[0, 0], [[0.5, 0, 0], [1.25, 0.25, 0], [2.25, 1.75, 0.75]])
    np.testing.assert_allclose(np.asarray(cope_positions(g, 1.5))[0, 0, 2], [1.5, 1.5, 0.75])


def test_mixer_decode_equals_full_forward_with_a_learned_table():
    """The registry suite checks the mixer with its zero-initialised table; here the table is
    random, so the position logits take part in prefill + decode == full and causality."""
    m = mixers.get("cope")(16, 4, rngs=nnx.Rngs(0), num_kv_heads=2, npos=8)
    graphdef, state = nnx.split(m)
    call = tk.fast_jit(lambda s, x, cache: nnx.merge(graphdef, s)(x, cache=cache))
    x = jax.random.normal(jax.random.key(4), (2, 11, 16))
    without_table = call(state, x, None)[0]
    m.pos_emb[...] = jax.random.normal(jax.random.key(3), m.pos_emb.shape)
    state = nnx.split(m)[1]
    full = call(state, x, None)[0]
    assert float(jnp.abs(full - without_table).max()) > 1e-3   # the table takes part
    y, _ = tk.prefill_then_decode(lambda c, cache: call(state, c, cache), x, m.init_cache(2, 11), 6)
    tk.assert_close(y, full, name="prefill + decode vs full")
    tk.check_causality_by_perturbation(lambda a, b, c: call(state, a, None)[0], x, x, x)


def test_bad_inputs():
    q, k, v, e = _inputs(5, 6)
    with pytest.raises(ValueError, match="^pos_emb:.*got \\(6, 7\\)"):
        cope_attention(q, k, v, e[:, :7])
    with pytest.raises(ValueError, match="^pos_emb:"):
        cope_attention_reference(q, k, v, jnp.zeros((3, 6, Dk)))       # 3 tables for H = 4 heads
    with pytest.raises(ValueError, match="^causal:"):
        mixers.get("cope")(16, 4, rngs=nnx.Rngs(0), causal=False)
    with pytest.raises(ValueError, match="^softcap:"):
        mixers.get("cope")(16, 4, rngs=nnx.Rngs(0), softcap=5.0)
    with pytest.raises(ValueError, match="^npos:"):
        mixers.get("cope")(16, 4, rngs=nnx.Rngs(0), npos=0)
