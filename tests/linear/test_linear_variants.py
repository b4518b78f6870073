"""Linear-attention variants (linear attention, cosFormer, Efficient Attention, BASED, Agent,
Flowformer, LLN): fast form ⇄ reference on outputs and VJPs (float64), packed ⇄ per-document,
causality, prefill + decode, bf16, vmap, bad input."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.core import testing as tk
from attn_jax.linear import feature_maps as fm
from attn_jax.linear.agent import agent_attention, agent_attention_reference, pool_agents
from attn_jax.linear.based import (based_attention, based_attention_reference, based_prefill, init_based_cache)
from attn_jax.linear.efficient_attention import efficient_attention, efficient_attention_reference
from attn_jax.linear.flowformer import (FlowState, flow_attention, flow_attention_reference, flow_attention_step,
                                       init_flow_state)
from attn_jax.linear.linear_attention import (cosformer_attention, cosformer_attention_reference, linear_attention,
                                              linear_attention_reference)
from attn_jax.linear.log_normal import (LLN_A, LLN_B, lln_moment_matching, log_normal_attention,
                                        log_normal_attention_reference)

SEG = np.array([[1] * 6 + [2] * 5 + [0] * 2 + [3] * 4,       # T = 17: three documents with padding between
                [0] * 2 + [4] * 15])


def _qkv(key, B=2, T=17, H=4, K=2, Dk=5, Dv=3, dtype=jnp.float64, S=None):
    return tk.random_qkv(key, B=B, T=T, S=S, H=H, K=K, Dk=Dk, Dv=Dv, dtype=dtype)


def _first(fn):
    """``(o, state) -> o`` for the ops that return a state."""
    return lambda *a: fn(*a)[0]


def _out_and_grads(fn, args, ct):
    """``fn(*args)`` and its VJP for the cotangent ``ct``, compiled as one program."""
    def both(*a):
        out, pullback = jax.vjp(fn, *a)
        return out, pullback(ct)
    return jax.jit(both)(*args)


def _parity(fast, ref, args, key=jax.random.key(99), name=""):
    """Outputs and VJPs (same random cotangent) of two callables agree (float64 tolerances)."""
    shape = jax.eval_shape(ref, *args)
    ct = jax.random.normal(key, shape.shape, jnp.float32).astype(shape.dtype)
    out, grads = _out_and_grads(fast, args, ct)
    rout, rgrads = _out_and_grads(ref, args, ct)
    tk.assert_close(out, rout, name=f"{name} output")
    for i, (a, b) in enumerate(zip(grads, rgrads)):
        tk.assert_close(a, b, grad=True, name=f"{name} grad of input {i}")


# ----------------------------------------------------------------------------- linear attention
def _hedgehog_pair():
    W = 0.5 * jax.random.normal(jax.random.key(5), (4, 5, 3), jnp.float64)
    return (lambda x: fm.hedgehog(x, W), lambda x: fm.hedgehog(x, W[::2]))   # q: 4 heads, k: 2 heads (GQA)


@pytest.mark.slow  # the same parity runs in make test through tests/linear/test_catalog.py
@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention_matches_reference_over_feature_maps(causal):
    with tk.float64():
        q, k, v = _qkv(jax.random.key(0))
        # elu (default), a per-head learned pair with GQA (Hedgehog) and BASED's Taylor map
        maps = {"hedgehog": _hedgehog_pair(), "taylor": "taylor"} if causal else {"elu": "elu"}
        for name, f in maps.items():
            kw = dict(feature_map=f, causal=causal, segment_ids=jnp.asarray(SEG))
            _parity(_first(functools.partial(linear_attention, **kw)),
                    _first(functools.partial(linear_attention_reference, **kw)), (q, k, v), name=name)


def test_linear_attention_initial_and_final_state_and_unnormalised(impl="chunk"):
    with tk.float64():
        q, k, v = _qkv(jax.random.key(1), H=2, K=1, Dk=3, Dv=4)
        Dk_f = 3                                                   # elu keeps the dimension
        for normalize in (True, False):
            h0 = jnp.abs(jax.random.normal(jax.random.key(2), (2, 2, Dk_f, 4 + normalize), jnp.float64))
            kw = dict(feature_map="elu", normalize=normalize, initial_state=h0, return_final_state=True,
                      segment_ids=jnp.asarray(SEG))
            fast = jax.jit(functools.partial(linear_attention, impl=impl, **kw))
            ref = jax.jit(functools.partial(linear_attention_reference, **kw))
            (o, s), (ro, rs) = fast(q, k, v), ref(q, k, v)
            tk.assert_close(o, ro, name=f"{impl} normalize={normalize} o")
            tk.assert_close(s, rs, name=f"{impl} normalize={normalize} final state")
        assert s.shape == (2, 2, Dk_f, 4)


def test_linear_attention_normaliser_is_last_state_column():
    with tk.float64():
        q, k, v = _qkv(jax.random.key(3), B=1, T=6, H=2, K=2, Dk=3, Dv=2)
        _, s = jax.jit(functools.partial(linear_attention, feature_map="elu", return_final_state=True))(q, k, v)
        assert s.shape == (1, 2, 3, 3)
        tk.assert_close(s[..., -1], fm.elu_plus_one(k).sum(1), name="z = Σ_j φ(k_j)")


@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention_packed_equals_per_document(causal):
    with tk.float64():
        q, k, v = _qkv(jax.random.key(4))
        f = jax.jit(lambda q, k, v, s: linear_attention(q, k, v, causal=causal, segment_ids=s)[0])
        single = jax.jit(lambda q, k, v: linear_attention(q, k, v, causal=causal, impl="parallel")[0])
        tk.check_packed_equals_padded(f, single, q, k, v, jnp.asarray(SEG))


def test_nan_in_padding_does_not_leak_into_outputs_or_gradients():
    with tk.float64():
        q, k, v = _qkv(jax.random.key(19))
        seg = jnp.asarray(SEG)
        pad = (seg == 0)[:, :, None, None]
        qn, kn, vn = (jnp.where(pad, jnp.nan, x) for x in (q, k, v))

        def loss(q, k, v):
            o1 = linear_attention(q, k, v, segment_ids=seg)[0]
            o2 = efficient_attention(q, k, v, segment_ids=seg)
            o3 = log_normal_attention(q, k, v, segment_ids=seg)[0]
            o4 = flow_attention(q, k, v, causal=True, segment_ids=seg)[0]
            o5 = agent_attention(q, k, v, num_agents=2, segment_ids=seg, max_segments=3)
            return sum(jnp.sum(jnp.where(pad, 0.0, o) ** 2) for o in (o1, o2, o3, o4, o5))

        val, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(qn, kn, vn)
        assert bool(jnp.isfinite(val))
        for name, g in zip("qkv", grads):
            assert bool(jnp.isfinite(jnp.where(pad, 0.0, g)).all()), f"d{name} at real tokens"


def test_linear_attention_prefill_decode_and_causality():
    with tk.float64():
        q, k, v = _qkv(jax.random.key(5), B=1, T=9, H=2, K=1)
        full = jax.jit(lambda q, k, v: linear_attention(q, k, v, feature_map="taylor")[0])
        h0 = jnp.zeros((1, 2, fm.taylor_exp_dim(5), 4), jnp.float64)
        prefill = lambda q, k, v: linear_attention(q, k, v, feature_map="taylor", initial_state=h0,
                                                   return_final_state=True)
        step = jax.jit(lambda s, q, k, v: linear_attention(q, k, v, feature_map="taylor", initial_state=s,
                                                           return_final_state=True, impl="recurrent"))
        tk.check_prefill_decode(full, prefill, step, q, k, v, n_prefill=4)
        tk.check_causality_by_perturbation(full, q, k, v)


def test_linear_attention_bf16_in_bf16_out_and_vmap():
    q, k, v = _qkv(jax.random.key(6), T=20, Dk=8, Dv=8, dtype=jnp.bfloat16)
    o, _ = jax.jit(linear_attention)(q, k, v)
    assert o.dtype == jnp.bfloat16
    ref, _ = jax.jit(linear_attention_reference)(*(x.astype(jnp.float32) for x in (q, k, v)))
    tk.assert_close(o, ref, dtype=jnp.bfloat16)
    qs, ks, vs = (jnp.stack([x, 2 * x]).astype(jnp.float32) for x in (q, k, v))
    batched = jax.jit(jax.vmap(lambda q, k, v: linear_attention(q, k, v)[0]))(qs, ks, vs)
    tk.assert_close(batched[1], jax.jit(linear_attention)(qs[1], ks[1], vs[1])[0])


# ----------------------------------------------------------------------------- cosFormer
@pytest.mark.slow  # the same parity runs in make test through tests/linear/test_catalog.py
@pytest.mark.parametrize("causal", [True, False])
def test_cosformer_matches_dense_reweighting(causal):
    with tk.float64():
        q, k, v = _qkv(jax.random.key(7))
        for seg, M in (((jnp.asarray(SEG), 30),) if causal else ((None, None),)):
            kw = dict(causal=causal, max_len=M, segment_ids=seg)
            _parity(_first(functools.partial(cosformer_attention, **kw)),
                    functools.partial(cosformer_attention_reference, **kw), (q, k, v), name=f"cosformer M={M}")
        if causal:
            tk.check_causality_by_perturbation(jax.jit(_first(cosformer_attention)), q, k, v)


def test_cosformer_initial_state_is_in_the_call_position_frame():
    """cosFormer's ``initial_state`` is a state of the cos/sin features in the frame of the call
    (its positions restart at 0).  A prefill state is therefore an exact continuation only after
    rotating it by the prefill length ``P`` (keys at ``j`` move to ``j - P``); unrotated it is not
    (the catalogue checks the op against a dense reference of this definition)."""
    with tk.float64():
        q, k, v = _qkv(jax.random.key(29))
        T, P, D = q.shape[1], 6, q.shape[-1]

        @jax.jit
        def run(q, k, v):
            full = cosformer_attention(q, k, v, max_len=T)[0]
            _, S = cosformer_attention(q[:, :P], k[:, :P], v[:, :P], max_len=T, return_final_state=True)
            th = math.pi / 2 * P / T
            Sc, Ss = S[:, :, :D], S[:, :, D:]
            S_rot = jnp.concatenate([math.cos(th) * Sc + math.sin(th) * Ss, math.cos(th) * Ss - math.sin(th) * Sc], 2)
            cont = lambda s: cosformer_attention(q[:, P:], k[:, P:], v[:, P:], max_len=T, initial_state=s)[0]
            return full[:, P:], cont(S_rot), cont(S)

        full, rotated, unrotated = run(q, k, v)
        tk.assert_close(rotated, full, name="rotated prefill state continues exactly")
        assert tk.rel_rmse(unrotated, full) > 1e-3


# ----------------------------------------------------------------------------- Efficient Attention
@pytest.mark.slow  # the same parity runs in make test through tests/linear/test_catalog.py
def test_efficient_attention_matches_attention_matrix_form():
    with tk.float64():
        q, k, v = _qkv(jax.random.key(8))
        seg = jnp.asarray(SEG)
        _parity(functools.partial(efficient_attention, segment_ids=seg),
                functools.partial(efficient_attention_reference, segment_ids=seg), (q, k, v), name="efficient segments")
        q2, k2, v2 = _qkv(jax.random.key(9), T=6, S=11, Dk=7)                     # cross attention, S != T
        _parity(efficient_attention, efficient_attention_reference, (q2, k2, v2), name="efficient S != T")


def test_efficient_attention_packed_equals_per_document():
    with tk.float64():
        q, k, v = _qkv(jax.random.key(10))
        f = jax.jit(lambda q, k, v, s: efficient_attention(q, k, v, segment_ids=s))
        tk.check_packed_equals_padded(f, efficient_attention, q, k, v, jnp.asarray(SEG))
        # padding holding NaN must not leak into real tokens
        pad = jnp.asarray(SEG == 0)[:, :, None, None]
        kn, vn = jnp.where(pad, jnp.nan, k), jnp.where(pad, jnp.nan, v)
        o = f(q, kn, vn, jnp.asarray(SEG))
        assert not bool(jnp.isnan(o).any())


# ----------------------------------------------------------------------------- BASED
def test_based_matches_references_and_decode():
    with tk.float64():
        q, k, v = _qkv(jax.random.key(11), T=13, H=4, K=2, Dk=6, Dv=5)
        qf, kf = q[..., :3], k[..., :3]                                          # d' = 3 features
        for seg in (jnp.asarray(SEG[:, :13]),):
            fast = lambda *a: jnp.concatenate(based_attention(*a, window=4, segment_ids=seg, window_impl="xla"), -1)
            ref = lambda *a: jnp.concatenate(based_attention_reference(*a, window=4, segment_ids=seg), -1)
            _parity(fast, ref, (qf, kf, q, k, v), name=f"based segments={seg is not None}")
        # window = 1: each query sees only itself, so the window output is its own value
        _, o_win = jax.jit(functools.partial(based_attention, window=1))(qf, kf, q, k, v)
        tk.assert_close(o_win, jnp.repeat(v, 2, axis=2))
        # prefill + step decode (linear state + ring buffer) == full forward
        cache = init_based_cache(2, heads=4, kv_heads=2, feature_dim=3, head_dim=6, value_dim=5, window=4,
                                 dtype=jnp.float64)
        full = jax.jit(lambda q, k, v: jnp.concatenate(based_attention(q[..., :3], k[..., :3], q, k, v, window=4), -1))
        pre = jax.jit(lambda q, k, v: _based_prefill(q, k, v, cache))
        step = jax.jit(lambda c, q, k, v: _based_prefill(q, k, v, c))
        tk.check_prefill_decode(full, pre, step, q, k, v, n_prefill=5)
        tk.check_causality_by_perturbation(full, q, k, v)


def _based_prefill(q, k, v, cache):
    (o_lin, o_win), cache = based_prefill(q[..., :3], k[..., :3], q, k, v, cache)
    return jnp.concatenate([o_lin, o_win], -1), cache


# ----------------------------------------------------------------------------- Agent Attention
@pytest.mark.slow  # the same parity runs in make test through tests/linear/test_catalog.py
def test_agent_attention_matches_dense_reference():
    with tk.float64():
        q, k, v = _qkv(jax.random.key(12), T=11, Dk=6)
        lengths = jnp.array([11, 7])
        for L in (lengths,):
            _parity(functools.partial(agent_attention, num_agents=4, lengths=L, impl="xla"),
                    functools.partial(agent_attention_reference, num_agents=4, lengths=L), (q, k, v),
                    name=f"agent lengths={L is not None}")
        A = jax.random.normal(jax.random.key(13), (2, 3, 4, 6), jnp.float64)
        _parity(lambda q, k, v, a: agent_attention(q, k, v, agents=a, impl="xla"),
                lambda q, k, v, a: agent_attention_reference(q, k, v, agents=a), (q, k, v, A), name="agent given")
        # pooling: the adaptive-average bins of a length-7 row with 3 agents are [0,3), [2,5), [4,7)
        pooled = jax.jit(pool_agents, static_argnums=1)(q, 3, lengths)
        tk.assert_close(pooled[1, 1], q[1, 2:5].mean(0))
        tk.assert_close(pooled[0, 2], q[0, 7:11].mean(0))
        # keys past the length do not matter
        k2 = k.at[1, 7:].set(100.0)
        f = jax.jit(functools.partial(agent_attention, num_agents=4, lengths=lengths))
        o1, o2 = f(q, k, v), f(q, k2, v.at[1, 7:].set(jnp.nan))
        tk.assert_close(o2, o1)


# ----------------------------------------------------------------------------- Agent Attention, packed
def test_agent_attention_packed_equals_per_document():
    with tk.float64():
        q, k, v = _qkv(jax.random.key(20), Dk=6)
        seg = jnp.asarray(SEG)
        T = q.shape[1]
        pad = (seg == 0)[:, :, None, None]
        L = jnp.array([17, 9])

        @jax.jit
        def packed(q, k, v):
            qn, kn, vn = (jnp.where(pad, jnp.nan, x) for x in (q, k, v))        # NaN padding must not leak
            return (agent_attention(qn, kn, vn, num_agents=4, segment_ids=seg, max_segments=3, impl="xla"),
                    agent_attention(q, k, v, num_agents=4, segment_ids=seg, max_segments=2, impl="xla"),
                    agent_attention(q, k, v, num_agents=4, lengths=L, impl="xla"),
                    agent_attention(q, k, v, num_agents=4, impl="xla", max_segments=1,
                                    segment_ids=(jnp.arange(T) < L[:, None]).astype(jnp.int32)))

        o, o_overflow, o_len, o_len_seg = packed(q, k, v)
        # a document alone = the document at the start of a row, key padding (lengths) after it:
        # one compiled program for every document length
        alone = jax.jit(lambda q, k, v, n: agent_attention(q, k, v, num_agents=4, lengths=n, impl="xla"))

        def single(qd, kd, vd):
            n = qd.shape[1]
            padt = lambda x: jnp.pad(x, ((0, 0), (0, T - n), (0, 0), (0, 0)))
            return alone(padt(qd), padt(kd), padt(vd), jnp.array([n]))[:, :n]

        tk.check_packed_equals_padded(lambda *a: o, single, q, k, v, seg)
        # a row with more documents than max_segments is NaN (loudly wrong), the others are untouched
        assert bool(jnp.isnan(o_overflow[0]).all()) and not bool(jnp.isnan(o_overflow[1]).any())
        tk.assert_close(o_overflow[1], o[1])
        # lengths is segment_ids = (t < length) with one document slot
        tk.assert_close(o_len_seg, o_len)
        with pytest.raises(ValueError, match="max_segments"):
            agent_attention(q, k, v, num_agents=4, segment_ids=seg)


@pytest.mark.slow  # the catalogue runs the same parity (tests/linear/test_catalog.py)
def test_agent_attention_packed_matches_reference_given_agents():
    with tk.float64():
        q, k, v = _qkv(jax.random.key(21), Dk=6)
        A = jax.random.normal(jax.random.key(22), (2, 3, 4, 6), jnp.float64)
        kw = dict(segment_ids=jnp.asarray(SEG), max_segments=3)
        _parity(lambda q, k, v, a: agent_attention(q, k, v, agents=a, impl="xla", **kw),
                lambda q, k, v, a: agent_attention_reference(q, k, v, agents=a, **kw), (q, k, v, A),
                name="agent given, packed")


# ----------------------------------------------------------------------------- Flowformer
@pytest.mark.slow  # the same parity runs in make test through tests/linear/test_catalog.py
@pytest.mark.parametrize("causal", [True, False])
def test_flow_attention_matches_equations(causal):
    with tk.float64():
        if causal:
            q, k, v = _qkv(jax.random.key(14))
        else:
            q, k, v = _qkv(jax.random.key(15), T=5, S=9)                         # cross attention, S != T
        _parity(_first(functools.partial(flow_attention, causal=causal)),
                _first(functools.partial(flow_attention_reference, causal=causal)), (q, k, v),
                name=f"flow causal={causal}")
        if causal:
            tk.check_causality_by_perturbation(jax.jit(_first(functools.partial(flow_attention, causal=True))),
                                               q, k, v)


def _flow_prefix_state(key, B=2, H=4, K=2, Dk=5, Dv=3, T=7):
    """A realistic state: the final state of a random prefix."""
    q, k, v = _qkv(key, B=B, T=T, H=H, K=K, Dk=Dk, Dv=Dv)
    return jax.jit(lambda q, k, v: flow_attention(q, k, v, causal=True, return_final_state=True)[1])(q, k, v)


def test_flow_attention_state_and_segments_match_reference():
    """Fast (engine chunk form) vs the dense reference with packed segments, an initial state and
    the final state: values and gradients w.r.t. q, k, v and every leaf of the initial state, for
    a random cotangent on the output and on every leaf of the final state.  (The catalogue runs
    the output parity of every form, the recurrent one included, in both directions.)"""
    with tk.float64():
        q, k, v = _qkv(jax.random.key(23))
        s0 = _flow_prefix_state(jax.random.key(24))
        seg = jnp.asarray(SEG)

        def run(fn, **kw):
            return lambda q, k, v, s: fn(q, k, v, causal=True, segment_ids=seg, initial_state=s,
                                         return_final_state=True, **kw)

        args = (q, k, v, s0)
        shape = jax.eval_shape(run(flow_attention_reference), *args)
        leaves, tree = jax.tree.flatten(shape)
        cts = jax.tree.unflatten(tree, [jax.random.normal(jax.random.key(30 + i), l.shape, l.dtype)
                                        for i, l in enumerate(leaves)])
        ref = _out_and_grads(run(flow_attention_reference), args, cts)

        @jax.jit
        def fast_forms(*a):                                                       # one program for both forms
            return [_vjp(run(flow_attention, impl=impl), a, cts) for impl in ("chunk",)]

        for impl, res in zip(("chunk",), fast_forms(*args)):
            for i, (x, r) in enumerate(zip(jax.tree.leaves(res[0]), jax.tree.leaves(ref[0]))):
                tk.assert_close(x, r, name=f"flow {impl} output leaf {i}")
            for i, (x, r) in enumerate(zip(jax.tree.leaves(res[1]), jax.tree.leaves(ref[1]))):
                tk.assert_close(x, r, grad=True, name=f"flow {impl} gradient leaf {i}")


def _vjp(fn, args, ct):
    out, pullback = jax.vjp(fn, *args)
    return out, pullback(ct)


def test_flow_attention_prefill_decode_and_step_scan():
    with tk.float64():
        q, k, v = _qkv(jax.random.key(25), B=1, T=9, H=2, K=1)
        s0 = _flow_prefix_state(jax.random.key(26), B=1, H=2, K=1)
        full = jax.jit(lambda q, k, v: flow_attention(q, k, v, causal=True, initial_state=s0)[0])
        prefill = jax.jit(lambda q, k, v: flow_attention(q, k, v, causal=True, initial_state=s0,
                                                          return_final_state=True))
        step = jax.jit(lambda s, q, k, v: (lambda o, s: (o[:, None], s))(*flow_attention_step(
            q[:, 0], k[:, 0], v[:, 0], s)))
        tk.check_prefill_decode(full, prefill, step, q, k, v, n_prefill=4)

        # the decode step scanned from the empty state over the whole sequence == the full causal form
        def scanned(q, k, v):
            def body(s, xs):
                o, s = flow_attention_step(*xs, s)
                return s, o
            s, o = jax.lax.scan(body, init_flow_state(1, 2, 5, 3, jnp.float64),
                                tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v)))
            return jnp.moveaxis(o, 0, 1), s

        o, s = jax.jit(scanned)(q, k, v)
        o_full, s_full = jax.jit(lambda q, k, v: flow_attention(q, k, v, causal=True, return_final_state=True))(q, k, v)
        tk.assert_close(o, o_full, name="scan of flow_attention_step vs full")
        for f, a, b in zip(FlowState._fields, s, s_full):
            tk.assert_close(a, b, name=f"final state {f}")
        assert float(s.count[0, 0]) == 9.0


@pytest.mark.parametrize("causal", [True, False])
def test_flow_attention_packed_equals_per_document(causal):
    with tk.float64():
        q, k, v = _qkv(jax.random.key(27))
        seg = jnp.asarray(SEG)
        T = q.shape[1]
        pad = (seg == 0)[:, :, None, None]
        f = jax.jit(lambda q, k, v, s: flow_attention(q, k, v, causal=causal, segment_ids=s)[0])
        assert not bool(jnp.isnan(f(*(jnp.where(pad, jnp.nan, x) for x in (q, k, v)), seg)).any())
        if not causal:
            single = jax.jit(lambda q, k, v: flow_attention(q, k, v, causal=False)[0])
            tk.check_packed_equals_padded(f, single, q, k, v, seg)
            return
        # causal: a document alone is the causal prefix of a row that starts with it (one program)
        s0 = _flow_prefix_state(jax.random.key(28))
        alone = jax.jit(lambda q, k, v, s0: flow_attention(q, k, v, causal=True, initial_state=s0,
                                                           return_final_state=True))
        empty = init_flow_state(2, 4, 5, 3, jnp.float64)

        def single(qd, kd, vd, s0=empty):
            n = qd.shape[1]
            padt = lambda x: jnp.pad(jnp.broadcast_to(x, (2, *x.shape[1:])), ((0, 0), (0, T - n), (0, 0), (0, 0)))
            return alone(padt(qd), padt(kd), padt(vd), s0)[0][:1, :n]

        tk.check_packed_equals_padded(f, single, q, k, v, seg)
        # the initial state belongs to the first document; the final state is the last document's
        g = jax.jit(lambda q, k, v, s0: flow_attention(q, k, v, causal=True, segment_ids=seg, initial_state=s0,
                                                       return_final_state=True))
        o, s = g(q, k, v, s0)
        o1, _ = alone(q, k, v, s0)
        tk.assert_close(o[0, :6], o1[0, :6], name="first document of row 0 with the initial state")
        roll = lambda n, s: alone(jnp.roll(q, -n, 1), jnp.roll(k, -n, 1), jnp.roll(v, -n, 1), s)[0]
        tk.assert_close(o[1, 2:], roll(2, s0)[1, :15], name="row 1: the initial state passes the leading padding")
        tk.assert_close(o[0, 13:], roll(13, empty)[0, :4], name="last document of row 0")
        # final state of row 0 = that of its last document alone (4 tokens from the empty state);
        # row 1 (one document after s0) is checked against the reference in the parity test
        s_last = jax.jit(lambda q, k, v: flow_attention(q, k, v, causal=True, return_final_state=True)[1])(
            q[:, 13:], k[:, 13:], v[:, 13:])
        for f_, a, b in zip(FlowState._fields, s, s_last):
            tk.assert_close(a[0], b[0], name=f"row 0 final state {f_}")


# ----------------------------------------------------------------------------- LLN
def test_lln_moment_matching_formula():
    with tk.float64():
        for sq, sk in ((1.0, 1.0), (0.5, 2.0), (1.7, 0.3)):
            a, b = lln_moment_matching(sq, sk)
            sig2 = (sq ** 2 * sk ** 2 - LLN_B) / (2 * LLN_A)
            tk.assert_close(jnp.asarray([a * sq, b * sk]), jnp.sqrt(jnp.asarray([sig2, sig2])))
            # the LLN log-variance model 2a σ̃² + b equals the softmax log-variance σ_q² σ_k²
            tk.assert_close(2 * LLN_A * (a * sq) ** 2 + LLN_B, jnp.asarray(sq ** 2 * sk ** 2))


@pytest.mark.slow  # the same parity runs in make test through tests/linear/test_catalog.py
@pytest.mark.parametrize("causal", [True, False])
def test_log_normal_attention_matches_unshifted_formula(causal):
    with tk.float64():
        q, k, v = _qkv(jax.random.key(16))
        for seg, ab in (((jnp.asarray(SEG), {}),) if causal else ((None, dict(alpha=1.3, beta=0.7)),)):
            kw = dict(causal=causal, segment_ids=seg, eps=0.0, **ab)
            _parity(_first(functools.partial(log_normal_attention, **kw)),
                    functools.partial(log_normal_attention_reference, **kw), (q, k, v), name=f"lln {ab}")
        if causal:
            f = jax.jit(lambda q, k, v: log_normal_attention(q, k, v, alpha=1.3, beta=0.7)[0])
            tk.check_causality_by_perturbation(f, q, k, v)


# ----------------------------------------------------------------------------- dtypes and bad input
def test_variants_bf16_in_bf16_out():
    q, k, v = _qkv(jax.random.key(17), T=12, Dk=8, Dv=8, dtype=jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    cases = [
        (lambda *a: cosformer_attention(*a)[0], cosformer_attention_reference),
        (efficient_attention, efficient_attention_reference),
        (lambda *a: agent_attention(*a, num_agents=3), lambda *a: agent_attention_reference(*a, num_agents=3)),
        (lambda *a: flow_attention(*a, causal=True)[0], lambda *a: flow_attention_reference(*a, causal=True)[0]),
        (lambda *a: log_normal_attention(*a, alpha=1.0, beta=1.0)[0],
         lambda *a: log_normal_attention_reference(*a, alpha=1.0, beta=1.0)),
    ]
    outs = jax.jit(lambda *a: [fast(*a) for fast, _ in cases])(q, k, v)
    refs = jax.jit(lambda *a: [ref(*a) for _, ref in cases])(*f32)
    for o, r in zip(outs, refs):
        assert o.dtype == jnp.bfloat16
        tk.assert_close(o, r, dtype=jnp.bfloat16)


def test_bad_inputs_name_the_argument():
    q, k, v = _qkv(jax.random.key(18), B=1, T=6, H=2, K=1, Dk=4, Dv=4, dtype=jnp.float32)
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="eps"):
        linear_attention(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="initial_state"):       # normalised state needs Dv + 1 columns
        linear_attention(q, k, v, initial_state=jnp.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match="segment_ids"):
        linear_attention(q, k, v, segment_ids=jnp.ones((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="max_len"):
        cosformer_attention(q, k, v, max_len=3)
    with pytest.raises(ValueError, match="causal"):
        efficient_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="agents"):
        agent_attention(q, k, v)
    with pytest.raises(ValueError, match="causal"):
        agent_attention(q, k, v, num_agents=2, causal=True)
    with pytest.raises(ValueError, match="lengths"):
        agent_attention(q, k, v, num_agents=2, lengths=jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="window"):
        based_attention(q, k, q, k, v, window=0)
    with pytest.raises(ValueError, match="alpha, beta"):
        log_normal_attention(q, k, v, alpha=1.0)
    with pytest.raises(ValueError, match="k"):
        flow_attention(q, k[:, :5], v[:, :5], causal=True)
    with pytest.raises(ValueError, match="initial_state"):
        flow_attention(q, k, v, initial_state=init_flow_state(1, 2, 4, 4))
    with pytest.raises(TypeError, match="initial_state"):
        flow_attention(q, k, v, causal=True, initial_state=jnp.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match="max_segments"):
        agent_attention(q, k, v, num_agents=2, segment_ids=jnp.ones((1, 6), jnp.int32))
    with pytest.raises(TypeError, match="q, k and v"):
        linear_attention(q, k.astype(jnp.bfloat16), v)
