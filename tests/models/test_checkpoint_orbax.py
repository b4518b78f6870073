"""Orbax save/restore of a DecoderLM's state is bit-identical (parameters and logits)."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from attn_jax.core.testing import fast_jit
from attn_jax.models import DecoderConfig, DecoderLM


def test_orbax_roundtrip_is_bit_identical(tmp_path):
    cfg = DecoderConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        mixer_pattern="softmax,sliding_window", tie_embeddings=False)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
        ckpt.wait_until_finished()

    fresh = DecoderLM(cfg, rngs=nnx.Rngs(1))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(1))))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "state", abstract)
    before = jax.tree.leaves(nnx.state(fresh, nnx.Param))
    assert any(not np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves(nnx.state(model, nnx.Param))))
    nnx.update(fresh, restored)

    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(nnx.state(fresh))):
        a, b = (jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x for x in (a, b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # fast-compiled programs (compile time dominates; both states run the same executable)
    tok = fast_jit(lambda: jax.random.randint(jax.random.key(0), (2, 8), 0, 50))()
    f = fast_jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    np.testing.assert_array_equal(np.asarray(f(nnx.state(fresh), tok)), np.asarray(f(state, tok)))
