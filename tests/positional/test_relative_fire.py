"""FIRE (functional interpolation for relative positions): the per-tile bias equals a plain loop over
positions (T != S, progressive interpolation active: L below the positions); attention with it on
the tiled xla path (3 x 4 tiles) and the dense block equals the reference with the dense bias, values
and gradients of q, k, v and every FIRE parameter; decode equals the full forward's row; bad inputs."""

import jax
import jax.numpy as jnp
import pytest

import attn_jax as aj
from attn_jax import masks
from attn_jax.core import testing as tk
from attn_jax.positional.fire import FIRE, fire_bias_reference, init_fire
from attn_jax.softmax.xla import attention_blockwise

H = 2


def _params(L=4.0, c=0.3):
    f = init_fire(jax.random.key(0), H, width=8, c=c, L=L)
    b1 = 0.3 * jax.random.normal(jax.random.key(1), f.b1.shape)        # non-zero hidden biases: kinks in range
    return (f.w1, b1, f.w2, f.b2 + 0.1, f.c, f.L)


def test_tile_equals_plain_loop_with_interpolation_active():
    p = _params()
    got, want = tk.compiled(lambda *p: (FIRE(*p).materialize(7, 10), fire_bias_reference(FIRE(*p), 7, 10)), *p)
    tk.assert_close(got, want, name="FIRE tiles vs loop")
    tile = tk.compiled(lambda *p: FIRE(*p).tile(jnp.arange(2, 5), jnp.arange(3, 9), 7, 10), *p)
    tk.assert_close(tile, want[:, :, 2:5, 3:9], name="FIRE offset tile")


@pytest.mark.parametrize("impl", ["xla", "dense"])
def test_attention_with_fire_equals_dense_bias_values_and_grads(impl):
    T, S = 9, 12
    q, k, v = tk.random_qkv_compiled(jax.random.key(2), B=1, T=T, S=S, H=H, K=1, Dk=8)
    w1, b1, w2, b2, c, L = _params()
    # b2 shifts a head's whole row of logits: its exact gradient is zero (softmax shift invariance),
    # so it is held fixed rather than compared at the rounding-noise level.
    fire = lambda w1, b1, w2, c, L: FIRE(w1, b1, w2, b2, c, L)  # noqa: E731

    def fast(q, k, v, *p):
        if impl == "xla":
            return attention_blockwise(q, k, v, bias=fire(*p), mask=masks.causal(), block_q=3, block_k=4)
        return aj.attention(q, k, v, bias=fire(*p), mask=masks.causal(), impl="dense")

    def ref(q, k, v, *p):
        return aj.attention(q, k, v, bias=fire_bias_reference(fire(*p), T, S), mask=masks.causal(),
                            impl="reference")

    tk.check_vjp_parity(fast, ref, (q, k, v, w1, b1, w2, c, L), ("q", "k", "v", "w1", "b1", "w2", "c", "L"))


def test_decode_equals_full_forward_rows():
    from attn_jax.softmax.decode import decode_attention
    q, k, v = tk.random_qkv_compiled(jax.random.key(3), B=2, T=12, S=12, H=H, K=1, Dk=8)
    lengths = jnp.array([12, 7], jnp.int32)

    def run(q, k, v, *p):
        bias = FIRE(*p)
        got = decode_attention(jnp.stack([q[0, 11], q[1, 6]])[:, None], k, v, lengths=lengths, bias=bias)[:, 0]
        full12 = aj.attention(q, k, v, bias=bias, mask=masks.causal(), impl="reference")
        full7 = aj.attention(q[:, :7], k[:, :7], v[:, :7], bias=bias, mask=masks.causal(), impl="reference")
        return got, jnp.stack([full12[0, 11], full7[1, 6]])

    got, want = tk.compiled(run, q, k, v, *_params())
    tk.assert_close(got, want, name="FIRE decode vs full forward")


def test_bad_inputs_name_the_argument():
    w1, b1, w2, b2, c, L = _params()
    with pytest.raises(ValueError, match=r"w2, b2: expected \[width=8, H\]"):
        FIRE(w1, b1, w2[:3], b2, c, L)
    with pytest.raises(ValueError, match="c, L: expected scalars"):
        FIRE(w1, b1, w2, b2, jnp.ones(2), L)
    with pytest.raises(ValueError, match="w1, b1: expected two"):
        FIRE(w1, b1[:2], w2, b2, c, L)
