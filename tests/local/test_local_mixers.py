"""The neighborhood mixer on token grids: locality on a 2-D grid, the ViT via mixer_pattern, refusals.

The registry-wide encoder invariants (jit == eager, gradients, padded rows == rows alone, packed
refusal) run over it in tests/nn/test_encoder_mixers.py.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import mixers
from attn_jax.core import testing as tk
from attn_jax.models import ViT, ViTConfig

D = 16


def test_2d_grid_locality():
    """Perturbing token (0, 0) of a 6 x 6 grid (k=3) changes exactly the outputs of the queries whose
    shifted windows contain it: rows {0, 1} x columns {0, 1}."""
    m = tk.build_module(mixers.get("neighborhood"), D, 2, grid=(6, 6), kernel_size=3, causal=False)
    graphdef, state = nnx.split(m)
    call = tk.fast_jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 36, D)), jnp.float32)
    y, y2 = call(state, x), call(state, x.at[0, 0].add(3.0))
    changed = np.asarray(jnp.abs(y2 - y).max(-1) > 1e-6)[0].reshape(6, 6)
    expected = np.zeros((6, 6), bool)
    expected[:2, :2] = True
    np.testing.assert_array_equal(changed, expected)


def test_vit_with_neighborhood_mixer():
    cfg = ViTConfig(num_classes=3, image_size=(16, 24), patch_size=4, d_model=D, num_heads=2,
                    mixer_pattern="neighborhood,softmax", pooling="mean", position_embedding="sincos2d",
                    mixer_kwargs={"neighborhood": {"grid": (4, 6), "kernel_size": (3, 5)},
                                  "softmax": {"positional": "none"}})
    model = tk.build_module(ViT, cfg)
    assert [b.mixer.attention_fn.grid for b in model.encoder.blocks[:1]] == [(4, 6)]
    graphdef, state = nnx.split(model)
    out = tk.fast_jit(lambda s, im: nnx.merge(graphdef, s)(im))(state, jnp.ones((2, 16, 24, 3)))
    assert out.shape == (2, 3) and np.isfinite(np.asarray(out)).all()


def test_refusals():
    factory = mixers.get("neighborhood")
    with pytest.raises(ValueError, match="'neighborhood'.*non-causal only"):   # what a decoder would build
        factory(D, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="grid: expected a tuple"):
        factory(D, 2, grid=(4, 0), causal=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_size"):
        factory(D, 2, grid=(4, 6), kernel_size=5, causal=False, rngs=nnx.Rngs(0))
    m = tk.build_module(factory, D, 2, grid=(4, 6), kernel_size=3, causal=False)
    with pytest.raises(ValueError, match=r"x: the neighborhood mixer's grid \(4, 6\) has 24 tokens, got T=20"):
        m(jnp.ones((1, 20, D)))
    with pytest.raises(ValueError, match="segment_ids: padding is supported on 1-D grids only"):
        m(jnp.ones((1, 24, D)), segment_ids=jnp.ones((1, 24), jnp.int32))


def test_relative_position_bias_is_learned():
    """rel_pos_bias=True: the table [H, 2k-1, 2k-1] gets gradients, and the output is the op's with it."""
    import jax

    m = tk.build_module(mixers.get("neighborhood"), D, 2, grid=(4, 4), kernel_size=3, rel_pos_bias=True, causal=False)
    assert m.attention_fn.rpb[...].shape == (2, 5, 5)
    graphdef, state = nnx.split(m)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 16, D)), jnp.float32)

    def loss(s):
        return jnp.sum(nnx.merge(graphdef, s)(x)[0] ** 2)

    g = tk.fast_jit(jax.grad(loss))(state)
    assert float(jnp.abs(g["attention_fn"]["rpb"][...]).max()) > 0


def test_grid_mixers_compute_their_ops():
    """On a 2-D grid the attention of 'swin' (bias table zeroed), 'axial', 'halo' and 'hilo' equals the
    op's reference (halo: padding="masked"); with a non-zero table 'swin' adds Swin's relative
    position bias, checked against the table read by hand for one (query, key) pair."""
    from attn_jax import local
    from attn_jax.local.grid_mask import GridRelativeBias

    grid, H, K, Dh = (4, 8), 4, 2, 8
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 32, h, Dh)), jnp.float32) for h in (H, K, K))
    g = lambda a: a.reshape(1, *grid, *a.shape[2:])  # noqa: E731
    fns = {name: tk.build_module(mixers.get(name), D, H, num_kv_heads=K, grid=grid, causal=False, **kw).attention_fn
           for name, kw in (("swin", {"window": (2, 4), "shift": (1, 2)}), ("axial", {"axis": 0}),
                            ("halo", {"block_size": (2, 4), "halo": 1}), ("hilo", {"window": (2, 2)}))}
    table = jnp.asarray(rng.standard_normal((H, 3, 7)), jnp.float32)
    fns["swin"].table[...] = jnp.zeros_like(table)
    s = Dh ** -0.5
    out = tk.compiled(lambda q, k, v, t: {
        "swin": (fns["swin"](q, k, v, mask=None, scale=s, x=None),
                 local.window_attention_reference(g(q), g(k), g(v), (2, 4), shift=(1, 2))),
        "axial": (fns["axial"](q, k, v, mask=None, scale=s, x=None), local.axial_reference(g(q), g(k), g(v), 0)),
        "halo": (fns["halo"](q, k, v, mask=None, scale=s, x=None),
                 local.halo_attention_reference(g(q), g(k), g(v), (2, 4), 1, padding="masked")),
        "hilo": (fns["hilo"](q, k, v, mask=None, scale=s, x=None),
                 local.hilo_attention_reference(g(q), g(k), g(v), (2, 2), lo_heads=2)),
        "bias": GridRelativeBias(t, grid).materialize(32, 32)}, q, k, v, table)
    for name in ("swin", "axial", "halo", "hilo"):
        mixer_out, ref = out[name]
        tk.assert_close(mixer_out, ref.reshape(mixer_out.shape), name=name)
    # query (1, 2) -> key (2, 0): offsets (+1, -2) -> table[h, 1 + 1, -2 + 3]
    np.testing.assert_allclose(np.asarray(out["bias"])[0, :, 1 * 8 + 2, 2 * 8 + 0], np.asarray(table)[:, 2, 1])
