"""Norms, MLPs and embeddings against their equations; parameter dtypes and sharding axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax.core import testing as tk
from attn_jax.nn import Embed, GeluMLP, LayerNorm, RMSNorm, SwiGLU


def _x(shape=(2, 5, 16), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 3 + 1


def test_rmsnorm_equation():
    n = RMSNorm(16)
    n.scale[...] = jnp.linspace(0.5, 2.0, 16)
    x = _x()
    xn = np.asarray(x, np.float64)
    ref = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-6) * np.linspace(0.5, 2.0, 16)
    tk.assert_close(n(x), ref.astype(np.float32))


def test_layernorm_equation():
    n = LayerNorm(16)
    n.bias[...] = jnp.full((16,), 0.25)
    x = _x()
    xn = np.asarray(x, np.float64)
    ref = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-6) + 0.25
    tk.assert_close(n(x), ref.astype(np.float32))


def test_swiglu_and_gelu_equations():
    x = _x()
    s = SwiGLU(16, 24, rngs=nnx.Rngs(0))
    g, u, d = (np.asarray(p[...], np.float64) for p in (s.w_gate, s.w_up, s.w_down))
    xn = np.asarray(x, np.float64)
    a = xn @ g
    ref = ((a / (1 + np.exp(-a))) * (xn @ u)) @ d
    tk.assert_close(s(x), ref.astype(np.float32))
    m = GeluMLP(16, 24, rngs=nnx.Rngs(1))
    ref2 = jax.nn.gelu(x @ m.w_1[...] + m.b_1[...], approximate=False) @ m.w_2[...] + m.b_2[...]
    tk.assert_close(m(x), ref2)
    assert sum(p.size for p in jax.tree.leaves(nnx.state(s, nnx.Param))) == 3 * 16 * 24
    assert sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param))) == 2 * 16 * 24 + 24 + 16


def test_embed_lookup_and_tied_readout_bf16_compute():
    e = Embed(10, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert e.embedding[...].dtype == jnp.float32
    tok = jnp.array([[1, 9, 0]])
    h = e(tok)
    assert h.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(e.embedding[...][tok].astype(jnp.bfloat16),
                                                                        np.float32))
    assert e.attend(h).shape == (1, 3, 10)
    with pytest.raises(TypeError, match="^tokens:"):
        e(jnp.ones((1, 3)))
    specs = nnx.get_partition_spec(nnx.state(e, nnx.Param))
    assert tuple(specs["embedding"].get_value()) == ("vocab", "embed")


@pytest.mark.parametrize("cls, kw, field", [
    (RMSNorm, dict(dim=0), "dim"),
    (SwiGLU, dict(d_model=8, hidden=-1), "hidden"),
])
def test_bad_sizes_name_the_field(cls, kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        cls(**kw, rngs=nnx.Rngs(0))
