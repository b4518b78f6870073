"""Logical sharding axes map onto a device mesh through flax's logical-axis rules."""

import jax
import numpy as np
from flax import nnx
from flax.core.spmd import logical_axis_rules
from jax.sharding import NamedSharding, PartitionSpec

from attn_jax.models import DecoderConfig, DecoderLM

RULES = (("vocab", "model"), ("embed", None), ("heads", "model"), ("kv_heads", "model"), ("head_dim", None),
         ("mlp", "model"))


def test_every_parameter_has_logical_axes_and_shards_on_a_mesh():
    cfg = DecoderConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        mixer_pattern="softmax,sliding_window", tie_embeddings=False)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(params):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var.get_value().ndim, f"{path}: logical axes {axes}"

    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with logical_axis_rules(RULES):
        specs = nnx.get_partition_spec(params)
    assert specs["blocks"][0]["mixer"]["w_q"].get_value() == PartitionSpec(None, "model", None)
    assert specs["blocks"][0]["mlp"]["w_down"].get_value() == PartitionSpec("model", None)
    assert specs["lm_head"].get_value() == PartitionSpec(None, "model")
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    sharded = jax.device_put(params, shardings)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    tok = jax.numpy.zeros((2, 8), jax.numpy.int32)
    f = jax.jit(lambda p, t: nnx.merge(graphdef, p, rest)(t)[0])
    np.testing.assert_array_equal(np.asarray(f(sharded, tok)), np.asarray(f(params, tok)))
