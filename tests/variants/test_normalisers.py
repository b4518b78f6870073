"""Score normalisers of attn_jax.variants: tiled forms vs references (values and every gradient),
sparsemax / entmax against sort-based float64 NumPy references and their known properties,
gradients against finite differences, the length scale, explain, and bad inputs.

Cheap by construction: small shapes, one compiled program per configuration (the tiled form and
its reference in the same program), block sizes of 4 x 8 so a 13 x 21 problem spans many tiles.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import testing as tk
from attn_jax.variants import rowwise as RW

V = aj.variants
SCORES = {"sigmoid": RW.SIGMOID, "relu": RW.RELU, "softplus": RW.SOFTPLUS}


def _tiled_vs_reference(score, mask, shape, offset=0.0, dtype=jnp.float32, block=(4, 8)):
    B, T, S, H, K, Dk, Dv = shape
    q, k, v = tk.random_qkv_compiled(jax.random.key(0), B=B, T=T, S=S, H=H, K=K, Dk=Dk, Dv=Dv, dtype=dtype)
    scale = 0.7

    def both(q, k, v):
        fast = tk.vjp_with_random_cotangent(
            lambda *a: RW.rowwise_blockwise(*a, score=score, mask=mask, scale=scale, offset=offset,
                                            block_q=block[0], block_k=block[1]), (q, k, v), jax.random.key(1))
        ref = tk.vjp_with_random_cotangent(
            lambda *a: RW.rowwise_reference(*(x.astype(jnp.float32) for x in a), score=score, mask=mask,
                                            scale=scale, offset=offset), (q, k, v), jax.random.key(1))
        return fast, ref

    (o, grads), (o_ref, grads_ref) = tk.compiled(both, q, k, v)
    tk.assert_close(o, o_ref.astype(dtype), dtype=dtype, name=f"{score.name}: o")
    for g, g_ref, n in zip(grads, grads_ref, "qkv"):
        tk.assert_close(g, g_ref.astype(dtype), dtype=dtype, grad=True, name=f"{score.name}: d{n}")
    return o, grads


@pytest.mark.parametrize("name", sorted(SCORES))
def test_tiled_matches_reference_gqa_causal_window(name):
    """GQA (H=4, K=2), T != S (bottom-right causal), a window: EMPTY/PARTIAL/FULL tiles, ragged blocks."""
    _tiled_vs_reference(SCORES[name], masks.causal() & masks.sliding_window(5), (2, 13, 21, 4, 2, 8, 6),
                        offset=-0.5)


def test_tiled_segments_fully_masked_rows_zero():
    """Packed segments (a traced mask: per-tile lax.switch) with padding: padded queries see no key,
    so their output and their dq are exactly 0; l1-normalised (softplus) engine."""
    B, T = 2, 16
    ids = np.array([[1] * 5 + [2] * 8 + [0] * 3, [1] * 16], np.int32)
    mask = masks.segments(jnp.asarray(ids)) & masks.causal()
    o, (dq, dk, dv) = _tiled_vs_reference(RW.SOFTPLUS, mask, (B, T, T, 4, 4, 8, 8))
    assert float(jnp.abs(o[0, 13:]).max()) == 0.0
    assert float(jnp.abs(dq[0, 13:]).max()) == 0.0


@pytest.mark.parametrize("name", ["sigmoid", "softplus"])
def test_tiled_nan_in_key_only_phantom_rows_see(name):
    """Issue 25's phantom-row case on the normalisers' tiles: T = 13 is ragged for bq = 4, so the
    last query block holds 3 zero rows past T; under causal(offset=0) with S = T + 1 the last key is
    seen by none of the 13 real queries (only by a phantom row), so a NaN there must not reach any
    output or gradient."""
    B, T, S, H = 1, 13, 14, 2
    q, k, v = tk.random_qkv_compiled(jax.random.key(3), B=B, T=T, S=S, H=H, K=H, Dk=8, Dv=8)
    k, v = k.at[:, S - 1].set(jnp.nan), v.at[:, S - 1].set(jnp.nan)
    mask = masks.causal(offset=0)
    fn = lambda *a: RW.rowwise_blockwise(*a, score=SCORES[name], mask=mask, scale=0.7, block_q=4, block_k=8)
    o, grads = tk.compiled_vjp(fn, (q, k, v), jax.random.key(4))
    for x, n in zip((o, *grads), ("o", "dq", "dk", "dv")):
        x = np.asarray(x)
        x = x[:, :S - 1] if n in ("dk", "dv") else x
        assert np.isfinite(x).all(), f"{name}: NaN from an unused key reached {n}"


def test_tiled_single_query_row():
    """T = 1 (a decode-like call) over 21 keys, MQA (K = 1)."""
    _tiled_vs_reference(RW.SIGMOID, masks.causal(), (2, 1, 21, 4, 1, 8, 8), offset=-math.log(21))


def test_tiled_bf16():
    """bfloat16 in, float32 accumulation.  l1-normalised (|o| <= max |v|): an unnormalised sum of 16
    terms would exceed the kit's absolute bf16 tolerance by its own output rounding alone."""
    _tiled_vs_reference(RW.SOFTPLUS, masks.causal(), (1, 16, 16, 2, 2, 16, 16), dtype=jnp.bfloat16)


