"""Linear / recurrent attention mixers: layer wiring against hand-written computations from the
parameters (ops in ``impl="reference"``), decode after a ragged prefill, bf16, parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import mixers
from attn_jax.core import testing as tk
from attn_jax.linear.agent import agent_attention_reference
from attn_jax.linear.delta_rule import delta_rule, gated_delta_rule
from attn_jax.linear.efficient_attention import efficient_attention_reference
from attn_jax.linear.feature_maps import dpfp, hedgehog, performer_features
from attn_jax.linear.flowformer import flow_attention_reference
from attn_jax.linear.gla import gla
from attn_jax.linear.lightning import lightning_attention
from attn_jax.linear.linear_attention import cosformer_attention_reference, linear_attention
from attn_jax.linear.log_normal import lln_moment_matching, log_normal_attention_reference
from attn_jax.linear.retention import retention
from attn_jax.linear.ssd import ssd
from attn_jax.nn.linear_mixers import LinearAttentionCache, LinearAttentionMixer, RandomFeatures, linear_declarations
from attn_jax.nn.protocol import FEATURE_KEYS
from attn_jax.nn.short_conv import causal_conv1d_reference

B, T, D, H, K = 2, 12, 16, 4, 2
NAMES = sorted(n for n, d in linear_declarations().items() if d.causal)      # decoder mechanisms
ENCODER_ONLY = sorted(n for n, d in linear_declarations().items() if not d.causal)
# the mechanisms with a non-causal form (normalised linear attention without decays, Flowformer),
# written out here so that the declarations' directions are checked against an independent list
BIDIRECTIONAL_DECODERS = {"linear", "based", "performer", "dpfp", "hedgehog", "cosformer", "lln", "flow"}
LLN_AB = tuple(float(t) for t in lln_moment_matching(1.0, 1.0))   # (alpha, beta) for unit-variance q, k
COS_M = 16            # cosFormer's M for these tests (>= T, so the cos weights matter)
SEG = np.array([[1] * 5 + [2] * 5 + [0] * 2, [0, 3, 3, 0, 3, 3, 3, 4, 4, 0, 4, 4]], np.int32)  # padding anywhere


def _mixer(name, **kw):
    extra = {"max_len": COS_M} if name == "cosformer" else {}
    return mixers.get(name)(D, H, rngs=nnx.Rngs(0), **{"num_kv_heads": K, **extra, **kw})


def _x(seed, b=B, t=T):
    return jax.random.normal(jax.random.key(seed), (b, t, D), jnp.float32)


# ----------------------------------------------------------------------------- hand-written layers
def _rep(a):
    return jnp.repeat(a, H // a.shape[2], axis=2)


def _rms(o, axes, eps=1e-5):
    return o / jnp.sqrt(jnp.mean(o * o, axis=axes, keepdims=True) + eps)


def _manual(name, p, x, seg, causal=True):
    """The layer of the mechanism's paper written out from the parameters ``p``."""
    ein = lambda w: jnp.einsum("btd,dhf->bthf", x, w)  # noqa: E731
    q, k, v = ein(p["w_q"]), ein(p["w_k"]), ein(p["w_v"])
    if "conv_q" in p:
        conv = lambda a, w: jax.nn.silu(causal_conv1d_reference(a, w, segment_ids=seg)[0])  # noqa: E731
        q, k, v = conv(q, p["conv_q"]), conv(k, p["conv_k"]), conv(v, p["conv_v"])
    gate = jnp.einsum("btd,dhv->bthv", x, p["w_g"]) if "w_g" in p else None
    kw = dict(segment_ids=seg, impl="reference")
    la = dict(eps=1e-6, causal=causal, **kw)
    dk = q.shape[-1]
    rms = lambda a: a / jnp.sqrt(jnp.mean(a * a, -1, keepdims=True) + 1e-6)  # noqa: E731
    if name == "linear":                                           # Katharopoulos 2020, Eq. 4-9
        o, _ = linear_attention(q, k, v, feature_map="elu", **la)
    elif name == "performer":                                      # FAVOR+: exp(Wx - |x|^2/2)/sqrt(m)
        def phi_q(a):  # the layer's documented per-query max shift (cancels in the ratio up to eps)
            x_ = a * dk ** -0.25
            z = jnp.einsum("bthd,md->bthm", x_, p["projection"]) - 0.5 * jnp.sum(x_ * x_, -1, keepdims=True)
            return jnp.exp(z - z.max(-1, keepdims=True)) / np.sqrt(p["projection"].shape[0])
        phi_k = lambda a: performer_features(a * dk ** -0.25, p["projection"])  # noqa: E731  (unshifted)
        o, _ = linear_attention(q, k, v, feature_map=(phi_q, phi_k), **la)
    elif name == "dpfp":                                           # Schlag 2021, DPFP-1
        o, _ = linear_attention(q, k, v, feature_map=lambda a: dpfp(a, nu=1), **la)
    elif name == "hedgehog":                                       # Zhang 2024: per-head learned maps
        fmaps = (lambda a: hedgehog(a, p["hh_wq"], p["hh_bq"]), lambda a: hedgehog(a, p["hh_wk"], p["hh_bk"]))
        o, _ = linear_attention(q, _rep(k), _rep(v), feature_map=fmaps, **la)
    elif name == "cosformer":                                      # Qin 2022: dense cos((i-j)pi/2M) form
        o = cosformer_attention_reference(q, k, v, max_len=COS_M, causal=causal, segment_ids=seg)
    elif name == "lln":                                            # Nahshan 2023 on RMS-normalised q, k
        o = log_normal_attention_reference(rms(q), rms(k), v, alpha=LLN_AB[0], beta=LLN_AB[1], causal=causal, segment_ids=seg)
    elif name == "efficient":                                      # Shen 2021: rho_q(Q) (rho_k(K)^T V)
        o = efficient_attention_reference(q, k, v, segment_ids=seg)
    elif name == "agent":                                          # Han 2024, agents pooled per document
        o = agent_attention_reference(q, k, v, num_agents=16, segment_ids=seg, max_segments=8)
    elif name == "flow":                                           # Wu 2022, Flow-Attention
        o, _ = flow_attention_reference(q, k, v, causal=causal, segment_ids=seg)
    elif name == "based":                                          # Arora 2024: Taylor map on d'=16 features
        o, _ = linear_attention(q, k, v, feature_map="taylor", eps=1e-6, **kw)
    elif name == "retnet":                                         # Sun 2023, Eq. 8-9
        o, _ = retention(q, k, v, **kw)
        mu, var = o.mean(-1, keepdims=True), o.var(-1, keepdims=True)
        o = jax.nn.silu(gate) * ((o - mu) / jnp.sqrt(var + 1e-5) * p["norm_scale"] + p["norm_bias"])
    elif name == "lightning":                                      # TransNormerLLM §3.2
        o, _ = lightning_attention(jax.nn.silu(q), jax.nn.silu(k), v, **kw)
        o = _rms(o, (-2, -1)) * gate
    elif name == "gla":                                            # Yang 2023 §4.4
        log_g = jax.nn.log_sigmoid(jnp.einsum("btr,rhk->bthk", x @ p["w_gate_a"], p["w_gate_b"]) + p["b_gate"]) / 16
        o, _ = gla(q, k, v, log_g, **kw)
        o = _rms(o, -1) * p["norm_scale"] * jax.nn.silu(gate)
    elif name == "ssd":                                            # Mamba-2
        dt = jax.nn.softplus(jnp.einsum("btd,dh->bth", x, p["w_dt"]) + p["dt_bias"])
        o, _ = ssd(q, _rep(k), _rep(v) * dt[..., None], -jnp.exp(p["A_log"]) * dt, **kw)
        o = o + p["D"][:, None] * _rep(v)
        o = _rms(o * jax.nn.silu(gate), (-2, -1)) * p["norm_scale"]
    else:                                                          # (Gated) DeltaNet
        l2 = lambda a: a / jnp.sqrt(jnp.sum(a * a, -1, keepdims=True) + 1e-6)  # noqa: E731
        beta = jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x, p["w_beta"]))
        if name == "deltanet":
            o, _ = delta_rule(l2(q), l2(k), v, beta, **kw)
        else:
            log_alpha = -jnp.exp(p["A_log"]) * jax.nn.softplus(jnp.einsum("btd,dh->bth", x, p["w_dt"]) + p["dt_bias"])
            o, _ = gated_delta_rule(l2(q), l2(k), v, beta, log_alpha, **kw)
        o = _rms(o, -1) * p["norm_scale"] * jax.nn.silu(gate)
    o = jnp.where((seg != 0)[:, :, None, None], o, 0.0)
    return jnp.einsum("bthv,hvd->btd", o, p["w_o"])


