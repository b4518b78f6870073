"""MLA (attn_jax.variants.mla, attn_jax.nn.mla): the absorbed form against the materialised
reference (values and gradients, float64), the MHA → MLA conversion at full rank against the MHA
layer, the latent cache (prefill + decode == full forward, bytes per token), bad inputs.  The
registry-wide invariants run in tests/nn/test_mixer_registry.py ("mla")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import mixers
from attn_jax.core import masks
from attn_jax.core import testing as tk
from attn_jax.nn import MultiHeadAttention
from attn_jax.nn.mla import MultiHeadLatentAttention
from attn_jax.softmax.kv_cache import KVCache
from attn_jax.variants import mla as M

_normal = tk.fast_jit(lambda key, shape: jax.random.normal(key, shape, jnp.float32), static_argnums=1)


def _jitted(m):
    graphdef, state = nnx.split(m)
    f = tk.fast_jit(lambda state, x, cache: nnx.merge(graphdef, state)(x, cache=cache))
    return lambda x, cache=None: f(state, x, cache)


# ----------------------------------------------------------------------------- functional forms


def test_absorbed_equals_reference_values_and_grads():
    """GQA (H=4, K=2), two rotary keys (G=2), Dk = Dn + Dr != Dv, causal & packed segments, T != S:
    the absorbed form (MQA over the latent rows) equals the materialised reference on o and on the
    gradients of all six inputs."""
    B, T, S, H, K, G, C, Dn, Dr, Dv = 2, 5, 7, 4, 2, 2, 6, 4, 2, 3
    keys = jax.random.split(jax.random.key(0), 7)
    shapes = [(B, T, H, Dn), (B, T, H, Dr), (B, S, C), (B, S, G, Dr), (C, K, Dn), (C, K, Dv)]
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0]], jnp.int32)
    mask = masks.causal() & masks.segments(seg[:, S - T:], seg)

    def run(keys):
        args = [jax.random.normal(kk, s, jnp.float32) for kk, s in zip(keys, shapes)]
        return [tk.vjp_with_random_cotangent(lambda *a, impl=impl: M.mla_attention(*a, mask=mask, impl=impl),
                                             args, keys[6]) for impl in ("reference", "absorbed")]

    (o_ref, g_ref), (o, g) = tk.fast_jit(run)(keys)
    assert np.abs(np.asarray(o_ref[0])).max() > 0.1
    tk.assert_close(o, o_ref, name="absorbed: o")
    assert not np.asarray(o[1, -1]).any()              # the padding query (segment id 0) sees no key
    for name, a, b in zip(("q_nope", "q_rope", "c_kv", "k_rope", "w_uk", "w_uv"), g, g_ref):
        assert np.abs(np.asarray(b)).max() > 0, name
        tk.assert_close(a, b, grad=True, name=f"absorbed: d{name}")


def test_absorbed_query_scores_the_latent_rows():
    """q~ · [c; k^R] == q^C · (W^UK c) + q^R · k^R, per head and rotary group."""
    B, T, H, K, G, C, Dn, Dr = 1, 3, 4, 2, 2, 5, 3, 2
    rng = np.random.default_rng(0)
    qn, qr = rng.normal(size=(B, T, H, Dn)), rng.normal(size=(B, T, H, Dr))
    c, kr, wuk = rng.normal(size=(B, T, C)), rng.normal(size=(B, T, G, Dr)), rng.normal(size=(C, K, Dn))
    with tk.float64():
        q_abs = np.asarray(M.absorb_query(jnp.asarray(qn), jnp.asarray(qr), jnp.asarray(wuk), G))
        rows = np.asarray(M.latent_rows(jnp.asarray(c), jnp.asarray(kr)))
    got = np.einsum("bthl,bsl->bhts", q_abs, rows)
    kc = np.einsum("bsc,ckn->bskn", c, wuk)
    kv_head, rope_head = np.arange(H) // (H // K), np.arange(H) // (H // G)
    want = np.einsum("bthn,bshn->bhts", qn, kc[:, :, kv_head]) + np.einsum("bthr,bshr->bhts", qr, kr[:, :, rope_head])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the layer and its cache


def test_prefill_decode_equals_full_forward_low_rank_query_and_bf16():
    """Low-rank query path, latent norm, K=2 kv heads, G=2 rotary keys: a 7-token prefill then
    single steps == the full forward (float32); the bfloat16 layer stays within bf16 tolerance."""
    d, H, T = 32, 4, 12
    m = tk.build_module(MultiHeadLatentAttention, d, H, num_kv_heads=2, q_rank=20, kv_rank=12, rope_key_heads=2, seed=3)
    x = _normal(jax.random.key(1), (2, T, d))
    call = _jitted(m)
    full = call(x)[0]
    y, cache = tk.prefill_then_decode(call, x, m.init_cache(2, T, jnp.float32), 7)
    tk.assert_close(y, full, name="prefill + decode vs full")
    assert cache.latent.shape == (2, T, 12 + 2 * m.rope_head_dim) and int(cache.lengths[0]) == T
    m.dtype = jnp.bfloat16   # same parameters, bfloat16 compute
    y16 = _jitted(m)(x)[0]
    assert y16.dtype == jnp.bfloat16
    tk.assert_close(y16, full, dtype=jnp.bfloat16, name="bf16 layer vs f32")


def _np_mha_partial_rope(mha, x, pairs):
    """Float64 MHA (causal) whose RoPE rotates only the pairs ``pairs[g]`` of each kv head ``g``."""
    wq, wk, wv, wo = (np.asarray(p[...], np.float64) for p in (mha.w_q, mha.w_k, mha.w_v, mha.w_o))
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    H, K, D = mha.num_heads, mha.num_kv_heads, mha.head_dim
    q, k, v = (np.einsum("btd,dhf->bthf", x, w) for w in (wq, wk, wv))
    half = D // 2
    inv = mha.rope_base ** (-np.arange(0, D, 2) / D)
    pos = np.arange(T)[None, :]
    group = np.arange(H) // (H // K)

    def rot(y, f):          # rotate pair (f, f + D/2) of the view y [B, T, D] in place
        a, b = y[..., f].copy(), y[..., f + half].copy()
        cos, sin = np.cos(pos * inv[f]), np.sin(pos * inv[f])
        y[..., f], y[..., f + half] = a * cos - b * sin, b * cos + a * sin

    for g in range(K):
        for f in pairs[g]:
            rot(k[:, :, g], f)
            for h in np.flatnonzero(group == g):
                rot(q[:, :, h], f)
    s = np.einsum("bthf,bshf->bhts", q, k[:, :, group]) / np.sqrt(D)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshf->bthf", p, v[:, :, group])
    return np.einsum("bthf,hfd->btd", o, wo)


@pytest.mark.parametrize("positional, rope_pairs", [("none", None), ("rope", "all"), ("rope", 2)])
def test_conversion_at_full_rank_reproduces_mha(positional, rope_pairs):
    """MHA2MLA at the joint matrix's full rank (d = 16 < K (Dn + Dv) = 32 for the NoPE layer): the
    converted layer reproduces the MHA layer (no RoPE, or every pair kept), or the MHA with RoPE
    on the selected pairs only (partial RoPE, 2-norm selection); a lower rank does not."""
    d, H, K, D = 16, 4, 2, 8
    mha = tk.build_module(MultiHeadAttention, d, H, num_kv_heads=K, head_dim=D, positional=positional, seed=1)
    x = _normal(jax.random.key(2), (2, 10, d))
    if rope_pairs == "all":
        mla = MultiHeadLatentAttention.from_mha(mha, kv_rank=16, rope_pairs=D // 2, strategy="high")
        assert mla.head_dim == 0 and mla.latent_dim == 16 + K * D
    elif rope_pairs == 2:
        mla = MultiHeadLatentAttention.from_mha(mha, kv_rank=16, rope_pairs=2, calibration=np.asarray(x))
        assert (mla.head_dim, mla.rope_head_dim, mla.rope_key_heads) == (4, 4, K)
    else:
        mla = MultiHeadLatentAttention.from_mha(mha, kv_rank=16)
        assert mla.rope_head_dim == 0 and mla.latent_dim == 16
    y = _jitted(mla)(x)[0]
    if rope_pairs == 2:
        ref = _np_mha_partial_rope(mha, x, mla.rope_pairs)
    else:
        ref = _jitted(mha)(x)[0]
    tk.assert_close(y, ref, dtype=jnp.float32, name=f"{positional}/{rope_pairs}: MLA vs MHA")
    if positional == "none":   # a truncated latent is an approximation: the check above can fail
        low = MultiHeadLatentAttention.from_mha(mha, kv_rank=6)
        assert tk.rel_rmse(_jitted(low)(x)[0], ref) > 1e-3


def test_select_rope_pairs_strategies():
    """2-norm keeps, per kv head, the pairs with the largest |q|·|k| (summed over its query heads)."""
    N, H, K, D = 5, 4, 2, 8
    rng = np.random.default_rng(0)
    q, k = 0.01 * rng.normal(size=(N, H, D)), 0.01 * rng.normal(size=(N, K, D))
    q[:, 0:2, 3] += 5.0          # kv head 0's queries: pair 3 (dims 3 and 7)
    k[:, 0, 7] += 5.0
    q[:, 2:4, 1] += 5.0          # kv head 1: pairs 1 and 0
    k[:, 1, 1] += 5.0
    q[:, 2:4, 0] += 1.0
    k[:, 1, 4] += 1.0
    np.testing.assert_array_equal(M.select_rope_pairs(q, k, 1), [[3], [1]])
    assert M.select_rope_pairs(q, k, 2)[1].tolist() == [0, 1]
    kw = dict(head_dim=D, kv_heads=K)
    assert M.select_rope_pairs(None, None, 2, strategy="high", **kw).tolist() == [[0, 1], [0, 1]]
    assert M.select_rope_pairs(None, None, 2, strategy="low", **kw).tolist() == [[2, 3], [2, 3]]
    assert M.select_rope_pairs(None, None, 2, strategy="uniform", **kw).tolist() == [[0, 2], [0, 2]]


def test_joint_svd_error_is_the_dropped_singular_values():
    rng = np.random.default_rng(1)
    wq, wk, wv = rng.normal(size=(16, 4, 8)), rng.normal(size=(16, 2, 8)), rng.normal(size=(16, 2, 8))
    pairs = np.array([[0, 2], [1, 3]])
    conv = M.mha_to_mla(wq, wk, wv, kv_rank=5, rope_pairs=pairs)
    nope = np.stack([np.setdiff1d(np.arange(8), np.r_[p, p + 4]) for p in pairs])
    joint = np.concatenate([np.take_along_axis(wk, nope[None], 2).reshape(16, -1), wv.reshape(16, -1)], axis=1)
    approx = conv.w_dkv @ np.concatenate([conv.w_uk.reshape(5, -1), conv.w_uv.reshape(5, -1)], axis=1)
    err = np.linalg.norm(joint - approx) / np.linalg.norm(joint)
    assert err > 0.1 and abs(err - conv.relative_error) < 1e-12
    np.testing.assert_array_equal(conv.w_kr[:, 1], wk[:, 1, [1, 3, 5, 7]])


def test_cache_bytes_per_token_deepseek_ratio():
    """d_c = 4 d_h, d^R = d_h / 2 (DeepSeek-V2): 4.5 d_h per token vs MHA's 2 H d_h (H = 16: 1/7.1)."""
    H, dh = 16, 64
    m = nnx.eval_shape(lambda: MultiHeadLatentAttention(H * dh, H, kv_rank=4 * dh, rope_head_dim=dh // 2,
                                                         rngs=nnx.Rngs(0)))
    cache = m.init_cache(1, 4, jnp.bfloat16)
    assert cache.bytes_per_token == (4 * dh + dh // 2) * 2
    mha = KVCache.init(1, 4, H, dh, jnp.bfloat16)
    mha_bytes = (mha.k.nbytes + mha.v.nbytes) // 4
    assert cache.bytes_per_token * 4 <= mha_bytes and mha_bytes == 2 * H * dh * 2
    assert cache.latent.nbytes == 4 * cache.bytes_per_token


def test_bad_inputs_name_the_argument():
    kw = dict(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="^rope_head_dim:.*even"):
        MultiHeadLatentAttention(32, 4, rope_head_dim=3, **kw)
    with pytest.raises(ValueError, match="^kv_rank:.*64"):
        MultiHeadLatentAttention(32, 4, kv_rank=65, **kw)
    with pytest.raises(ValueError, match="^kv_rank:"):
        MultiHeadLatentAttention(32, 4, kv_rank=0, **kw)
    with pytest.raises(ValueError, match="^q_rank:"):
        MultiHeadLatentAttention(32, 4, q_rank=10_000, **kw)
    with pytest.raises(ValueError, match="^rope_key_heads:"):
        MultiHeadLatentAttention(32, 4, num_kv_heads=2, rope_key_heads=3, **kw)
    with pytest.raises(ValueError, match="^causal:"):
        mixers.get("mla")(32, 4, causal=False, **kw)
    with pytest.raises(ValueError, match="^num_pairs:"):
        M.select_rope_pairs(None, None, 5, strategy="high", head_dim=8, kv_heads=1)
    w = np.zeros((16, 2, 8))
    with pytest.raises(ValueError, match="^kv_rank:.*16"):
        M.mha_to_mla(w, w, w, kv_rank=17)
    with pytest.raises(ValueError, match="^rope_pairs:"):
        M.mha_to_mla(w, w, w, kv_rank=4, rope_pairs=np.array([[0, 0], [1, 2]]))
    x = jnp.zeros((1, 3, 2, 4))
    with pytest.raises(ValueError, match="^w_uk:"):
        M.mla_attention(x, x[..., :2], jnp.zeros((1, 3, 5)), jnp.zeros((1, 3, 1, 2)), jnp.zeros((5, 1, 3)),
                        jnp.zeros((5, 1, 4)))
    with pytest.raises(ValueError, match="^impl:"):
        M.mla_attention(x, x, x[..., 0, :], x, x[0], x[0], impl="fast")
    cache = M.LatentKVCache.init(1, 4, 6)
    with pytest.raises(ValueError, match="^latent_new:"):
        cache.append(jnp.zeros((1, 2, 5)))
    with pytest.raises(TypeError, match="^cache:"):
        M.mla_prefill(x, x, x[..., 0, :], x, x[0], x[0], KVCache.init(1, 4, 1, 4))
