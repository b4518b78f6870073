"""Sequence parallelism for causal linear attention by all-gathering chunk states (LASP-2 style).

"LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid", Sun et al., 2025,
arXiv:2502.07563.  With the sequence split into ``n`` contiguous blocks over ``axis_name``, causal
(ungated) linear attention of block ``r`` needs only the state of everything before it:

    M_r = Σ_{j in block r} φ(k_j)ᵀ [v_j, 1]          (the block's own state, from zero)
    P_r = Σ_{s < r} M_s                               (one all-gather of the n states, a masked sum)
    o_r = linear_attention(q_r, k_r, v_r, initial_state=P_r)

The only communication is one ``lax.all_gather`` of ``[B, H, D', Dv + 1]`` states per device,
independent of the sequence length (ring attention moves the keys and values).  Deviation from the
paper: ``M_r`` is taken as the final state of :func:`attn_jax.linear.linear_attention` over the
block (the unused block output is left to XLA's dead-code elimination) rather than a separate
``K^T V`` kernel, so feature maps and normalisation stay those of the single-device op.  No gates
(a decayed state would need the block's total decay in the prefix) and no segment ids.
Gradients: JAX autodiff (the all-gather transposes to a reduce-scatter).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, Float

from attn_jax.parallel.mesh import check_mesh_inputs
from attn_jax.linear import linear_attention

__all__ = ["sequence_parallel_linear_attention"]


def _body(q, k, v, *, axis_name, n, kwargs):
    _, own = linear_attention(q, k, v, causal=True, return_final_state=True, **kwargs)
    states = lax.all_gather(own, axis_name, axis=0, tiled=False)           # [n, B, H, D', Dv (+1)]
    before = (jnp.arange(n) < lax.axis_index(axis_name)).astype(states.dtype)
    prefix = jnp.tensordot(before, states, axes=1)
    o, _ = linear_attention(q, k, v, causal=True, initial_state=prefix, **kwargs)
    return o


def sequence_parallel_linear_attention(q: Float[Array, "B T H Dk"], k: Float[Array, "B T K Dk"],
                                       v: Float[Array, "B T K Dv"], *, mesh: Mesh, axis_name: str = "sequence",
                                       feature_map="elu", normalize: bool = True, eps: float = 1e-6,
                                       scale: float | None = None, impl="auto") -> Float[Array, "B T H Dv"]:
    """Causal :func:`attn_jax.linear.linear_attention` with the sequence split over ``axis_name``.

    Equals ``aj.linear.linear_attention(q, k, v, causal=True, ...)[0]`` on one device.  ``T`` must be
    divisible by the size of ``axis_name``; ``feature_map``, ``normalize``, ``eps``, ``scale`` and
    ``impl`` are passed to every block's call.
    """
    check_mesh_inputs(mesh, axis_name, q, k, v)
    n = mesh.shape[axis_name]
    if q.shape[1] % n:
        raise ValueError(f"q: expected the sequence length T divisible by the {axis_name!r} axis size {n}, "
                         f"got T={q.shape[1]}")
    kwargs = dict(feature_map=feature_map, normalize=normalize, eps=eps, scale=scale, impl=impl)
    spec = P(None, axis_name, None, None)
    fn = jax.shard_map(partial(_body, axis_name=axis_name, n=n, kwargs=kwargs), mesh=mesh, in_specs=(spec,) * 3,
                       out_specs=spec, check_vma=False)   # impl="auto" may trace a Pallas branch (see ring.py)
    return fn(q, k, v)