def _params(m):
    """Every variable of the mixer by its leaf name (a short conv's kernel by the conv's name)."""
    p = {}
    for path, var in nnx.to_flat_state(nnx.state(m)):
        name = str(path[-2] if path[-1] == "kernel" else path[-1])
        assert name not in p, f"two variables named {name!r}"
        p[name] = var[...]
    return p


@pytest.mark.parametrize("name", NAMES)
def test_layer_matches_hand_written_computation(name):
    m = _mixer(name)
    x, seg = _x(0), jnp.asarray(SEG)
    y, cache = m(x, segment_ids=seg)
    assert cache is None and y.shape == (B, T, D)
    ref = tk.fast_jit(_manual, static_argnums=0)(name, _params(m), x, seg)
    tk.assert_close(y, ref, name=f"{name}: layer vs hand-written")
    assert float(jnp.abs(ref).max()) > 0.0


@pytest.mark.parametrize("name", ENCODER_ONLY + ["cosformer", "lln", "flow"])
def test_noncausal_layer_matches_hand_written_computation(name):
    m = _mixer(name, causal=False)
    x, seg = _x(7), jnp.asarray(SEG)
    y, cache = m(x, segment_ids=seg)
    assert cache is None and y.shape == (B, T, D)
    ref = tk.fast_jit(_manual, static_argnums=(0, 4))(name, _params(m), x, seg, False)
    tk.assert_close(y, ref, name=f"{name}: non-causal layer vs hand-written")
    assert float(jnp.abs(ref).max()) > 0.0


