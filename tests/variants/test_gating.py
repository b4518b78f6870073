"""Gated attention (Qiu et al. 2025, arXiv:2505.06708): op vs reference (values and gradients),
gate ≡ 1 == plain attention, headwise == elementwise with repeated logits, the mixer's wiring, bad
inputs.  (The layer's gate against a hand-written einsum layer: tests/nn/test_multihead_attention.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn_jax as aj
from attn_jax import masks, mixers
from attn_jax.core import testing as tk
from attn_jax.nn import MultiHeadAttention
from attn_jax.variants import gated_attention, gated_attention_reference, output_gate

B, T, H, K, Dk, Dv = 2, 9, 4, 2, 8, 6


def _inputs(seed, elementwise):
    q, k, v = tk.random_qkv_compiled(jax.random.key(seed), B=B, T=T, H=H, K=K, Dk=Dk, Dv=Dv)
    shape = (B, T, H, Dv) if elementwise else (B, T, H)
    g = 2.0 * jax.random.normal(jax.random.key(seed + 100), shape, jnp.float32)
    return q, k, v, g


@pytest.mark.parametrize("elementwise", [True, False], ids=["elementwise", "headwise"])
def test_matches_reference_values_and_gradients(elementwise):
    q, k, v, g = _inputs(0, elementwise)
    # segments with a padding tail: fully masked rows must stay exactly zero through the gate
    seg = jnp.asarray(np.array([[1] * 5 + [2] * 4, [1] * 6 + [0] * 3], np.int32))
    mask = masks.causal() & masks.segments(seg)
    q, k, v = (x.at[1, 6:].set(jnp.nan) for x in (q, k, v))          # NaN padding must not leak
    sinks = jnp.array([0.5, -1.0, 0.0, 1.5], jnp.float32)
    o, grads = tk.check_vjp_parity(lambda q, k, v, g: gated_attention(q, k, v, g, mask=mask, sinks=sinks),
                                   lambda q, k, v, g: gated_attention_reference(q, k, v, g, mask=mask, sinks=sinks),
                                   (q, k, v, g), ("q", "k", "v", "gate"))
    assert float(jnp.abs(o[1, 6:]).max()) == 0.0 and float(jnp.abs(grads[0][1, 6:]).max()) == 0.0
    assert float(jnp.abs(grads[3]).max()) > 0


def test_open_gate_is_plain_attention_and_headwise_is_elementwise():
    q, k, v, g = _inputs(2, elementwise=False)

    def run(q, k, v, g):
        open_gate = gated_attention(q, k, v, jnp.full((B, T, H), 40.0), mask=masks.causal())  # σ(40) == 1 in fp32
        plain = aj.attention(q, k, v, mask=masks.causal())
        head = gated_attention(q, k, v, g, mask=masks.causal())
        elem = gated_attention(q, k, v, jnp.broadcast_to(g[..., None], (B, T, H, Dv)), mask=masks.causal())
        return open_gate, plain, head, elem

    open_gate, plain, head, elem = tk.compiled(run, q, k, v, g)
    np.testing.assert_array_equal(np.asarray(open_gate), np.asarray(plain))
    tk.assert_close(head, elem, name="headwise vs repeated elementwise")
    assert float(jnp.abs(head - plain).max()) > 1e-3   # a real gate changes the output


def test_mixer_is_multihead_attention_with_the_elementwise_gate():
    m = mixers.get("gated_attention")(16, 4, rngs=nnx.Rngs(0), num_kv_heads=2)
    assert isinstance(m, MultiHeadAttention) and m.gate == "elementwise" and m.w_gate.shape == (16, 4, 4)
    with pytest.raises(ValueError, match="^gate:"):
        mixers.get("gated_attention")(16, 4, rngs=nnx.Rngs(0), gate=None)


def test_bad_inputs():
    q, k, v, g = _inputs(3, elementwise=True)
    with pytest.raises(ValueError, match="^gate_logits:.*got \\(2, 9, 4, 5\\)"):
        gated_attention(q, k, v, g[..., :5])
    with pytest.raises(TypeError, match="^gate_logits:"):
        output_gate(v, jnp.ones((B, T, K), jnp.int32))
    with pytest.raises(ValueError, match="^q:"):
        gated_attention_reference(q[0], k, v, g)
