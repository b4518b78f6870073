"""Every bad input raises at trace time with a message naming the argument."""

import jax
import jax.numpy as jnp
import pytest

import attn_jax as aj
from attn_jax import masks

B, T, H, D = 2, 8, 4, 16


def qkv(T=T, S=T, H=H, K=H, Dk=D, Dv=D, dtype=jnp.float32):
    return (jnp.zeros((B, T, H, Dk), dtype), jnp.zeros((B, S, K, Dk), dtype), jnp.zeros((B, S, K, Dv), dtype))


def raises(exc, match, **kw):
    q, k, v = kw.pop("qkv", qkv())
    with pytest.raises(exc, match=match):
        aj.attention(q, k, v, impl="reference", **kw)


def test_rank_mismatch_and_too_low():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k: expected the rank of q \(3"):
        aj.attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"k: expected the rank of q \(4"):
        aj.attention(q, k[..., None], v)
    with pytest.raises(ValueError, match=r"v: expected the rank of q"):
        aj.attention(q, k, v[0])
    with pytest.raises(ValueError, match=r"q: expected rank 4 \[B, T, H, Dk\] \(or rank 3"):
        aj.attention(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(ValueError, match=r"batch size mismatch.*batch axes \[2, 1\]"):
        aj.attention(q[:, None], k[:1, None], v[:1, None])


def test_bhtd_layout_mixup_names_the_layout():
    """q/k/v passed as [B, H, T, D]: the first error states [B, T, H, D] and the likely swap."""
    q, k, v = qkv(T=8, S=6)
    sw = lambda x: jnp.swapaxes(x, 1, 2)
    with pytest.raises(ValueError, match=r"fit the \[B, H, T, D\] layout.*laid out \[B, T, H, D\]"):
        aj.attention(sw(q), sw(k), sw(v))
    # Shapes that do not fit a swap still state the expected layout.
    with pytest.raises(ValueError, match=r"sequence length mismatch.*laid out \[B, T, H, D\]"):
        aj.attention(q, k, v[:, :5])


def test_jax_nn_keywords_point_to_the_attn_jax_spelling():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"'is_causal'.*masks\.causal\(\).*dot_product_attention"):
        aj.attention(q, k, v, is_causal=True)
    with pytest.raises(TypeError, match=r"'implementation'.*impl="):
        aj.attention(q, k, v, implementation="xla")
    with pytest.raises(TypeError, match=r"'softcapp'.*valid keyword arguments: bias, mask, scale, softcap"):
        aj.attention(q, k, v, softcapp=1.0)


def test_batch_length_head_dim_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="batch size mismatch"):
        aj.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="sequence length mismatch"):
        aj.attention(q, k, v[:, :5])
    with pytest.raises(ValueError, match="head_dim mismatch"):
        aj.attention(q, k[..., :8], v)


def test_heads_not_divisible():
    raises(ValueError, r"H=4 must be a multiple of k/v heads K=3", qkv=qkv(K=3))


def test_mask_not_broadcastable():
    raises(ValueError, r"mask: expected", mask=jnp.ones((1, 1, T, T + 1), bool))
    raises(ValueError, r"mask: expected", mask=jnp.ones((3, 1, T, T), bool))
    raises(TypeError, r"mask", mask="causal")
    raises(ValueError, r"mask: expected rank 3 .*got rank 2", mask=jnp.ones((T, T), bool))
    raises(TypeError, r"mask: expected a boolean, integer or float", mask=jnp.ones((1, 1, T, T), jnp.complex64))


def test_bias_of_wrong_shape():
    raises(ValueError, r"bias: expected shape broadcastable to \[B\|1, H\|1, T\|1, S\|1\]",
           bias=jnp.zeros((1, 3, T, T)))
    raises(ValueError, r"bias: expected shape broadcastable", bias=jnp.zeros((3, T, T)))  # rank 3: [H, T, S]
    raises(ValueError, r"bias: expected rank 3 \[H\|1, T, S\] .*got rank 2", bias=jnp.zeros((T, T)))
    raises(ValueError, r"bias: expected rank 3 .*got rank 5", bias=jnp.zeros((1, 1, 1, T, T)))
    raises(TypeError, r"bias", bias=jnp.zeros((1, 1, T, T), jnp.int32))
    raises(TypeError, r"bias: got a boolean array.*mask=", bias=jnp.ones((1, 1, T, T), bool))


def test_segment_ids_wrong_length_or_dtype():
    raises(ValueError, r"q_segment_ids: expected shape \[2, 8\]", mask=masks.segments(jnp.ones((B, T + 1), jnp.int32)))
    raises(ValueError, r"kv_segment_ids: expected shape \[2, 6\]",
           qkv=qkv(S=6), mask=masks.segments(jnp.ones((B, T), jnp.int32), jnp.ones((B, 7), jnp.int32)))
    raises(ValueError, r"kv_segment_ids.*T == S", qkv=qkv(S=6), mask=masks.segments(jnp.ones((B, T), jnp.int32)))
    with pytest.raises(TypeError, match="q_segment_ids"):
        masks.segments(jnp.ones((B, T), jnp.float32))


def test_negative_window():
    with pytest.raises(ValueError, match="left"):
        masks.sliding_window(-3)


def test_softcap_and_scale_must_be_positive():
    raises(ValueError, r"softcap: expected a value > 0", softcap=0.0)
    raises(ValueError, r"softcap: expected a value > 0", softcap=-1.0)
    raises(ValueError, r"scale: expected a value > 0", scale=-0.1)


def test_dropout_rate_and_key():
    raises(ValueError, r"dropout_rate: expected a value in \[0, 1\)", dropout_rate=1.0, dropout_rng=jax.random.key(0))
    raises(ValueError, r"dropout_rate: expected a value in \[0, 1\)", dropout_rate=-0.1)
    raises(ValueError, r"dropout_rng: a PRNG key is required", dropout_rate=0.1)


def test_unknown_impl():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"impl: unknown implementation 'flash'.*choose from"):
        aj.attention(q, k, v, impl="flash")
    with pytest.raises(TypeError, match="impl"):
        aj.attention(q, k, v, impl=[])


def test_sinks_shape():
    raises(ValueError, r"sinks: expected shape \[H\] = \[4\]", sinks=jnp.zeros((2,)))
    raises(ValueError, r"sinks: expected shape \[H\]", sinks=jnp.zeros((1, 4)))


def test_integer_qkv():
    raises(TypeError, r"q: expected a floating-point dtype", qkv=qkv(dtype=jnp.int32))
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"v: expected a floating-point dtype"):
        aj.attention(q, k, v.astype(jnp.int8))


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="share a dtype"):
        aj.attention(q, k.astype(jnp.bfloat16), v)


def test_errors_raise_under_jit_at_trace_time():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="sinks"):
        jax.jit(lambda q: aj.attention(q, k, v, sinks=jnp.zeros(3)))(q)