def test_public_ops_dispatch_and_options():
    """impl='xla' == impl='reference' through the public ops; b='-log n' is -log S; length_scale is
    the factor log(S)/log(base) on the logits; ReLA = RMSNorm(raw) * gain * gate."""
    q, k, v = tk.random_qkv_compiled(jax.random.key(3), B=1, T=12, S=12, H=2, K=1, Dk=8, Dv=8)
    m = masks.causal()
    gain = jax.random.normal(jax.random.key(4), (2, 8))
    gate = jax.nn.sigmoid(jax.random.normal(jax.random.key(5), (1, 12, 2, 8)))
    base_scale = 8 ** -0.5

    def run(q, k, v):
        return dict(
            sig_xla=V.sigmoid_attention(q, k, v, mask=m, impl="xla"),
            sig_ref=V.sigmoid_attention_reference(q, k, v, mask=m, b=-math.log(12)),
            soft_len=V.softplus_attention(q, k, v, mask=m, length_scale=4.0, impl="xla"),
            soft_ref=V.softplus_attention_reference(q, k, v, mask=m, scale=base_scale * math.log(12) / math.log(4)),
            rela=V.relu_attention(q, k, v, mask=m, gain=gain, gate=gate),
            rela_ref=V.rela_output(V.relu_attention_reference(q, k, v, mask=m), gain=gain, gate=gate),
            raw=V.relu_attention(q, k, v, mask=m, output_norm=None, impl="reference"))

    r = tk.compiled(run, q, k, v)
    tk.assert_close(r["sig_xla"], r["sig_ref"], name="sigmoid b=-log n")
    tk.assert_close(r["soft_len"], r["soft_ref"], name="softplus length_scale")
    tk.assert_close(r["rela"], r["rela_ref"], name="ReLA output norm")
    # ReLA's raw output is Σ relu(s) v: unnormalised, so it grows with the visible keys
    assert float(jnp.abs(r["raw"]).max()) > 0


def test_rela_head_switches_off():
    """A head whose visible scores are all <= 0 outputs exactly 0 (with finite, zero gradients)."""
    q = jnp.ones((1, 4, 2, 4)).at[:, :, 1].set(-1.0)      # head 1: q.k < 0 for every key
    k = jnp.ones((1, 4, 1, 4))
    v = jax.random.normal(jax.random.key(0), (1, 4, 1, 4))
    o, grads = tk.compiled_vjp(lambda q, k, v: V.relu_attention(q, k, v, impl="xla"), (q, k, v), jax.random.key(1))
    assert float(jnp.abs(o[:, :, 1]).max()) == 0.0 and float(jnp.abs(o[:, :, 0]).max()) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert float(jnp.abs(grads[0][:, :, 1]).max()) == 0.0


# ----------------------------------------------------------------------------- sparsemax / entmax


def np_sparsemax(z):
    """Sort-based sparsemax of one row (float64), -inf entries excluded."""
    z = np.asarray(z, np.float64)
    fin = np.isfinite(z)
    if not fin.any():
        return np.zeros_like(z)
    zs = np.sort(z[fin])[::-1]
    cs = np.cumsum(zs)
    k = np.arange(1, len(zs) + 1)
    k_star = k[1 + k * zs > cs].max()
    tau = (cs[k_star - 1] - 1) / k_star
    return np.where(fin, np.maximum(np.where(fin, z, 0) - tau, 0), 0)


