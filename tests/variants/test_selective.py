"""Selective attention (Leviathan et al. 2024, arXiv:2410.02703): the fast form (-F as a one-head bias
of aj.attention) against the loop reference on values and gradients, full and decode-shaped (offset,
carried selection), the accumulated selection against a NumPy formula, zero selection == plain
attention, context pruning (selective_keep and the mixer's budget), bad inputs.  The mixer's
exact decode path is in the registry suite (the mechanism has no parameters of its own)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn_jax as aj
from attn_jax import masks, mixers
from attn_jax.core import testing as tk
from attn_jax.variants import selective_attention, selective_attention_reference, selective_keep

B, T, H, K, Dk, Dv = 2, 9, 4, 2, 8, 6


def _qkv(seed, T=T, S=None):
    return tk.random_qkv_compiled(jax.random.key(seed), B=B, T=T, S=S, H=H, K=K, Dk=Dk, Dv=Dv)


def _relu_scores(q, k, head=0):
    s = np.einsum("btd,bsd->bts", np.asarray(q[:, :, head], np.float64), np.asarray(k[:, :, head // (H // K)],
                                                                                   np.float64)) * Dk ** -0.5
    return np.maximum(s, 0.0)


@pytest.mark.parametrize("case", ["full_segments_sinks", "decode_shaped"])
def test_matches_reference_values_and_gradients(case):
    key = jax.random.key(1)
    if case == "full_segments_sinks":
        q, k, v = _qkv(0)
        seg = jnp.asarray(np.array([[1] * 5 + [2] * 4, [1] * 6 + [0] * 3], np.int32))
        kw = dict(mask=masks.segments(seg), sinks=jnp.array([0.5, -1.0, 0.0, 1.5], jnp.float32),
                  protected=jnp.asarray(np.array([[1] + [0] * 4 + [1] + [0] * 3, [1] + [0] * 8], bool)))
        q, k, v = (x.at[1, 6:].set(jnp.nan) for x in (q, k, v))      # NaN padding must not leak
        extra = ()
    else:   # 3 new queries at positions L = (4, 6) over a 9-slot cache with carried selection
        q, k, v = _qkv(2, T=3, S=T)
        L = jnp.array([4, 6], jnp.int32)
        kw = dict(offset=L, mask=masks.key_padding(L + 3), selection_head=3)
        extra = (jnp.abs(jax.random.normal(jax.random.key(3), (B, T))),)

    def both(q, k, v, *f0):
        init = dict(initial_selection=f0[0]) if f0 else {}
        fast = lambda q, k, v: selective_attention(q, k, v, return_selection=True, **init, **kw)  # noqa: E731
        ref = lambda q, k, v: selective_attention_reference(q, k, v, **init, **kw)  # noqa: E731
        return tk.vjp_with_random_cotangent(fast, (q, k, v), key), tk.vjp_with_random_cotangent(ref, (q, k, v), key)

    ((o, F), grads), ((o_ref, F_ref), grads_ref) = tk.compiled(both, q, k, v, *extra)
    tk.assert_close(o, o_ref, name="output")
    tk.assert_close(F, F_ref, name="accumulated selection")
    for name, a, b in zip("qkv", grads, grads_ref):
        tk.assert_close(a, b, grad=True, name=f"d{name}")
    if case == "full_segments_sinks":
        # F_j = sum over the queries i > j of the same document of ReLU(head-0 logit), j not protected
        r = np.nan_to_num(_relu_scores(q, k))
        segn, prot = np.asarray(seg), np.asarray(kw["protected"])
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        votes = r * (i > j) * (segn[:, :, None] == segn[:, None, :]) * (segn[:, :, None] > 0) * ~prot[:, None, :]
        np.testing.assert_allclose(np.asarray(F), votes.sum(1), rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(o[1, 6:]).max()) == 0.0 and float(F[0, 0]) == 0.0 and float(F[0, 5]) == 0.0
        assert float(F[0, 1]) > 0


def test_zero_selection_is_plain_attention():
    q, k, v = _qkv(4)
    q = q.at[:, :, 0].set(-jnp.abs(q[:, :, 0]))      # head 0 reads kv head 0: all its logits <= 0
    k = k.at[:, :, 0].set(jnp.abs(k[:, :, 0]))

    def run(q, k, v):
        o, F = selective_attention(q, k, v, return_selection=True)
        return o, F, aj.attention(q, k, v, mask=masks.causal()), selective_attention(q, k, v, selection_head=1)

    o, F, plain, other_head = tk.compiled(run, q, k, v)
    assert float(jnp.abs(F).max()) == 0.0
    tk.assert_close(o, plain, name="zero selection vs causal attention")
    assert float(jnp.abs(other_head - plain).max()) > 1e-3   # head 1 does select


def test_keep_set_of_a_pruned_buffer():
    F = jnp.asarray(np.array([[5.0, 0.1, 3.0, 0.2, 9.0, 0.0], [1.0, 2.0, 0.5, 0.0, 0.0, 0.0]], np.float32))
    lengths = jnp.array([6, 3], jnp.int32)
    keep = np.asarray(selective_keep(F, lengths, 3))
    np.testing.assert_array_equal(keep, [[0, 1, 0, 1, 0, 1], [1, 1, 1, 0, 0, 0]])   # row 1 holds 3 tokens
    first = jnp.broadcast_to(jnp.arange(6) == 0, (2, 6))
    keep = np.asarray(selective_keep(F, lengths, 3, protected=first))
    np.testing.assert_array_equal(keep, [[1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]])
    keep = np.asarray(selective_keep(F, lengths, 2, protected=first))
    np.testing.assert_array_equal(keep, [[1, 0, 0, 0, 0, 1], [1, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(selective_keep(F, lengths, 10)), np.arange(6)[None] < lengths[:, None])


def test_mixer_context_budget():
    """A budget holding every token is exact; a small one evicts keys (changes the outputs) while
    the first token and the new chunk stay visible."""
    x = jax.random.normal(jax.random.key(5), (2, 12, 16))
    outs = {}
    for budget in (12, 3):
        m = mixers.get("selective")(16, 4, rngs=nnx.Rngs(0), num_kv_heads=2, context_budget=budget)
        graphdef, state = nnx.split(m)
        call = tk.fast_jit(lambda s, x, cache: nnx.merge(graphdef, s)(x, cache=cache))
        outs[budget], _ = tk.prefill_then_decode(lambda c, cache: call(state, c, cache), x, m.init_cache(2, 12), 8)
        if budget == 12:
            outs[None] = call(state, x, None)[0]      # the full forward (no cache, no pruning)
    tk.assert_close(outs[12], outs[None], name="budget >= length is exact")
    tk.assert_close(outs[3][:, :8], outs[None][:, :8], name="prefill: nothing cached yet, no pruning")
    assert float(jnp.abs(outs[3][:, 9:] - outs[None][:, 9:]).max()) > 1e-4


def test_bad_inputs():
    q, k, v = _qkv(6)
    with pytest.raises(ValueError, match="^selection_head:"):
        selective_attention(q, k, v, selection_head=4)
    with pytest.raises(TypeError, match="^protected:"):
        selective_attention(q, k, v, protected=jnp.zeros((B, T), jnp.int32))
    with pytest.raises(ValueError, match="^initial_selection:.*got \\(2, 8\\)"):
        selective_attention_reference(q, k, v, initial_selection=jnp.zeros((B, T - 1)))
    with pytest.raises(ValueError, match="^budget:"):
        selective_keep(jnp.zeros((B, T)), jnp.array([3, 4]), 0)
    with pytest.raises(ValueError, match="^causal:"):
        mixers.get("selective")(16, 4, rngs=nnx.Rngs(0), causal=False)
