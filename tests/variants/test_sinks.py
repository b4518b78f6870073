"""Sink control: persistent memory key/values (Sukhbaatar et al. 2019, arXiv:1907.01470) — the
LSE-merged fast form against the concatenated reference on values and gradients, a zero memory slot
== a zero sink logit (the mixer's decode path is in the registry suite: its memory is random at
init); softmax-off-by-one as MultiHeadAttention's
``sinks="off_by_one"`` (a fixed zero sink logit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn_jax as aj
from attn_jax import masks, mixers
from attn_jax.core import testing as tk
from attn_jax.nn import MultiHeadAttention
from attn_jax.variants import persistent_memory_attention, persistent_memory_attention_reference

B, T, H, K, Dk, Dv, N = 2, 9, 4, 2, 8, 6, 3


def _inputs(seed):
    q, k, v = tk.random_qkv_compiled(jax.random.key(seed), B=B, T=T, H=H, K=K, Dk=Dk, Dv=Dv)
    mk = jax.random.normal(jax.random.key(seed + 1), (N, K, Dk))
    mv = jax.random.normal(jax.random.key(seed + 2), (N, K, Dv))
    return q, k, v, mk, mv


def test_matches_reference_values_and_gradients():
    q, k, v, mk, mv = _inputs(0)
    seg = jnp.asarray(np.array([[1] * 5 + [2] * 4, [1] * 6 + [0] * 3], np.int32))
    kw = dict(mask=masks.causal() & masks.segments(seg), sinks=jnp.array([0.5, -1.0, 0.0, 1.5]), softcap=3.0)
    o, grads = tk.check_vjp_parity(lambda *a: persistent_memory_attention(*a, **kw),
                                   lambda *a: persistent_memory_attention_reference(*a, **kw),
                                   (q, k, v, mk, mv), ("q", "k", "v", "memory_k", "memory_v"))
    # padding queries see no sequence key but still read the memory
    assert float(jnp.abs(o[1, 6:]).max()) > 0


def test_zero_valued_memory_with_constant_logit_is_a_sink():
    """One slot whose key gives the logit c for every query (q . m_k = c: m_k = 0 and c = 0) and whose
    value is 0 is exactly a sink of logit c = 0: softmax-off-by-one."""
    q, k, v, _, _ = _inputs(2)
    zk, zv = jnp.zeros((1, K, Dk)), jnp.zeros((1, K, Dv))

    def run(q, k, v):
        return (persistent_memory_attention(q, k, v, zk, zv, mask=masks.causal()),
                aj.attention(q, k, v, mask=masks.causal(), sinks=jnp.zeros((H,))))

    o, sink = tk.compiled(run, q, k, v)
    tk.assert_close(o, sink, name="zero memory slot vs zero sink logit")


def test_off_by_one_is_a_fixed_zero_sink():
    x = jax.random.normal(jax.random.key(6), (2, 8, 16))
    off = MultiHeadAttention(16, 4, sinks="off_by_one", rngs=nnx.Rngs(0))
    learned = MultiHeadAttention(16, 4, sinks=True, rngs=nnx.Rngs(0))     # sink logits start at 0
    plain = MultiHeadAttention(16, 4, rngs=nnx.Rngs(0))
    assert off.sinks is None and learned.sinks.shape == (4,)
    run = tk.fast_jit(lambda x: (off(x)[0], learned(x)[0], plain(x)[0]))
    y_off, y_learned, y_plain = run(x)
    tk.assert_close(y_off, y_learned, name="off-by-one vs zero learned sinks")
    assert float(jnp.abs(y_off - y_plain).max()) > 1e-4
    with pytest.raises(ValueError, match="^sinks:"):
        MultiHeadAttention(16, 4, sinks="zero", rngs=nnx.Rngs(0))


def test_bad_inputs():
    q, k, v, mk, mv = _inputs(7)
    with pytest.raises(ValueError, match="^memory_k:"):
        persistent_memory_attention(q, k, v, mk[:, :1], mv)
    with pytest.raises(ValueError, match="^memory_v:.*N=3"):
        persistent_memory_attention_reference(q, k, v, mk, mv[:2])
    with pytest.raises(ValueError, match="^num_memory:"):
        mixers.get("persistent_memory")(16, 4, rngs=nnx.Rngs(0), num_memory=0)