def np_entmax15(z):
    """Sort-based exact 1.5-entmax of one row (float64): p = [z/2 - τ]², τ from the sorted prefix."""
    z = np.asarray(z, np.float64)
    fin = np.isfinite(z)
    if not fin.any():
        return np.zeros_like(z)
    x = np.sort(z[fin] / 2)[::-1]
    k = np.arange(1, len(x) + 1)
    mean = np.cumsum(x) / k
    var = np.cumsum(x * x) / k - mean ** 2
    tau = mean - np.sqrt(np.maximum(1 / k - var, 0))
    k_star = k[tau <= x].max()
    t = tau[k_star - 1]
    return np.where(fin, np.maximum(np.where(fin, z, 0) / 2 - t, 0) ** 2, 0)


def _rows(seed=0, n_rows=6, n=9):
    z = np.random.default_rng(seed).normal(size=(n_rows, n)) * 2.0
    z[1, 3:] = -np.inf                      # partly masked row
    z[2, :] = -np.inf                       # fully masked row
    z[3, :] = 0.5                           # ties
    return z


def test_row_maps_vs_numpy_sort_references():
    z = _rows()
    with tk.float64():
        zj = jnp.asarray(z)
        sm, e2, e15, e1 = tk.compiled(lambda z: (V.sparsemax(z), V.entmax_bisect(z, 2.0, 80),
                                                 V.entmax_bisect(z, 1.5, 80), V.entmax_bisect(z, 1.0001, 80)), zj)
    ref_sm = np.stack([np_sparsemax(r) for r in z])
    ref_15 = np.stack([np_entmax15(r) for r in z])
    np.testing.assert_allclose(np.asarray(sm), ref_sm, atol=1e-12)
    np.testing.assert_allclose(np.asarray(e2), ref_sm, atol=1e-9)          # alpha = 2 is sparsemax
    np.testing.assert_allclose(np.asarray(e15), ref_15, atol=1e-9)
    live = np.isfinite(z).any(axis=1)
    for p in (sm, e15):
        p = np.asarray(p)
        np.testing.assert_allclose(p[live].sum(axis=1), 1.0, atol=1e-12)   # rows sum to 1
        assert (p[~live] == 0).all() and (p[~np.isfinite(z)] == 0).all()
        assert (p[live] == 0).any()                                         # exact zeros
    soft = np.where(np.isfinite(z), np.exp(z - np.max(np.where(np.isfinite(z), z, -1e9), 1, keepdims=True)), 0)
    soft = soft / np.maximum(soft.sum(1, keepdims=True), 1e-300)
    np.testing.assert_allclose(np.asarray(e1)[live], soft[live], atol=2e-3)  # alpha -> 1 is softmax


