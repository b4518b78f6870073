"""attn_jax.flax: attention_fn inside stock Flax attention modules matches Flax's default attention
(values and gradients, bool / float masks, extra batch axes, decode=True caching); linen_mixer runs
registered mixers inside Linen models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import attn_jax as aj
from attn_jax.core import testing as tk

F, HEADS = 16, 4


def _assert_grads_close(got, want):
    """Gradient pytrees compared as one vector (the key-projection bias gets a gradient that is zero
    up to rounding, so a per-leaf relative error would measure noise)."""
    flat = lambda t: jnp.concatenate([jnp.ravel(l) for l in jax.tree.leaves(t)])
    assert jax.tree.structure(got) == jax.tree.structure(want)
    tk.assert_close(flat(got), flat(want), grad=True, name="gradients")


def _padding(B, S, lengths):
    return jnp.arange(S)[None, :] < jnp.asarray(lengths)[:, None]


def _compare_nnx(x, mask=None, is_causal=False, num_kv_heads=None):
    """Values and gradients (w.r.t. parameters and input) of stock nnx.MultiHeadAttention with Flax's
    attention and with attn_jax's, same parameters, one compiled program."""
    def build(fn):
        kw = {} if fn is None else {"attention_fn": fn}
        return nnx.MultiHeadAttention(HEADS, F, num_kv_heads=num_kv_heads, decode=False, rngs=nnx.Rngs(0), **kw)

    ref_mod, our_mod = build(None), build(aj.flax.attention_fn())
    graph_ref, params = nnx.split(ref_mod)
    graph_our, params_our = nnx.split(our_mod)
    jax.tree.map(np.testing.assert_array_equal, params, params_our)
    ct = jax.random.normal(jax.random.key(1), x.shape)

    def loss(graph, p, x):
        y = nnx.merge(graph, p)(x, mask=mask, is_causal=is_causal)
        return (y * ct).sum(), y

    def both(p, x):
        return [jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(g, p, x) for g in (graph_ref, graph_our)]

    ((_, y_ref), g_ref), ((_, y_our), g_our) = tk.compiled(both, params, x)
    tk.assert_close(y_our, y_ref, name="output")
    _assert_grads_close(g_our, g_ref)
    return y_our


def test_nnx_causal_float_mask_and_padding():
    B, T = 2, 7
    x = jax.random.normal(jax.random.key(0), (B, T, F))
    causal = nnx.make_causal_mask(jnp.ones((B, T)))                        # float32 [B, 1, T, T]
    assert causal.dtype == jnp.float32
    pad = nnx.make_attention_mask(jnp.ones((B, T)), _padding(B, T, [7, 4]))  # keys padded, bool-valued float
    _compare_nnx(x, mask=nnx.combine_masks(causal, pad))


def test_nnx_is_causal_gqa_bool_mask_and_extra_batch_axes():
    x = jax.random.normal(jax.random.key(2), (2, 3, 5, F))                  # [batch..., T, F]
    mask = jnp.broadcast_to(_padding(6, 5, [5, 3, 4, 5, 2, 5]).reshape(2, 3, 1, 1, 5), (2, 3, 1, 5, 5))
    y = _compare_nnx(x, mask=mask, is_causal=True, num_kv_heads=2)
    assert y.shape == x.shape


def test_linen_mhdpa_masks_and_deterministic_dropout():
    B, T = 2, 6
    x = jax.random.normal(jax.random.key(3), (B, T, F))
    mask = linen.combine_masks(linen.make_causal_mask(jnp.ones((B, T))),
                               linen.make_attention_mask(jnp.ones((B, T)), _padding(B, T, [6, 3])))
    # dropout_rate > 0 with deterministic=True: no dropout, and no dropout_rng demanded.
    kw = dict(num_heads=HEADS, qkv_features=F, dropout_rate=0.3, deterministic=True)
    ref, ours = linen.MultiHeadDotProductAttention(**kw), linen.MultiHeadDotProductAttention(
        **kw, attention_fn=aj.flax.attention_fn())
    params = ref.init(jax.random.key(0), x, x, mask=mask)
    ct = jax.random.normal(jax.random.key(4), x.shape)

    def both(p, x):
        outs = []
        for mod in (ref, ours):
            f = lambda p, x: ((y := mod.apply(p, x, x, mask=mask)) * ct).sum()  # noqa: B023
            outs.append((mod.apply(p, x, x, mask=mask), jax.grad(f, argnums=(0, 1))(p, x)))
        return outs

    (y_ref, g_ref), (y_our, g_our) = tk.compiled(both, params, x)
    tk.assert_close(y_our, y_ref, name="output")
    _assert_grads_close(g_our, g_ref)


