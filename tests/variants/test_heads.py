"""Talking-heads attention (Shazeer et al. 2020, arXiv:2003.02436): the materialised op against the
head-by-head reference on values and gradients, identity projections == plain attention, the
mixer's decode path with learned (non-identity) projections, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn_jax as aj
from attn_jax import masks, mixers, variants
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
    k, v = k.at[1, 2:].set(jnp.nan), v.at[1, 2:].set(jnp.nan)      # NaN padding must not leak
    o, grads = tk.check_vjp_parity(lambda *a: talking_heads_attention(*a, mask=mask),
                                   lambda *a: talking_heads_attention_reference(*a, mask=mask),
                                   (q, k, v, p_l, p_w), ("q", "k", "v", "logits_proj", "weights_proj"))
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
    y, _ = tk.prefill_then_decode(lambda c, cache: call(state, c, cache), x, m.init_cache(2, 11), 6)
    tk.assert_close(y, full, name="prefill + decode vs full")
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


# ----------------------------------------------------------------------------- Mixture-of-Head attention
# (Jin et al. 2024, arXiv:2410.11842)

def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("num_shared", [0, 1, 2])
def test_head_gates_match_the_formula(num_shared):
    Bg, Tg, E, top_k = 2, 5, 6, 2
    keys = jax.random.split(jax.random.key(7), 3)
    r = np.asarray(jax.random.normal(keys[0], (Bg, Tg, E)))
    s = np.asarray(jax.random.normal(keys[1], (Bg, Tg, max(num_shared, 1))))
    mix = np.asarray(jax.random.normal(keys[2], (Bg, Tg, 2)))
    g, aux = variants.head_gates(jnp.asarray(r), top_k=top_k, num_shared=num_shared,
                                 shared_logits=jnp.asarray(s) if num_shared > 1 else None,
                                 mix_logits=jnp.asarray(mix) if num_shared else None)
    p = _np_softmax(r)
    sel = p >= np.sort(p, -1)[..., -top_k][..., None]
    g_r = top_k * p * sel / (p * sel).sum(-1, keepdims=True)
    want = g_r
    if num_shared:
        g_s = num_shared * _np_softmax(s) if num_shared > 1 else np.ones((Bg, Tg, 1))
        a = 2 * _np_softmax(mix)
        want = np.concatenate([a[..., :1] * g_s, a[..., 1:] * g_r], -1)
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(aux), E * E * np.mean(p.mean((0, 1)) * sel.mean((0, 1))), rtol=1e-5)
    assert (np.asarray(g) == 0).sum() == Bg * Tg * (E - top_k)   # unselected routed heads are off


def test_moh_op_matches_reference_and_mixer_wiring():
    q, k, v, _, _ = _inputs(8)
    k, v = k[:, :T], v[:, :T]
    gates = jnp.abs(jax.random.normal(jax.random.key(9), (B, T, H)))
    tk.check_vjp_parity(lambda *a: variants.mixture_of_heads_attention(*a, mask=masks.causal()),
                        lambda *a: variants.mixture_of_heads_attention_reference(*a, mask=masks.causal()),
                        (q, k, v, gates), ("q", "k", "v", "gates"))

    m = mixers.get("moh")(16, 4, rngs=nnx.Rngs(0), num_kv_heads=2, num_shared=1, top_k=2, positional="none",
                          monitor=True)
    graphdef, state = nnx.split(m)
    x = jax.random.normal(jax.random.key(10), (2, 7, 16))

    @tk.fast_jit
    def run(state, x):
        mm = nnx.merge(graphdef, state)
        (y, _), inter = nnx.capture(mm, nnx.Intermediate)(x)
        (aux,) = inter["moh_load_balance_loss"].get_value()
        qq = jnp.einsum("btd,dhf->bthf", x, mm.w_q[...])
        kk = jnp.einsum("btd,dkf->btkf", x, mm.w_k[...])
        vv = jnp.einsum("btd,dkf->btkf", x, mm.w_v[...])
        lg = lambda w: jnp.einsum("btd,de->bte", x, w[...])  # noqa: E731
        g, aux_ref = variants.head_gates(lg(mm.w_router), top_k=2, mix_logits=lg(mm.w_mix), num_shared=1)
        o = variants.mixture_of_heads_attention_reference(qq, kk, vv, g, mask=masks.causal())
        return y, jnp.einsum("bthf,hfd->btd", o, mm.w_o[...]), aux, aux_ref

    y, y_ref, aux, aux_ref = run(state, x)
    tk.assert_close(y, y_ref, name="moh mixer vs gates on hand-projected attention")
    tk.assert_close(aux, aux_ref, name="sown load-balance loss")
    with pytest.raises(ValueError, match="^top_k:"):
        mixers.get("moh")(16, 4, rngs=nnx.Rngs(0), num_shared=1, top_k=4)
    with pytest.raises(ValueError, match="^gates:"):
        variants.mixture_of_heads_attention(q, k, v, gates[..., :3])
