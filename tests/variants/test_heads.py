"""Talking-heads attention (Shazeer et al. 2020, arXiv:2003.02436): the materialised op against the
head-by-head reference on values and gradients, identity projections == plain attention, the
mixer's decode path with learned (non-identity) projections, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn_jax as aj
from attn_jax import masks, mixers
from attn_jax.core import testing as tk
from attn_jax.variants import talking_heads_attention, talking_heads_attention_reference

B, T, S, H, K, Dk, Dv = 2, 7, 9, 4, 2, 8, 6


def _inputs(seed):
    q, k, v = tk.random_qkv_compiled(jax.random.key(seed), B=B, T=T, S=S, H=H, K=K, Dk=Dk, Dv=Dv)
    p_l, p_w = jax.random.normal(jax.random.key(seed + 9), (2, H, H), jnp.float32) * 0.7
    return q, k, v, p_l, p_w


def test_matches_reference_values_and_gradients():
    q, k, v, p_l, p_w = _inputs(0)
    # bottom-right causal with T < S, and a key-padding row whose first query sees nothing
    mask = masks.causal() & masks.key_padding(jnp.array([S, 2], jnp.int32))
    key = jax.random.key(1)

    def both(*p):
        fast = lambda *a: talking_heads_attention(*a, mask=mask)  # noqa: E731
        ref = lambda *a: talking_heads_attention_reference(*a, mask=mask)  # noqa: E731
        return tk.vjp_with_random_cotangent(fast, p, key), tk.vjp_with_random_cotangent(ref, p, key)

    (o, grads), (o_ref, grads_ref) = tk.compiled(both, q, k, v, p_l, p_w)
    tk.assert_close(o, o_ref, name="output")
    for name, a, b in zip(("q", "k", "v", "logits_proj", "weights_proj"), grads, grads_ref):
        tk.assert_close(a, b, grad=True, name=f"d{name}")
    # row 1 sees keys 0, 1 only; its query 0 sits at position S - T = 2 and sees both
    assert float(jnp.abs(grads[1][1, 2:]).max()) == 0.0 and float(jnp.abs(grads[4]).max()) > 0


def test_identity_projections_are_plain_attention():
    q, k, v, p_l, p_w = _inputs(2)
    eye = jnp.eye(H)

    def run(q, k, v, p_l, p_w):
        return (talking_heads_attention(q, k, v, eye, eye, mask=masks.causal()),
                aj.attention(q, k, v, mask=masks.causal()),
                talking_heads_attention(q, k, v, p_l, p_w, mask=masks.causal()))

    o, plain, mixed = tk.compiled(run, q, k, v, p_l, p_w)
    tk.assert_close(o, plain, name="identity talking heads vs attention")
    assert float(jnp.abs(mixed - plain).max()) > 1e-2


def test_mixer_decode_equals_full_forward_with_learned_projections():
    m = mixers.get("talking_heads")(16, 4, rngs=nnx.Rngs(0), num_kv_heads=2)
    m.logits_proj[...] = jax.random.normal(jax.random.key(3), (4, 4))
    m.weights_proj[...] = jax.random.normal(jax.random.key(4), (4, 4))
    graphdef, state = nnx.split(m)
    call = tk.fast_jit(lambda s, x, cache: nnx.merge(graphdef, s)(x, cache=cache))
    x = jax.random.normal(jax.random.key(5), (2, 11, 16))
    full = call(state, x, None)[0]
    y, cache = call(state, x[:, :6], m.init_cache(2, 11))
    outs = [y]
    for t in range(6, 11):
        y, cache = call(state, x[:, t:t + 1], cache)
        outs.append(y)
    tk.assert_close(jnp.concatenate(outs, axis=1), full, name="prefill + decode vs full")
    tk.check_causality_by_perturbation(lambda a, b, c: call(state, a, None)[0], x, x, x)


def test_bad_inputs():
    q, k, v, p_l, p_w = _inputs(6)
    with pytest.raises(ValueError, match="^logits_proj:.*got \\(4, 3\\)"):
        talking_heads_attention(q, k, v, p_l[:, :3], p_w)
    with pytest.raises(TypeError, match="^weights_proj:"):
        talking_heads_attention_reference(q, k, v, p_l, np.eye(H, dtype=np.int32))
    with pytest.raises(ValueError, match="^sinks:"):
        mixers.get("talking_heads")(16, 4, rngs=nnx.Rngs(0), sinks=True)
    with pytest.raises(ValueError, match="^positional:"):
        mixers.get("talking_heads")(16, 4, rngs=nnx.Rngs(0), positional="alibi")
