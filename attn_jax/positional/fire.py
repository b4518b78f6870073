"""FIRE: functional interpolation for relative positions, a learned bias evaluated per tile.

Paper: Li, You, Guruganesh, Ainslie, Ontanon, Zaheer, Sanghai, Yang, Kumar, Bhojanapalli,
"Functional Interpolation for Relative Positions Improves Long Context Transformers", 2023,
arXiv:2310.04418 (Sec. 3).  For query ``i`` (absolute position ``p_i = i + (S - T)``) and key ``j``::

    bias_h(i, j) = f_θ( ψ(p_i - j) / ψ(max(L, p_i)) )_h,      ψ(x) = log(|c x| + 1)   (+ eps below)

``f_θ: R -> R^H`` is a small MLP (one hidden ReLU layer of ``width`` units, 32 in the paper, outputs
one value per head); ``c > 0`` (init 0.1) and the threshold ``L`` (init 512) are learned.  Dividing
by ``ψ(max(L, p_i))`` is the *progressive interpolation*: the input of ``f_θ`` stays in ``[0, 1]``
for causal pairs at any length, and ``L`` keeps short prefixes from being stretched.  The absolute
values (``|c x|``, ``|L|``) and ``eps = 1e-6`` in the denominator follow the paper's reference code
(Appendix); keys after the query (``p_i - j < 0``) get ``ψ(|·|)`` as there and are meant to be
hidden by a causal mask.

Position-only, so it is a :class:`~attn_jax.core.bias.StructuredBias`: every tiled path evaluates
it per ``(bq, bk)`` tile (the MLP on ``bq x bk`` scalars), decode at the true positions; gradients
reach the MLP, ``c`` and ``L`` through the pytree.  Pallas kernels refuse it (not ALiBi).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attn_jax.core.array_types import ArrayLike
from attn_jax.core.bias import StructuredBias, query_positions
from attn_jax.positional.alibi import check_index

__all__ = ["FIRE", "fire_bias_reference", "init_fire"]

EPS = 1e-6


def init_fire(key, num_heads: int, *, width: int = 32, c: float = 0.1, L: float = 512.0) -> "FIRE":
    """A :class:`FIRE` with the paper's initial ``c`` and ``L`` and a LeCun-normal MLP."""
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (width,), jnp.float32)                     # fan-in 1
    w2 = jax.random.normal(k2, (width, num_heads), jnp.float32) * width ** -0.5
    return FIRE(w1, jnp.zeros((width,)), w2, jnp.zeros((num_heads,)), jnp.asarray(c, jnp.float32),
                jnp.asarray(L, jnp.float32))


def _normalised_distance(p_i, j, c, L):
    dist = jnp.log(jnp.abs(c * (p_i - j).astype(jnp.float32)) + 1.0)
    norm = jnp.log(jnp.abs(c * jnp.maximum(p_i.astype(jnp.float32), jnp.abs(L))) + 1.0) + EPS
    return dist / norm


@jax.tree_util.register_pytree_node_class
class FIRE(StructuredBias):
    """The FIRE bias (module docstring).  Pytree leaves: ``w1 [width]``, ``b1 [width]``,
    ``w2 [width, H]``, ``b2 [H]``, ``c``, ``L`` (scalars)."""

    def __init__(self, w1: Float[ArrayLike, " W"], b1: Float[ArrayLike, " W"], w2: Float[ArrayLike, "W H"],
                 b2: Float[ArrayLike, " H"], c: Float[ArrayLike, ""], L: Float[ArrayLike, ""]):
        w1, b1, w2, b2, c, L = (jnp.asarray(x) for x in (w1, b1, w2, b2, c, L))
        if w1.ndim != 1 or b1.shape != w1.shape:
            raise ValueError(f"w1, b1: expected two [width] vectors, got {tuple(w1.shape)} and {tuple(b1.shape)}")
        if w2.ndim != 2 or w2.shape[0] != w1.shape[0] or b2.shape != (w2.shape[1],):
            raise ValueError(f"w2, b2: expected [width={w1.shape[0]}, H] and [H], got {tuple(w2.shape)} and "
                             f"{tuple(b2.shape)}")
        if c.shape != () or L.shape != ():
            raise ValueError(f"c, L: expected scalars, got shapes {tuple(c.shape)} and {tuple(L.shape)}")
        self.w1, self.b1, self.w2, self.b2, self.c, self.L = w1, b1, w2, b2, c, L
        self.num_heads = int(w2.shape[1])

    def tile(self, q_idx: Int[Array, " tq"], k_idx: Int[Array, " tk"], T: int, S: int) -> Float[Array, "1 H tq tk"]:
        q_idx, k_idx = check_index(q_idx, "q_idx"), check_index(k_idx, "k_idx")
        x = _normalised_distance(query_positions(q_idx, T, S)[:, None], k_idx[None, :], self.c.astype(jnp.float32),
                                 self.L.astype(jnp.float32))                           # [tq, tk]
        h = jax.nn.relu(x[..., None] * self.w1.astype(jnp.float32) + self.b1.astype(jnp.float32))
        out = jnp.einsum("qkw,wh->hqk", h, self.w2.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        return (out + self.b2.astype(jnp.float32)[:, None, None])[None]

    def parameters(self):
        return (self.w1, self.b1, self.w2, self.b2, self.c, self.L)

    def tree_flatten(self):
        return (self.w1, self.b1, self.w2, self.b2, self.c, self.L), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.w1, obj.b1, obj.w2, obj.b2, obj.c, obj.L = children
        shape = getattr(obj.w2, "shape", None)
        obj.num_heads = int(shape[1]) if shape is not None and len(shape) == 2 else None
        return obj

    def __repr__(self):
        return f"FIRE(width={self.w1.shape[0]}, num_heads={self.num_heads})"


def fire_bias_reference(fire: FIRE, T: int, S: int) -> Float[Array, "1 H T S"]:
    """The dense FIRE bias by a Python loop over query rows (plain code for tests)."""
    rows = []
    for i in range(T):
        p = i + (S - T)
        x = jnp.asarray([jnp.log(jnp.abs(fire.c * (p - j)) + 1.0) for j in range(S)])
        x = x / (jnp.log(jnp.abs(fire.c * jnp.maximum(p, jnp.abs(fire.L))) + 1.0) + EPS)
        h = jax.nn.relu(x[:, None] * fire.w1[None] + fire.b1[None])                    # [S, W]
        rows.append(h @ fire.w2 + fire.b2)                                             # [S, H]
    return jnp.stack(rows).transpose(2, 0, 1)[None]


# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="fire", family="positional", title="FIRE (learned functional relative bias, per tile)",
    papers=(Paper("Functional Interpolation for Relative Positions Improves Long Context Transformers", 2023,
                  "2310.04418", "Li et al."),),
    summary="bias_h(i, j) = MLP(ψ(i - j) / ψ(max(L, i)))_h, ψ(x) = log(|c x| + 1), c and L learned",
    op=FIRE, directions=("causal",), layer="attn_jax.nn.relative_mixers:FIREAttention",
    notes="a StructuredBias: the MLP evaluated per tile in every tiled path and in decode; Pallas refuses it"))
