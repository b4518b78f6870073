"""Relative position embeddings in the logits (Shaw et al.; Music Transformer), with linear memory.

Papers: Shaw, Uszkoreit, Vaswani, "Self-Attention with Relative Position Representations", 2018,
arXiv:1803.02155; Huang et al., "Music Transformer", 2018, arXiv:1809.04281 (Sec. 3.4, the
"skewing" that drops the ``T x T x D`` intermediate).  For query ``i`` (absolute position
``p_i = i + (S - T)``: bottom-right alignment, as for every bias in attn_jax) and key ``j``::

    logits_ij = scale * (q_i · k_j + q_i · E[row(j - p_i)])          scale defaults to Dk ** -0.5

with learned embeddings ``E`` of shape ``[N, H|1, Dk]`` (per head, or shared by all heads).
Two conventions for ``row`` (the relative distance ``r = j - p_i``):

* ``causal=False`` (Shaw et al.): ``N = 2R + 1``, ``row(r) = clip(r, -R, R) + R``; distances
  beyond ``R`` share the edge embeddings (Shaw's ``clip(x, k)``).
* ``causal=True`` (Music Transformer): ``N = R + 1``, ``row(r) = clip(-r, 0, R)``: row ``d`` is
  the embedding of a key ``d`` tokens in the past.  Music Transformer keeps one row per distance
  up to the maximum length (``N = T``, no clipping within it); a table with ``N < T`` clips at
  ``R = N - 1`` as Shaw does.  Keys after the query (``r > 0``) use row 0: they are meant to be
  hidden by a causal mask (:func:`relative_attention` adds it).

Not implemented: Shaw's second term (embeddings added to the *values*, ``a^V_ij``); Music
Transformer drops it too.

Three forms, equal in exact arithmetic (tests compare them in float64, values and gradients):

* :func:`relative_logits_gathered` -- the obvious one: gather ``E[row(r_ij)]`` into a
  ``[T, S, H, Dk]`` array and contract with ``q`` (the reference).
* :func:`relative_logits_skewed` -- Huang et al.: ``QE = q Eᵀ`` ``[T, N]`` (linear in ``T``), its
  columns spread over the ``T + S - 1`` distances that occur, then the pad-reshape-slice skew
  (:func:`skew`) puts column ``c - a + T - 1`` of row ``a`` at ``(a, c)``.  No ``T x S x D`` array.
* :class:`RelativeEmbedding` -- the same skew per ``(bq, bk)`` tile, inside the fused attention
  paths (``aj.attention(q, k, v, bias=RelativeEmbedding(E, ...))``, backends ``xla``, ``dense``,
  ``reference``): a tile needs only the ``bq + bk - 1`` rows of ``E`` of its distance window, so no
  ``T x S`` array is built at all.  Gradients reach ``q`` (through both terms), ``k``, ``v`` and
  ``E``.  The Pallas kernels and cuDNN refuse it (``aj.explain`` says why).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from attn_jax.core import masks as M
from attn_jax.core.array_types import ArrayLike
from attn_jax.core.bias import QueryDependentBias, query_positions

__all__ = ["RelativeEmbedding", "relative_distances", "relative_rows", "relative_logits_gathered",
           "relative_logits_skewed", "skew", "relative_attention", "relative_attention_reference"]


def _check_table(table, causal: bool):
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if not hasattr(table, "shape"):
        table = np.asarray(table, dtype=np.float32)
    if table.ndim != 3:
        raise ValueError(f"table: expected shape [N, H|1, Dk], got {tuple(table.shape)}")
    if not jnp.issubdtype(table.dtype, jnp.floating):
        raise TypeError(f"table: expected a floating dtype, got {table.dtype}")
    n = int(table.shape[0])
    if not causal and n % 2 != 1:
        raise ValueError(f"table: causal=False needs N = 2R + 1 rows (odd), got N = {n}")
    if n < 1:
        raise ValueError("table: expected at least one row, got 0")
    return table


def relative_distances(T: int, S: int) -> Int[Array, "T S"]:
    """``r_ij = j - p_i`` with ``p_i = i + (S - T)`` (bottom-right alignment), int32 ``[T, S]``."""
    q = jnp.arange(T, dtype=jnp.int32)
    return jnp.arange(S, dtype=jnp.int32)[None, :] - query_positions(q, T, S)[:, None]


def relative_rows(r: Int[Array, "..."], num_rows: int, *, causal: bool) -> Int[Array, "..."]:
    """Row of the table for relative distance ``r`` (see the module docstring for both conventions)."""
    if causal:
        return jnp.clip(-r, 0, num_rows - 1)
    R = (num_rows - 1) // 2
    return jnp.clip(r, -R, R) + R


def skew(x: Float[Array, "... tq L"], tk: int) -> Float[Array, "... tq tk"]:
    """Music Transformer's skew: ``out[..., a, c] = x[..., a, c - a + tq - 1]``, ``L = tq + tk - 1``.

    Pad one column, flatten the last two axes, drop ``tq - 1`` leading entries, reshape to rows of
    ``L``: row ``a`` then starts at column ``tq - 1 - a`` of ``x`` (no gather).
    """
    tq, L = x.shape[-2], x.shape[-1]
    if L != tq + tk - 1:
        raise ValueError(f"x: expected last axis tq + tk - 1 = {tq + tk - 1}, got {L}")
    lead = x.shape[:-2]
    flat = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, 1)]).reshape(*lead, tq * (L + 1))
    flat = lax.slice_in_dim(flat, tq - 1, tq - 1 + tq * L, axis=-1)
    return flat.reshape(*lead, tq, L)[..., :tk]


def relative_logits_gathered(q: Float[ArrayLike, "B T H Dk"], table: Float[ArrayLike, "N Hr Dk"], *, S: int,
                             causal: bool = False) -> Float[Array, "B H T S"]:
    """``q_i · E[row(j - p_i)]`` by gathering the ``[T, S, H|1, Dk]`` embeddings (the reference form).

    Unscaled; computed in the promoted dtype of ``q`` and ``table`` at the highest precision.
    """
    table = _check_table(table, causal)
    T = q.shape[1]
    rows = relative_rows(relative_distances(T, S), table.shape[0], causal=causal)
    e = jnp.asarray(table)[rows]                                                   # [T, S, H|1, Dk]
    e = jnp.broadcast_to(e, (T, S, q.shape[2], q.shape[3]))
    return jnp.einsum("bthd,tshd->bhts", q, e, precision=lax.Precision.HIGHEST)


def relative_logits_skewed(q: Float[ArrayLike, "B T H Dk"], table: Float[ArrayLike, "N Hr Dk"], *, S: int,
                           causal: bool = False) -> Float[Array, "B H T S"]:
    """``q_i · E[row(j - p_i)]`` by Huang et al.'s skew: ``q Eᵀ`` ``[B, H, T, N]``, its columns
    spread over the ``T + S - 1`` distances from ``-(S - 1)`` to ``T - 1``, then :func:`skew`."""
    table = _check_table(table, causal)
    T, H = q.shape[1], q.shape[2]
    e = jnp.broadcast_to(jnp.asarray(table), (table.shape[0], H, table.shape[2]))
    qe = jnp.einsum("bthd,nhd->bhtn", q, e, precision=lax.Precision.HIGHEST)      # [B, H, T, N]
    cols = relative_rows(jnp.arange(T + S - 1, dtype=jnp.int32) - (S - 1), table.shape[0], causal=causal)
    return skew(jnp.take(qe, cols, axis=-1), S)


@jax.tree_util.register_pytree_node_class
class RelativeEmbedding(QueryDependentBias):
    """Relative embeddings ``E`` as a bias for :func:`attn_jax.attention`, evaluated per tile.

    ``bias_ij = scale * q_i · E[row(j - p_i)]`` (the attention's ``scale``), so
    ``aj.attention(q, k, v, bias=RelativeEmbedding(E))`` has logits
    ``scale * (q_i · k_j + q_i · E[row])``.  A tile of queries ``q0 .. q0 + bq - 1`` and keys
    ``k0 .. k0 + bk - 1`` meets the ``bq + bk - 1`` distances from ``k0 - p_{q0} - (bq - 1)`` up; it
    forms ``q_tile · E[rows]ᵀ`` over that window (or ``(q_tile Eᵀ)[:, rows]`` when ``N`` is the
    smaller) and skews it to ``[bq, bk]`` (:func:`skew`).  Pytree: ``table`` is the leaf.

    Args:
      table: ``[N, H|1, Dk]``: ``N = 2R + 1`` (``causal=False``) or ``R + 1`` (``causal=True``).
      causal: the row convention (module docstring); does not mask by itself.
      scalar: optional ``[N, H|1]`` per-distance logits added as they are (not scaled): the
        ``b[r]`` term of Transformer-XL-style scores (RCMHA); skewed with the ``q · E`` window.
    """

    def __init__(self, table: Float[ArrayLike, "N Hr Dk"], *, causal: bool = False,
                 scalar: Float[ArrayLike, "N Hs"] | None = None):
        table = _check_table(table, causal)
        if scalar is not None:
            if not hasattr(scalar, "shape"):
                scalar = np.asarray(scalar, dtype=np.float32)
            if scalar.ndim != 2 or scalar.shape[0] != table.shape[0] or scalar.shape[1] not in (1, table.shape[1]):
                raise ValueError(f"scalar: expected shape [N={table.shape[0]}, {table.shape[1]} or 1], got "
                                 f"{tuple(scalar.shape)}")
            scalar = jnp.asarray(scalar)
        self.table = jnp.asarray(table)
        self.scalar = scalar
        self.causal = causal
        self.num_heads = None if table.shape[1] == 1 else int(table.shape[1])

    @property
    def max_distance(self) -> int:
        """``R``: distances beyond it share the edge rows."""
        n = int(self.table.shape[0])
        return n - 1 if self.causal else (n - 1) // 2

    def _table5(self, K: int, G: int, dtype):
        n, h, d = self.table.shape
        t = self.table.astype(dtype)
        return t.reshape(n, 1, 1, d) if h == 1 else t.reshape(n, K, G, d)

    def _check_q(self, q):
        if q.ndim != 5 or q.shape[-1] != self.table.shape[2]:
            raise ValueError(f"q: expected [B, K, G, tq, Dk={self.table.shape[2]}], got {tuple(q.shape)}")
        if self.table.shape[1] not in (1, q.shape[1] * q.shape[2]):
            raise ValueError(f"bias: RelativeEmbedding table has {self.table.shape[1]} heads, q has "
                             f"{q.shape[1] * q.shape[2]}")

    def tile_q(self, q: Float[Array, "B K G tq Dk"], q_idx: Int[Array, " tq"], k_idx: Int[Array, " tk"], T: int,
               S: int) -> Float[Array, "B K G tq tk"]:
        """The bias of one tile from the scaled queries ``q`` (contiguous ascending index runs)."""
        self._check_q(q)
        tq, tk = q_idx.shape[0], k_idx.shape[0]
        n = int(self.table.shape[0])
        L = tq + tk - 1
        r0 = k_idx[0] - query_positions(q_idx[0], T, S) - (tq - 1)         # smallest distance of the tile
        rows = relative_rows(r0 + jnp.arange(L, dtype=jnp.int32), n, causal=self.causal)
        e = self._table5(q.shape[1], q.shape[2], q.dtype)                          # [N, K|1, G|1, Dk]
        prec = lax.Precision.HIGHEST if q.dtype in (jnp.float32, jnp.float64) else None
        if n <= L:      # q Eᵀ then spread its N columns over the window
            qe = jnp.einsum("bkgqd,nkgd->bkgqn", q, e, precision=prec)
            x = jnp.take(qe, rows, axis=-1)
        else:           # only the window's rows of E
            x = jnp.einsum("bkgqd,lkgd->bkgql", q, jnp.take(e, rows, axis=0), precision=prec)
        if self.scalar is not None:
            x = x + self._scalar5(q.shape[1], q.shape[2], q.dtype)[..., rows]
        return skew(x, tk)

    def _scalar5(self, K: int, G: int, dtype):
        """``scalar`` as ``[1, K|1, G|1, 1, N]``."""
        n, h = self.scalar.shape
        s = self.scalar.astype(dtype).T
        return s.reshape(1, 1, 1, 1, n) if h == 1 else s.reshape(1, K, G, 1, n)

    def materialize_q(self, q: Float[Array, "B K G T Dk"], T: int, S: int) -> Float[Array, "B K G T S"]:
        """The whole bias by the gathered form (independent of the skew; references and tests)."""
        self._check_q(q)
        B, K, G = q.shape[:3]
        q4 = q.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, q.shape[-1])
        out = relative_logits_gathered(q4, self.table.astype(q.dtype), S=S, causal=self.causal)
        if self.scalar is not None:
            rows = relative_rows(relative_distances(T, S), self.table.shape[0], causal=self.causal)
            out = out + jnp.moveaxis(self.scalar.astype(q.dtype)[rows], -1, 0)          # [H|1, T, S]
        return out.reshape(B, K, G, T, S)

    def parameters(self):
        return (self.table,) if self.scalar is None else (self.table, self.scalar)

    def tree_flatten(self):
        return (self.table, self.scalar), (self.causal,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.table, obj.scalar = children
        obj.causal, = aux
        shape = getattr(obj.table, "shape", None)
        obj.num_heads = None if shape is None or len(shape) != 3 or shape[1] == 1 else int(shape[1])
        return obj

    def __repr__(self):
        return f"RelativeEmbedding(table={tuple(self.table.shape)}, causal={self.causal})"


def relative_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                       v: Float[ArrayLike, "B S K Dv"], table: Float[ArrayLike, "N Hr Dk"], *, causal: bool = False,
                       mask=None, scale: float | None = None, impl="auto") -> Float[Array, "B T H Dv"]:
    """Softmax attention with relative embeddings (module docstring), through :func:`attn_jax.attention`.

    ``causal=True`` uses the Music Transformer rows *and* ``masks.causal()`` (``&`` any ``mask``).
    """
    from attn_jax.softmax.api import attention   # the softmax family is a sibling; imported lazily
    m = M.as_mask(mask)
    if causal:
        m = M.causal() if m is None else M.causal() & m
    return attention(q, k, v, bias=RelativeEmbedding(table, causal=causal), mask=m, scale=scale, impl=impl)


def relative_attention_reference(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S H Dk"],
                                 v: Float[ArrayLike, "B S H Dv"], table: Float[ArrayLike, "N Hr Dk"], *,
                                 causal: bool = False, scale: float | None = None,
                                 form: str = "gathered") -> Float[Array, "B T H Dv"]:
    """Plain softmax over ``scale (q k + q E)`` with the ``form`` (``"gathered"`` or ``"skewed"``)
    relative logits; ``causal`` also hides keys after each query.  ``K = H`` (no grouping); every
    row must see a key.  The simplest code, for tests."""
    if form not in ("gathered", "skewed"):
        raise ValueError(f"form: expected 'gathered' or 'skewed', got {form!r}")
    T, S, Dk = q.shape[1], k.shape[1], q.shape[3]
    scale = Dk ** -0.5 if scale is None else scale
    rel = (relative_logits_gathered if form == "gathered" else relative_logits_skewed)(q, table, S=S, causal=causal)
    s = scale * (jnp.einsum("bthd,bshd->bhts", q, k, precision=lax.Precision.HIGHEST) + rel)
    if causal:
        s = jnp.where(relative_distances(T, S) <= 0, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, v, precision=lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------- declaration
from attn_jax.core.declaration import Declaration, Paper, declare  # noqa: E402

DECLARATION = declare(Declaration(
    name="relative", family="positional", title="Relative embeddings (Shaw; Music Transformer skew, per tile)",
    papers=(Paper("Self-Attention with Relative Position Representations", 2018, "1803.02155", "Shaw et al."),
            Paper("Music Transformer", 2018, "1809.04281", "Huang et al.")),
    summary="logits_ij = scale (q_i.k_j + q_i.E[row(j - i)]); row = clip(j - i, ±R) + R, causal: clip(i - j, 0, R)",
    op=relative_attention, forms=("xla", "dense"), directions=("causal", "bidirectional"),
    layer="attn_jax.nn.relative_mixers:RelativeAttention",
    notes="a QueryDependentBias: q.E skewed per (bq, bk) tile in the xla/dense paths (no T x S array), dq and dE "
          "in the custom VJPs; Pallas and cuDNN refuse it; Shaw's value embeddings a^V are not implemented"))
