"""``attn_jax.parallel``: device meshes, parameter sharding rules, and sequence/context parallelism
(ring attention, Ulysses) built on ``jax.shard_map`` and JAX's own collectives.

    from attn_jax import parallel
    mesh = parallel.make_mesh(sequence=8)
    o = parallel.ring_attention(q, k, v, mesh=mesh, causal=True)
"""

from attn_jax.parallel.decode import sharded_decode_attention
from attn_jax.parallel.linear import sequence_parallel_linear_attention
from attn_jax.parallel.mesh import (ACTIVATION_RULES, MESH_AXES, PARAM_RULES, activation_spec, make_mesh,
                                    param_shardings)
from attn_jax.parallel.ring import (ring_attention, ulysses_attention, zigzag_order, zigzag_permute,
                                    zigzag_unpermute)

__all__ = ["ACTIVATION_RULES", "MESH_AXES", "PARAM_RULES", "activation_spec", "make_mesh", "param_shardings",
           "ring_attention", "ulysses_attention", "zigzag_order", "zigzag_permute", "zigzag_unpermute",
           "sharded_decode_attention", "sequence_parallel_linear_attention"]