def test_row_map_gradients_vs_finite_differences():
    """Directional derivatives of sparsemax and entmax (in z and in alpha) vs central differences."""
    z = _rows(1)[[0, 1, 4, 5]]
    rng = np.random.default_rng(2)
    u = np.where(np.isfinite(z), rng.normal(size=z.shape), 0.0)
    g = rng.normal(size=z.shape)
    alpha = np.array([[1.3], [1.5], [1.8], [1.6]])
    eps = 1e-6
    with tk.float64():
        def dirs(z, a, u, g):
            f_sm = lambda z: jnp.sum(V.sparsemax(z) * g)  # noqa: E731
            f_en = lambda z, a: jnp.sum(V.entmax_bisect(z, a, 100) * g)  # noqa: E731
            zu = jnp.where(jnp.isfinite(z), z, 0) + 0 * u
            sm = (jnp.sum(jax.grad(f_sm)(z) * u), (f_sm(jnp.where(jnp.isfinite(z), z + eps * u, z))
                                                    - f_sm(jnp.where(jnp.isfinite(z), z - eps * u, z))) / (2 * eps))
            gz, ga = jax.grad(f_en, argnums=(0, 1))(z, a)
            en_z = (jnp.sum(gz * u), (f_en(jnp.where(jnp.isfinite(z), z + eps * u, z), a)
                                      - f_en(jnp.where(jnp.isfinite(z), z - eps * u, z), a)) / (2 * eps))
            en_a = (ga, jax.vmap(lambda i: (f_en(z, a.at[i].add(eps)) - f_en(z, a.at[i].add(-eps))) / (2 * eps))(
                jnp.arange(a.shape[0])))
            del zu
            return sm, en_z, en_a

        sm, en_z, en_a = tk.compiled(dirs, jnp.asarray(z), jnp.asarray(alpha), jnp.asarray(u), jnp.asarray(g))
    np.testing.assert_allclose(float(sm[0]), float(sm[1]), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(float(en_z[0]), float(en_z[1]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(en_a[0]).ravel(), np.asarray(en_a[1]).ravel(), rtol=1e-4, atol=1e-7)


def _one_hot_values(S, K):
    """v = identity over the keys: the output of a head is its weight row."""
    return jnp.broadcast_to(jnp.eye(S, dtype=jnp.float32)[None, :, None, :], (1, S, K, S))


def test_attention_weights_entmax_sparsemax_cog_clipped():
    """With v = I the outputs are the weights: entmax (alpha per head 1.5 / 2) and sparsemax match
    the NumPy sort references on every masked row; Cog weights are sign(s) softmax(|s|); the clipped
    softmax has exact zeros and equals softmax at gamma = 0, zeta = 1."""
    T, S, H = 6, 7, 2
    q, k, _ = tk.random_qkv_compiled(jax.random.key(6), B=1, T=T, S=S, H=H, K=1, Dk=4, Dv=4)
    v = _one_hot_values(S, 1)
    m = masks.causal()
    alpha = jnp.array([1.5, 2.0])

    def run(q, k, v):
        return (V.entmax_attention(q, k, v, mask=m, alpha=alpha, n_iter=60),
                V.sparsemax_attention(q, k, v, mask=m), V.cog_attention(q, k, v, mask=m),
                V.clipped_softmax(q, k, v, mask=m, gamma=-0.1, zeta=1.1),
                V.clipped_softmax(q, k, v, mask=m), aj.attention(q, k, v, mask=m, impl="reference"))

    ent, sm, cog, clip, clip_id, soft = tk.compiled(run, q, k, v)
    s = np.einsum("bthd,bskd->bhts", np.asarray(q, np.float64), np.asarray(k, np.float64)) * 4 ** -0.5
    vis = np.asarray(m.materialize(T, S)).reshape(T, S)
    z = np.where(vis, s[0], -np.inf)                                        # [H, T, S]
    for t in range(T):
        np.testing.assert_allclose(np.asarray(ent)[0, t, 0], np_entmax15(z[0, t]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(ent)[0, t, 1], np_sparsemax(z[1, t]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(sm)[0, t, 1], np_sparsemax(z[1, t]), atol=1e-5)
        a = np.where(vis[t], np.exp(np.abs(s[0, :, t]) - np.abs(s[0, :, t]).max(-1, keepdims=True)), 0)
        np.testing.assert_allclose(np.asarray(cog)[0, t], np.sign(s[0, :, t]) * a / a.sum(-1, keepdims=True),
                                   atol=1e-5)
    np.testing.assert_allclose(np.asarray(sm).sum(-1), 1.0, atol=1e-5)
    assert (np.asarray(clip)[0][:, :, :][np.broadcast_to(vis[:, None, :], (T, H, S))] == 0).any()
    np.testing.assert_allclose(np.abs(np.asarray(cog)).sum(-1), 1.0, atol=1e-5)
    tk.assert_close(clip_id, soft, name="clipped softmax at gamma=0, zeta=1")


def test_entmax_attention_gradients_vs_finite_differences():
    """d/dq, d/dk, d/dv and d/dalpha of entmax attention (float64) vs central differences along a
    random direction, with a causal mask."""
    with tk.float64():
        q, k, v = (x.astype(jnp.float64) for x in tk.random_qkv(jax.random.key(7), B=1, T=5, S=5, H=2, K=1, Dk=4,
                                                                 Dv=3))
        alpha = jnp.array([1.4, 1.7])
        ct = jax.random.normal(jax.random.key(8), (1, 5, 2, 3), jnp.float64)
        dirs = [jax.random.normal(jax.random.key(9 + i), x.shape, jnp.float64) for i, x in enumerate((q, k, v, alpha))]

        def check(q, k, v, alpha):
            f = lambda *a: jnp.sum(V.entmax_attention(*a[:3], mask=masks.causal(), alpha=a[3], n_iter=60) * ct)  # noqa
            grads = jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, alpha)
            eps = 1e-6
            pairs = []
            for i, (g, d) in enumerate(zip(grads, dirs)):
                plus = [x + eps * d if j == i else x for j, x in enumerate((q, k, v, alpha))]
                minus = [x - eps * d if j == i else x for j, x in enumerate((q, k, v, alpha))]
                pairs.append((jnp.sum(g * d), (f(*plus) - f(*minus)) / (2 * eps)))
            return pairs

        pairs = tk.compiled(check, q, k, v, alpha)
    for name, (an, fd) in zip(("q", "k", "v", "alpha"), pairs):
        np.testing.assert_allclose(float(an), float(fd), rtol=1e-5, atol=1e-8, err_msg=name)


# ----------------------------------------------------------------------------- explain and bad inputs


def test_explain_says_what_runs_and_why():
    q = jax.ShapeDtypeStruct((1, 8, 2, 4), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 8, 2, 4), jnp.float32)
    d = aj.explain(V.sigmoid_attention, q, k, k)
    assert d.chosen == {"cpu": "dense", "cuda": "xla", "rocm": "xla", "tpu": "xla"}
    big = jax.ShapeDtypeStruct((1, 4096, 2, 4), jnp.float32)
    d = aj.explain(V.softplus_attention, big, big, big, platform="cpu")
    assert d.chosen == {"cpu": "xla"} and "dense budget" in str(d)
    d = aj.explain(V.entmax_attention, q, k, k)
    assert set(d.chosen.values()) == {"reference"}
    assert "row-global" in str(d)
    with pytest.raises(ValueError, match="blockwise"):
        V.sparsemax_attention(jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2, 1, 4)),
                              impl="blockwise")


