"""The relative-embedding mixers against plain, independently written layers: RelativeAttention
(projections + softmax over scale (q k + q E)) and RCMHA (width-3 causal depth-wise conv on q, k, v,
then scale ((q + u) k + q E + b)), with non-trivial u, b, E; the registry suites cover the protocol,
causality and prefill + decode == full forward."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from attn_jax import mixers
from attn_jax.core import testing as tk
from attn_jax.positional.relative import relative_distances, relative_rows

B, T, D, H, K = 2, 11, 32, 4, 2
R = 5


def _manual_attention(q, k, v, logits_extra, causal=True):
    """softmax(scale q k + extra) v with K/V heads repeated (plain code)."""
    G = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5 + logits_extra
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool)), s, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


def _gathered(table, causal=True):
    return table[relative_rows(relative_distances(T, T), table.shape[0], causal=causal)]     # [T, S, ...]


def _randomise(m, names, seed=0):
    for i, n in enumerate(names):
        p = getattr(m, n)
        p[...] = 0.5 * jax.random.normal(jax.random.key(seed + i), p[...].shape, p[...].dtype)


def test_relative_attention_layer_equals_plain_layer():
    m = tk.build_module(mixers.get("relative"), D, H, num_kv_heads=K, max_distance=R)
    _randomise(m, ["rel_table"])
    x = jax.random.normal(jax.random.key(1), (B, T, D))

    def manual(x):
        q = jnp.einsum("btd,dhf->bthf", x, m.w_q[...])
        k = jnp.einsum("btd,dhf->bthf", x, m.w_k[...])
        v = jnp.einsum("btd,dhf->bthf", x, m.w_v[...])
        rel = jnp.einsum("bthd,tshd->bhts", q, _gathered(m.rel_table[...])) * q.shape[-1] ** -0.5
        return jnp.einsum("bthf,hfd->btd", _manual_attention(q, k, v, rel), m.w_o[...])

    got, want = tk.compiled(lambda x: (m(x)[0], manual(x)), x)
    tk.assert_close(got, want, name="RelativeAttention vs plain layer")


def _conv3(x, kern, bias):
    """Causal depth-wise conv over time, filters [w, D] shared by the heads, zero history (plain loop)."""
    w = kern.shape[0]
    xp = jnp.pad(x, ((0, 0), (w - 1, 0), (0, 0), (0, 0)))
    return sum(kern[i] * xp[:, i:i + x.shape[1]] for i in range(w)) + bias


@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_rcmha_equals_plain_layer(impl):
    m = tk.build_module(mixers.get("rcmha"), D, H, num_kv_heads=K, max_distance=R, impl=impl)
    _randomise(m, ["rel_table", "rel_bias", "query_bias", "conv_bias"], seed=3)
    x = jax.random.normal(jax.random.key(2), (B, T, D))

    def manual(x):
        q, k, v = (_conv3(jnp.einsum("btd,dhf->bthf", x, w[...]), m.conv_kernel[i], m.conv_bias[i])
                   for i, w in enumerate((m.w_q, m.w_k, m.w_v)))
        scale = q.shape[-1] ** -0.5
        e, b, u = _gathered(m.rel_table[...]), _gathered(m.rel_bias[...]), m.query_bias[...]
        extra = scale * (jnp.einsum("bthd,tshd->bhts", q, e) + jnp.moveaxis(b, -1, 0)[None]
                         + jnp.einsum("hd,bshd->bhs", u, jnp.repeat(k, H // K, axis=2))[:, :, None, :])
        return jnp.einsum("bthf,hfd->btd", _manual_attention(q, k, v, extra), m.w_o[...])

    got, want = tk.compiled(lambda x: (m(x)[0], manual(x)), x)
    tk.assert_close(got, want, name=f"RCMHA ({impl}) vs plain layer")


def test_rcmha_bad_arguments():
    with pytest.raises(ValueError, match="max_distance: expected an int >= 1"):
        mixers.get("rcmha")(D, H, max_distance=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads: 3 kv heads do not divide num_heads=4"):
        mixers.get("rcmha")(D, H, num_kv_heads=3, rngs=nnx.Rngs(0))
    m = tk.build_module(mixers.get("rcmha"), D, H)
    with pytest.raises(TypeError, match="cache: expected an RCMHACache"):
        m(jnp.zeros((1, 2, D)), cache=object())
