"""Input layouts as the JAX ecosystem passes them, normalised to ``[B, T, H, D]``.

``attn_jax`` computes on ``q: [B, T, H, Dk]``, ``k/v: [B, S, K, D]`` (sequence on
axis 1, heads on axis 2, as ``jax.nn.dot_product_attention`` and Flax).  Callers
from jax.nn and Flax also pass

* rank-3 ``[T, H, D]`` inputs (no batch axis): a batch of one is added;
* extra leading batch axes ``[batch..., T, H, D]``: they are folded into one
  ``B = prod(batch...)`` and unfolded on the output;
* bias and boolean / float / int mask arrays broadcastable to
  ``[batch..., H, T, S]``, of rank 3 (``[H|1, T|1, S|1]``) up to
  ``len(batch) + 3``: missing leading axes are added (NumPy broadcasting) and the
  batch axes folded like q's.

Every array is converted with ``jnp.asarray`` here, so NumPy (or any array-like)
inputs behave exactly like ``jax.Array`` inputs under ``grad``, ``jit`` and ``vmap``
(a NumPy primal must not reach a ``custom_vjp`` residual, where indexing it with a
traced index fails).  :class:`attn_jax.masks.Mask` objects are passed through
unchanged: they see the folded batch ``B``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.core.bias import StructuredBias
from attn_jax.core.masks import Mask

LAYOUT = "[B, T, H, D]"


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def as_array(x):
    """``jnp.asarray(x)``; ``jax.ShapeDtypeStruct`` (used by ``explain``) passes through."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jnp.asarray(x)


def _reshape(x, shape):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype)
    return jnp.reshape(x, shape)


@dataclass(frozen=True)
class Layout:
    """The batch axes folded away by :func:`normalize_qkv`; :meth:`unfold` restores them."""

    batch_shape: tuple[int, ...]

    @property
    def folded(self) -> bool:
        return len(self.batch_shape) != 1

    def unfold(self, x):
        """``[B, *rest] -> [batch..., *rest]`` (``[*rest]`` for rank-3 inputs)."""
        if not self.folded:
            return x
        return jnp.reshape(x, self.batch_shape + tuple(x.shape[1:]))


def normalize_qkv(q, k, v):
    """Convert q, k, v to arrays and fold their batch axes: ``(q4, k4, v4, layout)``.

    Raises ``ValueError`` naming the argument when the ranks or batch axes disagree.
    """
    q, k, v = as_array(q), as_array(k), as_array(v)
    rq = len(_shape(q))
    for name, x, tail in (("q", q, "T, H, Dk"), ("k", k, "S, K, Dk"), ("v", v, "S, K, Dv")):
        r = len(_shape(x))
        if r < 3:
            raise ValueError(f"{name}: expected rank 4 [B, {tail}] (or rank 3 [{tail}], or [batch..., {tail}]), "
                             f"got rank {r} with shape {list(_shape(x))}; layout is {LAYOUT}")
    for name, x in (("k", k), ("v", v)):
        if len(_shape(x)) != rq:
            raise ValueError(f"{name}: expected the rank of q ({rq}, layout [batch..., T, H, D]), got rank "
                             f"{len(_shape(x))} with shape {list(_shape(x))} (q has shape {list(_shape(q))})")
    batch = _shape(q)[:-3]
    for name, x in (("k", k), ("v", v)):
        if rq != 4 and _shape(x)[:-3] != batch:  # rank 4: check_qkv reports it with the layout hint
            raise ValueError(f"batch size mismatch: q has batch axes {list(batch)}, {name} has "
                             f"{list(_shape(x)[:-3])} (layout [batch..., T, H, D])")
    layout = Layout(batch)
    if layout.folded:
        B = math.prod(batch)
        q, k, v = (_reshape(x, (B,) + _shape(x)[-3:]) for x in (q, k, v))
    return q, k, v, layout


def fold_broadcastable(name: str, x, layout: Layout):
    """Fold a bias or mask array broadcastable to ``[batch..., H, T, S]`` into ``[B|1, ...]``.

    Arrays of rank 3 up to ``len(batch) + 3`` are accepted (missing leading axes are
    broadcast); the trailing three axes are checked later against ``[H, T, S]``.
    """
    x = as_array(x)
    shape = _shape(x)
    nb = len(layout.batch_shape)
    if not 3 <= len(shape) <= nb + 3:
        want = "rank 3 [H|1, T, S]" + (f" or rank {nb + 3} [batch..., H|1, T, S]" if nb else "")
        raise ValueError(f"{name}: expected {want} for q of batch axes {list(layout.batch_shape)} "
                         f"(layout {LAYOUT}), got rank {len(shape)} with shape {list(shape)}")
    shape = (1,) * (nb + 3 - len(shape)) + shape
    lead, rest = shape[:nb], shape[nb:]
    if all(d == 1 for d in lead):
        return _reshape(x, (1,) + rest)
    if nb == 1:
        return _reshape(x, shape)
    if any(d not in (1, b) for d, b in zip(lead, layout.batch_shape)):
        raise ValueError(f"{name}: leading axes {list(lead)} do not broadcast to q's batch axes "
                         f"{list(layout.batch_shape)}")
    x = jnp.broadcast_to(jnp.reshape(x, shape), layout.batch_shape + rest)
    return jnp.reshape(x, (math.prod(layout.batch_shape),) + rest)


def normalize_call(q, k, v, bias, mask, sinks):
    """Everything :func:`attn_jax.attention` takes, as arrays in the ``[B, T, H, D]`` layout.

    Returns ``(q, k, v, bias, mask, sinks, layout)``; structured biases and mask objects
    pass through unchanged, bias and mask arrays are folded with :func:`fold_broadcastable`.
    """
    q, k, v, layout = normalize_qkv(q, k, v)
    if bias is not None and not isinstance(bias, StructuredBias):
        bias = fold_broadcastable("bias", bias, layout)
    if mask is not None and not isinstance(mask, Mask) and not isinstance(mask, str) and hasattr(mask, "shape"):
        mask = fold_broadcastable("mask", mask, layout)
    if sinks is not None:
        sinks = as_array(sinks)
    return q, k, v, bias, mask, sinks, layout
