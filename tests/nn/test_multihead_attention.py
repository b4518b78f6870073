"""MultiHeadAttention against a hand-written einsum computation, and its options one by one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import mixers
from attn_jax.core import testing as tk
from attn_jax.nn import MultiHeadAttention
from attn_jax.positional import apply_rope

B, T, D, H = 2, 12, 32, 4


#: Inputs and module calls run as fast-compiled programs (tk.FAST_COMPILE; float32 results agree):
#: eager op-by-op dispatch compiled every primitive at every shape.
_normal = tk.fast_jit(lambda key, shape: jax.random.normal(key, shape, jnp.float32), static_argnums=1)


def _x(seed, t=T, b=B):
    return _normal(jax.random.key(seed), (b, t, D))


def jitted(m):
    """``m(x, cache=...)`` as one compiled function (decode loops then reuse one executable)."""
    graphdef, state = nnx.split(m)
    f = tk.fast_jit(lambda state, x, cache: nnx.merge(graphdef, state)(x, cache=cache))
    return lambda x, cache=None: f(state, x, cache)


def reference(m: MultiHeadAttention, x, *, context=None, context_valid=None):
    """Plain einsum multi-head attention for the same weights (no attn_jax attention code)."""
    wq, wk, wv, wo = (np.asarray(p[...], np.float64) for p in (m.w_q, m.w_k, m.w_v, m.w_o))
    x = np.asarray(x, np.float64)
    c = x if context is None else np.asarray(context, np.float64)
    q = np.einsum("btd,dhf->bthf", x, wq)
    k = np.einsum("bsd,dkf->bskf", c, wk)
    v = np.einsum("bsd,dkf->bskf", c, wv)
    scale = m.head_dim ** -0.5
    if m.qk_norm == "rms":
        q = q / np.sqrt((q ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(m.q_norm_scale[...])
        k = k / np.sqrt((k ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(m.k_norm_scale[...])
    elif m.qk_norm == "l2":
        q = q / np.sqrt((q ** 2).sum(-1, keepdims=True) + 1e-6) * float(m.qk_scale[...])
        k = k / np.sqrt((k ** 2).sum(-1, keepdims=True) + 1e-6)
        scale = 1.0
    if m.positional == "rope":
        q = np.asarray(apply_rope(jnp.asarray(q, jnp.float32)), np.float64)
        k = np.asarray(apply_rope(jnp.asarray(k, jnp.float32)), np.float64)
    group = m.num_heads // m.num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bthf,bshf->bhts", q, k) * scale
    if m.softcap is not None:
        s = m.softcap * np.tanh(s / m.softcap)
    Tq, S = s.shape[-2:]
    if m.positional in ("alibi", "t5"):
        s = s + np.asarray(m._bias().materialize(Tq, S), np.float64)
    allowed = np.ones((Tq, S), bool)
    if m.causal:
        allowed &= np.tril(np.ones((Tq, S), bool))
    if m.window is not None:
        i, j = np.arange(Tq)[:, None], np.arange(S)[None, :]
        allowed &= (j >= i - m.window) & ((j <= i) if m.causal else (j <= i + m.window))
    allowed = np.broadcast_to(allowed, s.shape)
    if context_valid is not None:
        allowed = allowed & np.asarray(context_valid, bool)[:, None, None, :]
    s = np.where(allowed, s, -np.inf)
    mx = s.max(-1, keepdims=True)
    if m.sinks is not None:
        sink = np.asarray(m.sinks[...], np.float64)[None, :, None, None]
        mx = np.maximum(mx, sink)
        e = np.exp(s - mx)
        p = e / (e.sum(-1, keepdims=True) + np.exp(sink - mx))
    else:
        e = np.exp(s - mx)
        p = e / e.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshf->bthf", p, v)
    if m.gate == "headwise":
        o = o * (1 / (1 + np.exp(-np.einsum("btd,dh->bth", x, np.asarray(m.w_gate[...])))))[..., None]
    elif m.gate == "elementwise":
        o = o * (1 / (1 + np.exp(-np.einsum("btd,dhf->bthf", x, np.asarray(m.w_gate[...])))))
    return np.einsum("bthf,hfd->btd", o, wo)


CONFIGS = {
    "mha_rope": dict(),
    "mqa_nopos": dict(num_kv_heads=1, positional="none"),
    "gqa_rmsnorm_headgate": dict(num_kv_heads=2, qk_norm="rms", gate="headwise"),
    "l2norm_elemgate_softcap_sinks_dk_ne_dv": dict(qk_norm="l2", gate="elementwise", softcap=2.0, sinks=True,
                                                   value_head_dim=6, positional="none"),
    "bidirectional_alibi": dict(causal=False, positional="alibi"),
    "t5_window": dict(positional="t5", window=4, num_kv_heads=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_einsum_reference(name):
    m = MultiHeadAttention(D, H, rngs=nnx.Rngs(1), **CONFIGS[name])
    if m.sinks is not None:
        m.sinks[...] = jnp.array([0.5, -1.0, 2.0, 0.0])
    if m.qk_norm == "rms":
        m.q_norm_scale[...] = jnp.linspace(0.5, 1.5, m.head_dim)
    x = _x(0)
    y, _ = jitted(m)(x)
    tk.assert_close(y, reference(m, x).astype(np.float32), name=name)


def test_cross_attention_reference_and_cached_decode():
    m = MultiHeadAttention(D, H, num_kv_heads=2, cross=True, rngs=nnx.Rngs(2))
    assert not m.causal and m.positional == "none"
    x, ctx = _x(0, t=5), _x(1, t=9)
    valid = np.arange(9)[None, :] < np.array([[9], [4]])
    y, _ = m(x, context=ctx, context_segment_ids=jnp.asarray(valid, jnp.int32))
    tk.assert_close(y, reference(m, x, context=ctx, context_valid=valid).astype(np.float32), name="cross")
    cache = m.cross_cache(ctx, jnp.asarray(valid, jnp.int32))
    y2, cache2 = m(x, cache=cache)
    tk.assert_close(y2, y, name="cross with cache")
    assert cache2 is cache
    with pytest.raises(ValueError, match="context"):
        m(x)


@pytest.mark.parametrize("positional", ["alibi", "t5"])
def test_structured_bias_prefill_decode(positional):
    m = MultiHeadAttention(D, H, positional=positional, rngs=nnx.Rngs(3))
    f = jitted(m)
    x = _x(4)
    full, _ = f(x)
    cache = m.init_cache(B, T)
    y, cache = f(x[:, :7], cache=cache)
    outs = [y]
    for t in range(7, T):
        y, cache = f(x[:, t:t + 1], cache=cache)
        outs.append(y)
    tk.assert_close(jnp.concatenate(outs, 1), full, name=f"{positional} decode")


def test_sliding_window_ring_and_full_cache_agree():
    x = _x(5)
    outs = {}
    for ring in (True, False):
        m = MultiHeadAttention(D, H, window=3, ring_cache=ring, rngs=nnx.Rngs(4))
        f = jitted(m)
        cache = m.init_cache(B, T)
        assert type(cache).__name__ == ("RingKVCache" if ring else "KVCache")
        y, cache = f(x[:, :5], cache=cache)
        seq = [y]
        for t in range(5, T):
            y, cache = f(x[:, t:t + 1], cache=cache)
            seq.append(y)
        outs[ring] = jnp.concatenate(seq, 1)
        tk.assert_close(outs[ring], reference(m, x).astype(np.float32), name=f"ring={ring}")


def test_dropout_uses_module_rngs_and_respects_deterministic():
    m = MultiHeadAttention(D, H, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1))
    x = _x(6)
    det1, _ = m(x)
    det2, _ = m(x, deterministic=True)
    a, _ = m(x, deterministic=False)
    b, _ = m(x, deterministic=False)
    np.testing.assert_array_equal(np.asarray(det1), np.asarray(det2))
    assert float(jnp.abs(a - det1).max()) > 1e-3
    assert float(jnp.abs(a - b).max()) > 1e-3, "the dropout key must advance between calls"
    assert np.isfinite(np.asarray(a)).all()


def test_bf16_compute_with_fp32_params():
    m32 = MultiHeadAttention(D, H, num_kv_heads=2, rngs=nnx.Rngs(5))
    m16 = MultiHeadAttention(D, H, num_kv_heads=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(5))
    assert m16.w_q[...].dtype == jnp.float32
    x = _x(7)
    f16 = jitted(m16)
    y16, _ = f16(x)
    assert y16.dtype == jnp.bfloat16
    tk.assert_close(y16, jitted(m32)(x)[0].astype(jnp.bfloat16), dtype=jnp.bfloat16, rel=3e-2, atol=1e-1)
    cache = m16.init_cache(B, T, jnp.bfloat16)
    y, cache = f16(x[:, :4], cache=cache)
    assert y.dtype == jnp.bfloat16 and cache.k.dtype == jnp.bfloat16


def test_parameter_count_and_sharding_axes():
    m = MultiHeadAttention(D, H, num_kv_heads=2, head_dim=6, value_head_dim=10, gate="headwise", sinks=True,
                           rngs=nnx.Rngs(0))
    n = sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n == D * H * 6 + D * 2 * 6 + D * 2 * 10 + H * 10 * D + D * H + H
    specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
    assert tuple(specs["w_q"].get_value()) == ("embed", "heads", "head_dim")
    assert tuple(specs["w_k"].get_value()) == ("embed", "kv_heads", "head_dim")
    assert tuple(specs["w_o"].get_value()) == ("heads", "head_dim", "embed")


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=30, num_heads=4), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(positional="sinusoid"), "positional"),
    (dict(qk_norm="layer"), "qk_norm"),
    (dict(gate="channel"), "gate"),
    (dict(cross=True, positional="rope"), "positional"),
    (dict(window=-1), "window"),
    (dict(dropout_rate=1.5), "dropout_rate"),
    (dict(head_dim=5), "head_dim"),
])
def test_bad_config_names_the_field(kwargs, field):
    args = dict(d_model=D, num_heads=H)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{field}:"):
        MultiHeadAttention(args.pop("d_model"), args.pop("num_heads"), rngs=nnx.Rngs(0), **args)


def test_unknown_mixer_lists_names_and_closest_match():
    with pytest.raises(ValueError) as e:
        mixers.get("sofmax")
    msg = str(e.value)
    for name in mixers.names():
        assert name in msg
    assert "did you mean 'softmax'" in msg


def test_register_new_entry_and_reject_duplicates():
    assert {"softmax", "sliding_window"} <= set(mixers.names())
    assert mixers.get("softmax") is MultiHeadAttention
    with pytest.raises(ValueError, match="already registered"):
        mixers.register("softmax", lambda d, h, *, rngs: None)
    with pytest.raises(ValueError, match="name"):
        mixers.register("a,b", MultiHeadAttention)
    try:
        mixers.register("softmax_alias_for_test", MultiHeadAttention)
        assert "softmax_alias_for_test" in mixers.names()
    finally:
        mixers._REGISTRY.pop("softmax_alias_for_test", None)
