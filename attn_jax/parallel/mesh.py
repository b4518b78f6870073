"""Device meshes with named axes, and the logical-axis rules that place model parameters on them.

A mesh has four named axes, outermost first (the order MaxText and the scaling literature use:
data parallelism across the slowest links, sequence / tensor parallelism across the fastest):

* ``"data"``: pure data parallelism (the batch is split, parameters are replicated);
* ``"fsdp"``: fully sharded data parallelism (the batch *and* the parameters' ``"embed"`` axis are
  split; parameters are gathered per layer by XLA's SPMD partitioner);
* ``"tensor"``: tensor (Megatron) parallelism over heads, MLP hidden units and the vocabulary;
* ``"sequence"``: context parallelism (ring attention, Ulysses) over the token axis.

Models in :mod:`attn_jax.models` name their parameter axes logically ("embed", "mlp", "vocab",
"heads", "kv_heads", "head_dim"; see :mod:`attn_jax.nn.layers`); :data:`PARAM_RULES` maps those
names onto the mesh axes and :func:`param_shardings` applies them to an ``nnx`` state.
:data:`ACTIVATION_RULES` gives the layout of activations ``[batch, length, ...]``.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from flax.core.spmd import logical_axis_rules
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["MESH_AXES", "PARAM_RULES", "ACTIVATION_RULES", "make_mesh", "param_shardings", "activation_spec",
           "check_mesh_inputs"]

#: The mesh's axis names, outermost first.
MESH_AXES = ("data", "fsdp", "tensor", "sequence")

#: Logical parameter axis -> mesh axis (None: replicated).  Every logical name the models use is
#: listed (a test checks that every parameter of the models is covered).
PARAM_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
)

#: Logical activation axis -> mesh axes: batch over data x fsdp, tokens over the sequence axis,
#: heads over the tensor axis (activations carry separate names so that "embed" of an activation
#: is not split over "fsdp", which already splits its batch).
ACTIVATION_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("act_heads", "tensor"),
    ("act_embed", None),
    ("act_head_dim", None),
)


def _check_axis_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, sequence: int = 1, devices=None) -> Mesh:
    """A :class:`jax.sharding.Mesh` with axes ``("data", "fsdp", "tensor", "sequence")``.

    Args:
      data, fsdp, tensor, sequence: the axis sizes; their product must equal the number of devices.
      devices: the devices to lay out (default: ``jax.devices()``, all processes' devices when
        ``jax.distributed.initialize`` was called).  The devices are ordered by
        :func:`jax.make_mesh` (topology-aware on TPU) when ``devices`` is None, else taken in the
        order given.

    Raises:
      TypeError / ValueError naming the axis for a non-positive or non-int size, and naming all four
      when their product differs from the device count.
    """
    sizes = tuple(_check_axis_size(n, v) for n, v in zip(MESH_AXES, (data, fsdp, tensor, sequence)))
    devs = jax.devices() if devices is None else list(devices)
    if math.prod(sizes) != len(devs):
        given = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
        raise ValueError(f"data * fsdp * tensor * sequence: expected the device count {len(devs)}, "
                         f"got {math.prod(sizes)} ({given})")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices is None:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devs, dtype=object).reshape(sizes), MESH_AXES, axis_types=auto)


def param_shardings(state, mesh: Mesh, rules=PARAM_RULES):
    """``NamedSharding``s for an ``nnx`` state whose parameters carry logical axes (``out_sharding``).

    ``jax.device_put(state, param_shardings(state, mesh))`` places a model's parameters on the mesh.
    """
    with logical_axis_rules(rules):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def activation_spec(*logical_axes: str | None, rules=ACTIVATION_RULES) -> PartitionSpec:
    """The :class:`PartitionSpec` of an activation with the given logical axes, e.g.
    ``activation_spec("batch", "length", "act_embed") == P(("data", "fsdp"), "sequence", None)``."""
    table = dict(rules)
    for i, name in enumerate(logical_axes):
        if name is not None and name not in table:
            raise ValueError(f"logical_axes[{i}]: expected one of {sorted(table)} or None, got {name!r}")
    return PartitionSpec(*(None if n is None else table[n] for n in logical_axes))


def check_mesh_inputs(mesh, axis_name: str, q, k, v) -> None:
    """The checks every sharded attention op makes first: ``mesh`` is a :class:`Mesh` holding
    ``axis_name``, and ``q``, ``k``, ``v`` are rank-4 ``[B, T, H, D]`` arrays (errors name the argument)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh (attn_jax.parallel.make_mesh), got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name: expected one of the mesh axes {mesh.axis_names}, got {axis_name!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name}: expected rank 4 [B, T, H, D], got shape {getattr(x, 'shape', None)}")