def test_nnx_decode_matches_flax_decode():
    B, T = 2, 5
    x = jax.random.normal(jax.random.key(5), (B, T, F))

    def run(fn):
        kw = {} if fn is None else {"attention_fn": fn}
        mod = nnx.MultiHeadAttention(HEADS, F, decode=True, rngs=nnx.Rngs(0), **kw)
        mod.init_cache((B, T, F))
        graph, state = nnx.split(mod)

        def step(state, xt):
            m = nnx.merge(graph, state)
            y = m(xt)
            return nnx.split(m)[1], y[:, 0]

        return jax.lax.scan(step, state, jnp.swapaxes(x, 0, 1)[:, :, None])[1]

    y_ref, y_our = tk.compiled(lambda: (run(None), run(aj.flax.attention_fn())))
    tk.assert_close(y_our, y_ref, name="decode")
    # and decoding equals the full causal forward with attn_jax
    full = nnx.MultiHeadAttention(HEADS, F, decode=False, attention_fn=aj.flax.attention_fn(), rngs=nnx.Rngs(0))
    y_full = tk.compiled(lambda x: full(x, is_causal=True), x)
    tk.assert_close(jnp.swapaxes(y_our, 0, 1), y_full, name="decode vs full")


def test_dropout_contract():
    q, k, v = tk.random_qkv_compiled(jax.random.key(6), B=1, T=4, H=2, Dk=8)
    fn = aj.flax.attention_fn()
    key = jax.random.key(7)
    with pytest.raises(ValueError, match="broadcast_dropout"):
        fn(q, k, v, dropout_rate=0.2, dropout_rng=key, deterministic=False)
    with pytest.raises(ValueError, match="dropout_rng"):
        fn(q, k, v, dropout_rate=0.2, deterministic=False, broadcast_dropout=False)
    with pytest.raises(ValueError, match="sow_weights"):
        fn(q, k, v, module=object())
    with pytest.raises(TypeError, match="fixed arguments may be"):
        aj.flax.attention_fn(dropout_rate=0.1)
    got, want, det = tk.compiled(lambda: (
        fn(q, k, v, dropout_rate=0.2, dropout_rng=key, deterministic=False, broadcast_dropout=False),
        aj.attention(q, k, v, dropout_rate=0.2, dropout_rng=key),
        fn(q, k, v, dropout_rate=0.2, dropout_rng=key, deterministic=True)))
    np.testing.assert_array_equal(got, want)
    tk.assert_close(det, tk.compiled(lambda: aj.attention(q, k, v)), name="deterministic")
    assert not np.allclose(got, det)


@pytest.mark.parametrize("name", ["softmax", "gla"])
def test_linen_mixer_in_a_linen_model(name):
    class Tiny(linen.Module):
        @linen.compact
        def __call__(self, x):
            h = linen.Dense(F)(x)
            h = h + aj.flax.linen_mixer(name, F, HEADS)(h)
            return linen.Dense(3)(h)

    B, T = 2, 6
    x = jax.random.normal(jax.random.key(8), (B, T, F))
    model = Tiny()
    variables = model.init(jax.random.key(0), x)
    assert any("mixer" in str(p) for p in jax.tree_util.tree_flatten_with_path(variables["params"])[0])
    x2 = x.at[:, 4:].set(0.0)  # causal mixers: outputs before position 4 unchanged

    def run(v):
        # one forward over both inputs (stacked on a new batch axis), inside the gradient's program
        def loss(v):
            ys = model.apply(v, jnp.concatenate([x, x2]))
            return (ys[:B] ** 2).sum(), ys
        g, ys = jax.grad(loss, has_aux=True)(v)
        return ys[:B], ys[B:], g

    y, y2, g = tk.compiled(run, variables)
    assert y.shape == (B, T, 3) and np.isfinite(y).all()
    np.testing.assert_allclose(y[:, :4], y2[:, :4], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y[:, 4:], y2[:, 4:])
    mixer_grads = [l for p, l in jax.tree_util.tree_flatten_with_path(g)[0] if "mixer" in str(p)]
    assert mixer_grads and all(np.isfinite(l).all() for l in mixer_grads)
    assert any(np.abs(l).sum() > 0 for l in mixer_grads)
    with pytest.raises(ValueError, match="registered mixers"):
        aj.flax.linen_mixer("GLAA", F, HEADS)


def test_linen_decode_matches_flax_decode():
    B, T = 2, 4
    x = jax.random.normal(jax.random.key(9), (B, T, F))
    ref = linen.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=F, decode=True)
    ours = linen.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=F, decode=True,
                                              attention_fn=aj.flax.attention_fn())
    variables = ref.init(jax.random.key(0), x, x)   # sizes the cache for T tokens

    def run(mod):
        def step(cache, xt):
            y, upd = mod.apply({"params": variables["params"], "cache": cache}, xt, xt, mutable=["cache"])
            return upd["cache"], y[:, 0]
        return jax.lax.scan(step, variables["cache"], jnp.swapaxes(x, 0, 1)[:, :, None])[1]

    y_ref, y_our = tk.compiled(lambda: (run(ref), run(ours)))
    tk.assert_close(y_our, y_ref, name="linen decode")
