"""ALiBi: attention with linear biases.

Paper: Press, Smith, Lewis, "Train Short, Test Long: Attention with Linear Biases Enables Input
Length Extrapolation", 2021, arXiv:2108.12409 (Sec. 3).  No position embeddings; instead each
head ``h`` adds a linear penalty to its logits::

    softmax(q_i K^T + m_h * [-(i-1), ..., -2, -1, 0])

i.e. ``bias[h, i, j] = -m_h * (i - j)`` for keys ``j <= i``.  The head slopes ``m_h`` are the
geometric sequence ``2^(-8/n), 2^(-16/n), ..., 2^(-8)`` for ``n`` heads (``n`` a power of two).
For other ``n`` we follow the authors' reference code
(ofirpress/attention_with_linear_biases, ``fairseq/models/transformer.py``, ``get_slopes``):
take the ``p = 2^floor(log2 n)`` slopes of ``p`` heads, then append the first ``n - p`` of every
other slope of ``2p`` heads (``slopes(2p)[0::2]``), i.e. the odd powers ``2^(-4/p * (2k+1))``.

Bias here (bottom-right alignment of :mod:`attn_jax.core.bias`: query ``i`` of ``T`` sits at
absolute position ``qpos_i = i + (S - T)`` among ``S`` keys)::

    bias[h, i, j] = -m_h * |qpos_i - j|

For causal attention only ``j <= qpos_i`` survives the mask and the formula is the paper's.  For
keys after the query (``j > qpos_i``; non-causal use, e.g. encoders) the same ``|.|`` is used,
giving the common symmetric variant.  ``causal`` is therefore *static metadata only* (for
kernels and for readers: this bias is meant to be paired with a causal mask); it never changes
values.  The reference code adds ``m_h * j`` instead, which differs from ours by a per-row
constant and gives the same softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attn_jax.core.bias import StructuredBias, query_positions

__all__ = ["alibi_slopes", "ALiBi", "alibi"]


def _slopes_list(n: int) -> list[float]:
    if n & (n - 1) == 0:  # power of two
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    p = 1 << (n.bit_length() - 1)  # closest lower power of two
    return _slopes_list(p) + _slopes_list(2 * p)[0::2][: n - p]


def alibi_slopes(num_heads: int) -> Float[Array, " H"]:
    """Per-head slopes ``m_h`` (float32 ``[num_heads]``), see module docstring."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)):
        raise TypeError(f"num_heads: expected an int, got {type(num_heads).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads: expected >= 1, got {num_heads}")
    return jnp.asarray(np.array(_slopes_list(int(num_heads)), dtype=np.float32))


def check_index(idx, name: str):
    """Validate a rank-1 integer tile index array (shared by the structured biases)."""
    if not hasattr(idx, "shape"):
        idx = np.asarray(idx)
    if idx.ndim != 1:
        raise ValueError(f"{name}: expected a rank-1 index array, got shape {tuple(idx.shape)}")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {idx.dtype}")
    return jnp.asarray(idx).astype(jnp.int32)


@jax.tree_util.register_pytree_node_class
class ALiBi(StructuredBias):
    """ALiBi as a :class:`~attn_jax.core.bias.StructuredBias` (a pytree; ``slopes`` is its leaf).

    Args:
      slopes: float ``[H]`` head slopes (e.g. :func:`alibi_slopes`); may be learned.
      causal: static flag recording that the bias is used with a causal mask (values are the
        same either way; see module docstring).
    """

    def __init__(self, slopes: Float[Array, " H"], *, causal: bool = True):
        if not hasattr(slopes, "shape"):
            slopes = np.asarray(slopes, dtype=np.float32)
        if slopes.ndim != 1:
            raise ValueError(f"slopes: expected shape [H], got {tuple(slopes.shape)}")
        if not jnp.issubdtype(slopes.dtype, jnp.floating):
            raise TypeError(f"slopes: expected a floating dtype, got {slopes.dtype}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
        self.slopes = jnp.asarray(slopes)
        self.causal = causal
        self.num_heads = int(slopes.shape[0])

    def tile(
        self, q_idx: Int[Array, " tq"], k_idx: Int[Array, " tk"], T: int, S: int
    ) -> Float[Array, "1 H tq tk"]:
        q_idx = check_index(q_idx, "q_idx")
        k_idx = check_index(k_idx, "k_idx")
        qpos = query_positions(q_idx, T, S)
        distance = jnp.abs(qpos[:, None] - k_idx[None, :]).astype(jnp.float32)
        return (-self.slopes.astype(jnp.float32)[:, None, None] * distance)[None]

    def parameters(self):
        return (self.slopes,)

    def tree_flatten(self):
        return (self.slopes,), (self.causal, self.num_heads)

    @classmethod
    def tree_unflatten(cls, aux, children):
        # Bypass __init__: leaves may be tracers, None or sentinels during transformations.
        obj = object.__new__(cls)
        obj.slopes, = children
        obj.causal, obj.num_heads = aux
        return obj

    def __repr__(self):
        return f"ALiBi(num_heads={self.num_heads}, causal={self.causal})"


def alibi(num_heads: int, *, causal: bool = True) -> ALiBi:
    """ALiBi bias with the paper's slopes for ``num_heads`` heads."""
    return ALiBi(alibi_slopes(num_heads), causal=causal)


# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="alibi", family="positional", title="ALiBi (evaluated per tile)",
    papers=(Paper("Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation", 2021,
                  "2108.12409", "Press et al."),),
    summary="bias_h(i, j) = -m_h |i - j| (causal: m_h (j - i)), geometric slopes m_h", op=alibi,
    directions=("causal", "bidirectional"), notes="a StructuredBias: an attention feature (bias=)"))
