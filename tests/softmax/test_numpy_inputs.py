"""Every public op family accepts NumPy inputs (anything ``jnp.asarray`` accepts) under an un-jitted
``jax.grad`` (the case that once crashed: a NumPy primal reached a custom_vjp residual and was
indexed with a traced index), and under ``jit`` of ``vmap`` of ``grad``, with the same gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import testing as tk
from attn_jax.softmax import decode as D
from attn_jax.softmax.kv_cache import KVCache

B, T, H, D_ = 1, 8, 2, 4
_rng = np.random.default_rng(0)
Q, K, V = (_rng.standard_normal((B, T, H, D_)).astype(np.float32) for _ in range(3))
IDS = np.array([[1, 1, 1, 2, 2, 2, 0, 0]], np.int32)
LOG_G = -np.abs(_rng.standard_normal((B, T, H, D_))).astype(np.float32)
BETA = (1.0 / (1.0 + np.exp(-_rng.standard_normal((B, T, H))))).astype(np.float32)
STATE = _rng.standard_normal((B, H, D_, D_)).astype(np.float32)
KNORM = (K / np.linalg.norm(K, axis=-1, keepdims=True)).astype(np.float32)


def _prefill_then_step(q):
    cache = KVCache.init(B, T + 1, H, D_)
    o, cache = D.prefill(q, K, V, cache)
    o1, _ = D.decode_step(q[:, -1:], K[:, -1:], V[:, -1:], cache)
    return o.sum() + o1.sum()


OPS = {
    "attention_xla_segments": lambda q: aj.attention(q, K, V, mask=masks.segments(IDS), impl="xla").sum(),
    "attention_reference_bias_mask": lambda q: aj.attention(
        q, K, V, np.zeros((H, T, T), np.float32), np.tril(np.ones((T, T), np.float32))[None],
        sinks=np.zeros((H,), np.float32), impl="reference").sum(),
    "attention_auto_key_padding": lambda q: aj.attention(q, K, V, mask=masks.key_padding(np.array([5]))).sum(),
    "dot_product_attention": lambda q: aj.dot_product_attention(
        q, K, V, is_causal=True, key_value_seq_lengths=np.array([6], np.int32)).sum(),
    "gla_chunk_segments_state": lambda q: aj.linear.gla(
        q, K, V, LOG_G, segment_ids=IDS, initial_state=STATE, impl="chunk")[0].sum(),
    "delta_rule_chunk_state": lambda q: aj.linear.delta_rule(q, KNORM, V, BETA, segment_ids=IDS, initial_state=STATE,
                                                             impl="chunk")[0].sum(),
    "linear_attention_segments": lambda q: aj.linear.linear_attention(q, K, V, segment_ids=IDS)[0].sum(),
    "decode_attention": lambda q: D.decode_attention(q[:, -2:], K, V, lengths=np.array([7], np.int32)).sum(),
    "prefill_and_decode_step": _prefill_then_step,
}


#: Un-jitted grad compiles op by op (seconds per op family): run it where the differentiated input
#: itself reaching a custom_vjp residual as NumPy was the bug (softmax and linear custom VJPs).
#: Under jit the closed-over NumPy constants (k, v, ids, states, lengths) still reach loop bodies
#: as NumPy arrays, which is the same failure for every other input.
EAGER = ("attention_xla_segments", "gla_chunk_segments_state")


@pytest.mark.parametrize("name", sorted(OPS))
def test_numpy_inputs_under_grad_jit_vmap(name):
    f = OPS[name]
    stacked = np.stack([Q, Q[:, ::-1].copy()])
    g_jv = tk.fast_jit(jax.vmap(jax.grad(f)))(stacked)     # jit(vmap(grad)), NumPy constants inside
    assert g_jv.shape == stacked.shape and np.isfinite(np.asarray(g_jv)).all()
    assert np.abs(np.asarray(g_jv[0])).sum() > 0
    if name in EAGER:
        g_eager = jax.grad(f)(Q)                           # un-jitted grad of a NumPy primal
        assert isinstance(g_eager, jax.Array)
        tk.assert_close(g_jv[0], g_eager, grad=True, name=f"{name}: jit(vmap(grad)) vs eager grad")