@pytest.mark.parametrize("call, match", [
    (lambda x: V.sigmoid_attention(x, x, x, b="log n"), "^b:"),
    (lambda x: V.sigmoid_attention(x, x, x, length_scale=1.0), "^length_scale:"),
    (lambda x: V.relu_attention(x, x, x, output_norm="layer"), "^output_norm:"),
    (lambda x: V.relu_attention(x, x, x, gain=jnp.ones((3, 4))), "^gain:"),
    (lambda x: V.entmax_attention(x, x, x, alpha=1.0), "^alpha:"),
    (lambda x: V.entmax_attention(x, x, x, alpha=jnp.full((3,), 1.5)), "^alpha:"),
    (lambda x: V.entmax_attention(x, x, x, n_iter=0), "^n_iter:"),
    (lambda x: V.clipped_softmax(x, x, x, gamma=0.1), "^gamma:"),
    (lambda x: V.clipped_softmax(x, x, x, zeta=0.5), "^zeta:"),
    (lambda x: V.softplus_attention(x, x, x[:, :, :, :3].astype(jnp.float16)), "dtype"),
    (lambda x: V.cog_attention(x, x[:, :3], x), "sequence length mismatch"),
    (lambda x: V.softplus_attention(x, x, x, mask=jnp.ones((1, 2, 5, 6), bool)), "^mask"),
])
def test_bad_inputs_name_the_argument(call, match):
    x = jnp.ones((1, 5, 2, 4))
    with pytest.raises((ValueError, TypeError), match=match):
        call(x)


def test_unexpected_keyword_is_refused():
    x = jnp.ones((1, 5, 2, 4))
    with pytest.raises(TypeError, match="softcap"):
        V.sigmoid_attention(x, x, x, softcap=30.0)


def test_mixer_hook_refuses_softmax_only_options():
    """MultiHeadAttention(attention_fn=...) names the softmax-only option it cannot honour."""
    from flax import nnx
    from attn_jax.nn import MultiHeadAttention
    from attn_jax.nn.variant_mixers import FixedNormaliser
    for kw, name in ((dict(softcap=30.0), "softcap"), (dict(sinks=True), "sinks"), (dict(positional="alibi"),
                                                                                  "positional")):
        with pytest.raises(ValueError, match=f"^{name}:"):
            MultiHeadAttention(16, 2, attention_fn=FixedNormaliser("cog_attention"), rngs=nnx.Rngs(0), **kw)
    assert {"sigmoid", "rela", "softplus", "entmax", "sparsemax", "clipped_softmax", "cog"} <= set(
        aj.mixers.names(causal=True))