# every decoder mixer runs prefill + decode and ragged prefill in tests/nn/test_mixer_registry.py;
# here one mechanism per kind of op / state (a padding step inside decode, bf16)
REPRESENTATIVE = ["linear", "performer", "cosformer", "gla", "ssd", "deltanet", "flow"]


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_decode_after_ragged_prefill_equals_full(name):
    """Prefill rows of 12 and 5 valid tokens, then T=1 steps (row 1 skips one: a padding step)."""
    m = _mixer(name)
    graphdef, state = nnx.split(m)
    call = tk.fast_jit(lambda x, seg, cache: nnx.merge(graphdef, state)(x, segment_ids=seg, cache=cache))
    full_fn = tk.fast_jit(lambda x: nnx.merge(graphdef, state)(x)[0])
    x = _x(1, t=T + 3)
    n_valid = np.array([T, 5])
    seg = (np.arange(T)[None] < n_valid[:, None]).astype(np.int32)
    cache = m.init_cache(B, 64, jnp.float32)
    y, cache = call(x[:, :T], jnp.asarray(seg), cache)
    outs, rows = [[y[0]], [y[1, :5]]], [list(range(T)), list(range(5))]
    for t in range(T, T + 3):
        step = np.array([[1], [0 if t == T + 1 else 1]], np.int32)
        y, cache = call(x[:, t:t + 1], jnp.asarray(step), cache)
        for r in range(B):
            if step[r, 0]:
                outs[r].append(y[r])
                rows[r].append(t)
            else:
                assert float(jnp.abs(y[r]).max()) == 0.0
    np.testing.assert_array_equal(np.asarray(cache.lengths), [T + 3, 7])
    # row r alone, its valid tokens only, right-padded to a common length
    xs = jnp.stack([jnp.pad(x[r, np.array(rows[r])], ((0, T + 3 - len(rows[r])), (0, 0))) for r in range(B)])
    full = full_fn(xs)
    for r in range(B):
        tk.assert_close(jnp.concatenate(outs[r], axis=0), full[r, :len(rows[r])], name=f"{name}: row {r}")


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_bf16_smoke(name):
    m32 = _mixer(name)
    m16 = _mixer(name, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x, seg = _x(2), jnp.asarray(SEG)
    y16, _ = m16(x, segment_ids=seg)
    assert y16.dtype == jnp.bfloat16 and m16.w_q[...].dtype == jnp.bfloat16
    y32, _ = m32(x, segment_ids=seg)   # (same signature as the wiring test: compiled once)
    tk.assert_close(y16, y32, rel=5e-2, atol=2e-1, name=f"{name}: bf16 vs fp32")
    cache = m16.init_cache(B, 8, jnp.bfloat16)
    y, cache = m16(x[:, :1], cache=cache)
    assert y.dtype == jnp.bfloat16 and all(s.dtype == jnp.float32 for s in jax.tree.leaves(cache.state))


def test_parameter_counts_and_axes():
    Dk, Dv, w = D // H, D // H, 4
    base = lambda dk: D * H * dk + D * K * dk + D * K * Dv + H * Dv * D  # noqa: E731
    conv = w * (H * Dk + K * Dk + K * Dv)
    gate = D * H * Dv
    expected = {
        "linear": base(Dk),
        "based": base(16),
        "retnet": base(Dk) + gate + 2 * H * Dv,
        "lightning": base(Dk) + gate,
        "gla": base(Dk // 2) + D * 16 + 16 * H * (Dk // 2) + H * (Dk // 2) + gate + Dv,
        "ssd": base(Dk) + conv + D * H + 3 * H + gate + H * Dv,
        "deltanet": base(Dk) + conv + D * H + gate + Dv,
        "gated_deltanet": base(Dk) + conv + 2 * D * H + 2 * H + gate + Dv,
        "performer": base(Dk),                            # the random projection is not a Param
        "dpfp": base(Dk),
        "hedgehog": base(Dk) + 2 * (H * Dk * Dk + H * Dk),
        "cosformer": base(Dk),
        "lln": base(Dk),
        "efficient": base(Dk),
        "agent": base(Dk),
        "flow": base(Dk),
    }
    assert set(expected) == set(NAMES + ENCODER_ONLY)
    for name in NAMES + ENCODER_ONLY:
        m = _mixer(name, **({"causal": False} if name in ENCODER_ONLY else {}))
        state = nnx.state(m, nnx.Param)
        assert sum(p.size for p in jax.tree.leaves(state)) == expected[name], name
        for path, var in nnx.to_flat_state(state):   # every parameter names a logical axis per dimension
            axes = var.out_sharding
            assert axes is not None and len(axes) == var[...].ndim and any(axes), (name, path, axes)
        specs = nnx.get_partition_spec(state)
        assert tuple(specs["w_q"].get_value()) == ("embed", "heads", "head_dim")
        assert tuple(specs["w_k"].get_value()) == ("embed", "kv_heads", "head_dim")
        assert tuple(specs["w_o"].get_value()) == ("heads", "head_dim", "embed")
        if m.use_conv:
            assert tuple(specs["conv_k"]["kernel"].get_value()) == (None, "kv_heads", "head_dim")


def test_registry_entries_and_features():
    for name in NAMES:
        factory = mixers.get(name)
        assert factory.SUPPORTED_FEATURES <= FEATURE_KEYS
        assert {"mha", "gqa", "causal", "segments", "bf16"} <= factory.SUPPORTED_FEATURES
        noncausal = name in BIDIRECTIONAL_DECODERS
        assert ("bidirectional" in factory.SUPPORTED_FEATURES) == noncausal, name
    for name in ENCODER_ONLY:
        feats = mixers.get(name).SUPPORTED_FEATURES
        assert "bidirectional" in feats and "causal" not in feats and feats <= FEATURE_KEYS
    assert "segments" in mixers.get("efficient").SUPPORTED_FEATURES
    assert "segments" in mixers.get("agent").SUPPORTED_FEATURES          # agents pooled per document
    assert "dk_ne_dv" in mixers.get("gla").SUPPORTED_FEATURES
    m = _mixer("gla")
    assert (m.head_dim, m.value_head_dim) == (D // H // 2, D // H)   # GLA halves the key dim


def test_cache_is_a_pytree_and_options():
    m = _mixer("deltanet", num_kv_heads=1, short_conv=False, output_gate=False)
    assert not m.use_conv and m.output_gate is None and "w_g" not in _params(m)
    cache = m.init_cache(B, 10**9, jnp.float32)        # bounded: max_len is ignored
    assert isinstance(cache, LinearAttentionCache) and cache.conv_state is None
    assert cache.state.shape == (B, H, D // H, D // H)
    leaves = jax.tree.leaves(_mixer("linear").init_cache(B, 8, jnp.float32))
    assert [a.shape for a in leaves] == [(B, H, D // H, D // H + 1), (B,)]   # normaliser column
    x = _x(3)
    y, _ = m(x)
    assert y.shape == (B, T, D) and np.isfinite(np.asarray(y)).all()


def test_cache_state_sizes_follow_the_feature_dimension():
    Dk, Dv = D // H, D // H
    sizes = {"performer": 2 * Dk, "dpfp": 2 * Dk, "hedgehog": 2 * Dk, "cosformer": 2 * Dk, "lln": Dk}
    for name, f in sizes.items():
        assert _mixer(name).init_cache(B, 8).state.shape == (B, H, f, Dv + 1), name
    assert _mixer("performer", num_features=5).init_cache(B, 8).state.shape == (B, H, 5, Dv + 1)
    assert _mixer("dpfp", nu=3).init_cache(B, 8).state.shape == (B, H, 6 * Dk, Dv + 1)
    assert _mixer("hedgehog", feature_dim=3).init_cache(B, 8).state.shape == (B, H, 6, Dv + 1)


def test_performer_projection_is_a_redrawable_buffer():
    m = _mixer("performer")
    proj = m.features.projection
    assert isinstance(proj, RandomFeatures) and not isinstance(proj, nnx.Param)
    assert proj[...].shape == (2 * (D // H), D // H)
    assert not any(p.shape == proj[...].shape and np.array_equal(p, proj[...])
                   for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    x = _x(8)
    y0, _ = m(x)
    old = np.asarray(proj[...])
    m.redraw(jax.random.key(5))
    assert not np.allclose(np.asarray(m.features.projection[...]), old)
    y1, _ = m(x)
    assert float(jnp.abs(y1 - y0).max()) > 1e-4
    with pytest.raises(ValueError, match="^redraw:"):
        _mixer("linear").redraw(jax.random.key(0))


def test_hedgehog_distillation_trains_the_feature_maps():
    """A few dozen Adam steps on the hh_* parameters only shrink the KL part of the Hedgehog loss
    (cross-entropy minus the teacher's entropy) on fixed inputs; the rest of the layer is frozen."""
    import optax

    m = _mixer("hedgehog", num_kv_heads=H)
    x = _x(9, b=2, t=16)
    q = jnp.einsum("btd,dhf->bthf", x, m.w_q[...])
    k = jnp.einsum("btd,dhf->bthf", x, m.w_k[...])
    logits = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D // H)
    mask = np.tril(np.ones((16, 16), bool))
    a = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), -1)
    entropy = float(-jnp.mean(jnp.sum(jnp.where(mask, a * jnp.log(jnp.where(mask, a, 1.0)), 0.0), -1)))
    is_map = lambda path, _: str(path[-1]).startswith("hh_")  # noqa: E731
    graphdef, maps, rest = nnx.split(m, is_map, ...)
    opt = optax.adam(5e-2)

    @tk.fast_jit
    def train(maps):
        def loss(maps):
            return nnx.merge(graphdef, maps, rest).distillation_loss(x)

        def step(carry, _):
            maps, st = carry
            val, g = jax.value_and_grad(loss)(maps)
            upd, st = opt.update(g, st, maps)
            return (optax.apply_updates(maps, upd), st), val

        (maps, _), vals = jax.lax.scan(step, (maps, opt.init(maps)), None, length=30)
        return vals, loss(maps)

    vals, final = train(maps)
    kl0, kl1 = float(vals[0]) - entropy, float(final) - entropy
    assert kl0 > 0.05 and kl1 < 0.5 * kl0, (kl0, kl1)      # measured: 0.137 -> ~0.035
    # the segment-masked objective equals the plain one on a single document
    tk.assert_close(m.distillation_loss(x, segment_ids=jnp.ones((2, 16), jnp.int32)), m.distillation_loss(x),
                    name="distillation loss with one segment")
    with pytest.raises(ValueError, match="^distillation_loss:"):
        _mixer("linear").distillation_loss(x)


def test_causal_and_encoder_only_errors_name_the_mechanism():
    with pytest.raises(ValueError, match="^causal:.*'efficient'.*non-causal only"):
        _mixer("efficient")
    with pytest.raises(ValueError, match="^causal:.*'agent'"):
        _mixer("agent", causal=True)
    with pytest.raises(ValueError, match="^causal:.*'gla'.*no non-causal form"):
        _mixer("gla", causal=False)
    with pytest.raises(ValueError, match="^causal:.*'deltanet'"):
        _mixer("deltanet", causal=False)
    enc = _mixer("linear", causal=False)
    with pytest.raises(ValueError, match="^init_cache:"):
        enc.init_cache(B, 8)
    with pytest.raises(ValueError, match="^cache:"):
        enc(_x(0), cache=_mixer("linear").init_cache(B, 8))


def test_agent_rows_with_too_many_documents_are_nan():
    m = _mixer("agent", causal=False, max_segments=1)
    packed = jnp.asarray(np.array([[1] * 6 + [2] * 6, [1] * 12], np.int32))
    y, _ = m(_x(0), segment_ids=packed)      # loud, not silently wrong: the row over the bound is NaN
    assert np.isnan(np.asarray(y[0])).all() and np.isfinite(np.asarray(y[1])).all()


@pytest.mark.parametrize("kw, field", [
    (dict(mechanism="nope"), "mechanism"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(head_dim=0), "head_dim"),
    (dict(mechanism="linear", num_features=8), "num_features"),
    (dict(mechanism="performer", num_features=0), "num_features"),
    (dict(mechanism="dpfp", nu=2 * (D // H)), "nu"),
    (dict(mechanism="gla", max_len=8), "max_len"),
    (dict(mechanism="linear", causal="no"), "causal"),
])
def test_bad_arguments_name_the_field(kw, field):
    with pytest.raises((ValueError, TypeError), match=f"^{field}:"):
        LinearAttentionMixer(D, H, rngs=nnx.Rngs(0), **{"mechanism": "gla", **kw})


def test_initializers_are_constructor_arguments():
    """Every parameter comes from an initializer the user can replace (projections: kernel_init;
    components: initializers={component: {argument: init}})."""
    zeros, ones = nnx.initializers.zeros, nnx.initializers.ones
    m = _mixer("ssd", kernel_init=ones, conv_init=zeros,
               initializers={"decay": {"a_log_init": zeros, "dt_bias_init": ones, "skip_init": zeros},
                             "output_gate": {"kernel_init": zeros}, "output_norm": {"scale_init": zeros}})
    p = _params(m)
    for name in ("w_q", "w_k", "w_v", "w_o", "dt_bias"):
        assert np.all(np.asarray(p[name]) == 1.0), name
    for name in ("conv_q", "conv_k", "conv_v", "A_log", "D", "w_g", "norm_scale"):
        assert np.all(np.asarray(p[name]) == 0.0), name
    default = _params(_mixer("ssd"))   # the defaults: A = exp(A_log) in [1, 16], dt = softplus(dt_bias) in [1e-4, 0.1]
    assert np.all((np.exp(default["A_log"]) >= 1.0) & (np.exp(default["A_log"]) <= 16.0))
    dt = np.log1p(np.exp(np.asarray(default["dt_bias"])))
    assert np.all((dt >= 1e-4 - 1e-7) & (dt <= 0.1 + 1e-6)) and np.ptp(dt) > 0
    with pytest.raises(ValueError, match="^initializers:"):
        _mixer("gla", initializers={"nope": {}})
