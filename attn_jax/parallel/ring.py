"""Context parallelism for exact attention: ring attention (with the zig-zag causal layout) and
Ulysses all-to-all head parallelism, on a ``jax.sharding`` mesh through ``jax.shard_map``.

* Ring attention -- "Ring Attention with Blockwise Transformers for Near-Infinite Context",
  Liu, Zaharia & Abbeel, 2023, arXiv:2310.01889.  ``q``, ``k``, ``v`` are split along the sequence
  over the ``n`` devices of ``axis_name``.  Device ``r`` keeps its query block ``Q_r`` and, over
  ``n`` steps, sees every key/value block ``(K_j, V_j)``: the blocks travel around the ring with
  ``lax.ppermute`` (device ``r`` sends to ``r + 1``), so at step ``s`` it holds block
  ``j = (r - s) mod n``.  Each step computes the partial attention ``(O_rj, lse_rj)`` with
  :func:`attn_jax.attention` (``return_lse=True``) and merges it exactly into the running result:

      lse = log(exp(lse_a) + exp(lse_b)),   O = exp(lse_a - lse) O_a + exp(lse_b - lse) O_b

  (:func:`attn_jax.merge_attention`).  Causal: a pair with ``j > r`` is fully masked and is
  skipped (``lax.cond``: no FLOPs), ``j < r`` is fully visible (no mask), ``j = r`` is the local
  causal block.
* Zig-zag layout (load balance for causal attention; as in Megatron-LM's context parallelism and
  "Striped Attention", Brandon et al., 2023, arXiv:2311.09431 for the same idea): the sequence is
  cut into ``2n`` chunks and device ``i`` holds chunks ``i`` and ``2n - 1 - i``
  (:func:`zigzag_permute` puts a sequence in that order, :func:`zigzag_unpermute` undoes it).  At
  every off-diagonal step each device then does exactly half a block of work: for ``j < r`` all its
  queries against the first kv chunk, for ``j > r`` its second query chunk against both kv chunks.
* Ulysses -- "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long
  Sequence Transformer Models", Jacobs et al., 2023, arXiv:2309.14509: one ``lax.all_to_all``
  turns sequence-sharded ``[B, T/n, H, D]`` into head-sharded ``[B, T, H/n, D]``, each device runs
  full attention over its heads, and a second all-to-all restores the sequence sharding.

Segment ids (packed documents; id 0 = padding) are supported by both: ring attention rotates the
kv segment ids with ``k``/``v``; Ulysses all-gathers them.

``jax.shard_map`` runs with ``check_vma=False``: ``impl="auto"`` traces every platform's branch,
and the Pallas branch's output shapes carry no varying-manual-axes annotation.

Gradients: JAX autodiff of the ``shard_map``'d function (the transpose of ``ppermute`` is the
reverse ``ppermute``, of ``all_to_all`` the reverse all-to-all).  No custom VJP: the backward pass
keeps each step's key/value block as a residual, so a device holds all ``n`` kv blocks (``S`` keys)
in the backward of ring attention -- the compute is distributed, the kv activation memory of the
backward is not.  A custom VJP that re-rotates kv blocks in the backward (as the paper does) would
bring that to ``O(S / n)``; it is not implemented.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, Float, Int

from attn_jax.parallel.mesh import check_mesh_inputs
from attn_jax.core import masks
from attn_jax.softmax import attention, merge_attention

__all__ = ["ring_attention", "ulysses_attention", "zigzag_permute", "zigzag_unpermute", "zigzag_order"]

LAYOUTS = ("contiguous", "zigzag")
#: ``o`` or ``(o, lse)``: ``o`` in the dtype of ``q``, ``lse`` float32.
AttentionOutput = Float[Array, "B T H Dv"] | tuple[Float[Array, "B T H Dv"], Float[Array, "B T H"]]


# ----------------------------------------------------------------------------- zig-zag layout


def zigzag_order(num_devices: int) -> list[int]:
    """Chunk order of the zig-zag layout: ``[0, 2n-1, 1, 2n-2, ...]`` (device ``i`` holds chunks
    ``i`` and ``2n - 1 - i``)."""
    _check_positive("num_devices", num_devices)
    n = num_devices
    return [c for i in range(n) for c in (i, 2 * n - 1 - i)]


def _permute_chunks(x, order, axis, name):
    x = jnp.asarray(x)
    axis = axis % x.ndim
    L, m = x.shape[axis], len(order)
    if L % m:
        raise ValueError(f"{name}: expected the length of axis {axis} divisible by 2 * num_devices = {m}, got {L}")
    chunks = x.reshape(*x.shape[:axis], m, L // m, *x.shape[axis + 1:])
    return jnp.take(chunks, jnp.asarray(order), axis=axis).reshape(x.shape)


def zigzag_permute(x: Array, num_devices: int, *, axis: int = 1) -> Array:
    """Reorder the sequence ``axis`` of ``x`` into the zig-zag layout for ``num_devices`` devices:
    after it, a contiguous split over the devices gives device ``i`` chunks ``i`` and ``2n-1-i``."""
    return _permute_chunks(x, zigzag_order(num_devices), axis, "x")


def zigzag_unpermute(x: Array, num_devices: int, *, axis: int = 1) -> Array:
    """The inverse of :func:`zigzag_permute`."""
    order = zigzag_order(num_devices)
    inverse = [order.index(c) for c in range(len(order))]
    return _permute_chunks(x, inverse, axis, "x")


# ----------------------------------------------------------------------------- validation


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _batch_axes(mesh: Mesh, batch_axes) -> tuple[str, ...] | None:
    axes = tuple(a for a in batch_axes if a in mesh.axis_names and mesh.shape[a] > 1)
    return axes or None


def _validate(q, k, v, segment_ids, mesh, axis_name, batch_axes, chunks_per_device, op):
    check_mesh_inputs(mesh, axis_name, q, k, v)
    B, T = q.shape[:2]
    for name, x in (("k", k), ("v", v)):
        if x.shape[:2] != (B, T):
            raise ValueError(f"{name}: expected [B, T] = {(B, T)} leading (self-attention over one sharded "
                             f"sequence, S == T), got shape {x.shape}")
    n = mesh.shape[axis_name]
    if T % (n * chunks_per_device):
        what = (f"2 * {axis_name!r} axis size = {2 * n}" if chunks_per_device == 2
                else f"the {axis_name!r} axis size {n}")
        raise ValueError(f"q: expected the sequence length T divisible by {what} ({op}), got T={T}")
    bax = _batch_axes(mesh, batch_axes)
    nb = 1 if bax is None else math.prod(mesh.shape[a] for a in bax)
    if B % nb:
        raise ValueError(f"q: expected the batch B divisible by the batch mesh axes {bax} (size {nb}), got B={B}")
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids: expected an integer array [B, T], got dtype {segment_ids.dtype}")
        if segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids: expected shape [B, T] = {(B, T)}, got {segment_ids.shape}")
        segment_ids = segment_ids.astype(jnp.int32)
    return n, bax, segment_ids


def _run_sharded(body, mesh, bax, axis_name, q, k, v, seg):
    """``body(q, k, v, seg) -> (o, lse)`` per device, everything split along ``[batch, sequence]``.

    ``check_vma=False``: ``impl="auto"`` traces the Pallas branch, whose output shapes carry no
    varying-manual-axes annotation."""
    x_spec, s_spec, l_spec = P(bax, axis_name, None, None), P(bax, axis_name), P(bax, axis_name, None)
    if seg is None:
        fn = jax.shard_map(lambda q_, k_, v_: body(q_, k_, v_, None), mesh=mesh, in_specs=(x_spec,) * 3,
                           out_specs=(x_spec, l_spec), check_vma=False)
        return fn(q, k, v)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(x_spec,) * 3 + (s_spec,), out_specs=(x_spec, l_spec),
                       check_vma=False)
    return fn(q, k, v, seg)


# ----------------------------------------------------------------------------- ring attention


def _partial(q, k, v, q_seg, kv_seg, *, causal, scale, impl):
    """``(o float32, lse)`` of ``q`` against one kv block; ``causal``: the local diagonal block."""
    mask = masks.causal(offset=0) if causal else None
    if q_seg is not None:
        seg = masks.segments(q_seg, kv_seg)
        mask = seg if mask is None else mask & seg
    o, lse = attention(q, k, v, mask=mask, scale=scale, return_lse=True, impl=impl)
    return o.astype(jnp.float32), lse


def _nothing(q, v):
    """The partial attention of a fully masked block pair: zero output, ``lse = -inf``."""
    B, T, H = q.shape[:3]
    return jnp.zeros((B, T, H, v.shape[-1]), jnp.float32), jnp.full((B, T, H), -jnp.inf, jnp.float32)


def _ring_body(q, k, v, seg, *, axis_name, n, causal, zigzag, scale, impl):
    """Per-device program: ``q, k, v`` are this device's blocks ``[B, T/n, ., .]``."""
    r = lax.axis_index(axis_name)
    perm = [(i, (i + 1) % n) for i in range(n)]
    part = partial(_partial, scale=scale, impl=impl)
    # Step 0: the device's own kv block -- the causal diagonal (zig-zag included: its two chunks are
    # stored in position order, so plain causal over the local concatenation is exact).
    acc = part(q, k, v, seg, seg, causal=causal)

    def full(kb, vb, kseg):
        return part(q, kb, vb, seg, kseg, causal=False)

    def below(kb, vb, kseg):     # kv block j < r
        if not zigzag:
            return full(kb, vb, kseg)
        c = kb.shape[1] // 2      # the second kv chunk (2n-1-j) lies after both query chunks
        return part(q, kb[:, :c], vb[:, :c], seg, None if kseg is None else kseg[:, :c], causal=False)

    def above(kb, vb, kseg):     # kv block j > r
        if not zigzag:
            return _nothing(q, vb)
        c = q.shape[1] // 2       # only the second query chunk (2n-1-r) sees anything, and sees both kv chunks
        o2, lse2 = part(q[:, c:], kb, vb, None if seg is None else seg[:, c:], kseg, causal=False)
        o1, lse1 = _nothing(q[:, :c], vb)
        return jnp.concatenate([o1, o2], axis=1), jnp.concatenate([lse1, lse2], axis=1)

    def step(carry, s):
        kb, vb, kseg, acc = carry
        kb, vb = lax.ppermute(kb, axis_name, perm), lax.ppermute(vb, axis_name, perm)
        if kseg is not None:
            kseg = lax.ppermute(kseg, axis_name, perm)
        if causal:      # the block held now came from device j = (r - s) mod n: j < r iff s <= r
            o_s = lax.cond(s <= r, below, above, kb, vb, kseg)
        else:
            o_s = full(kb, vb, kseg)
        return (kb, vb, kseg, merge_attention([acc, o_s], return_lse=True)), None

    (_, _, _, (o, lse)), _ = lax.scan(step, (k, v, seg, acc), jnp.arange(1, n))
    return o.astype(q.dtype), lse


def ring_attention(q: Float[Array, "B T H Dk"], k: Float[Array, "B T K Dk"], v: Float[Array, "B T K Dv"], *,
                   mesh: Mesh, axis_name: str = "sequence", causal: bool = False,
                   segment_ids: Int[Array, "B T"] | None = None, layout: str = "contiguous",
                   scale: float | None = None, return_lse: bool = False, batch_axes=("data", "fsdp"),
                   impl="auto") -> AttentionOutput:
    """Exact self-attention with the sequence sharded over ``mesh``'s ``axis_name`` (ring attention).

    Equals ``aj.attention(q, k, v, mask=...)`` on one device (``causal`` -> ``masks.causal()``,
    ``segment_ids`` -> ``masks.segments(segment_ids)``, combined with ``&``).

    Args:
      q, k, v: ``[B, T, H, Dk]``, ``[B, T, K, Dk]``, ``[B, T, K, Dv]`` (global arrays; under ``jit``
        they are resharded to the sequence split as needed).  ``H % K == 0`` (GQA).
      mesh: a :class:`jax.sharding.Mesh` (:func:`attn_jax.parallel.make_mesh`).
      axis_name: the mesh axis the sequence is split over; ``T`` must be divisible by its size ``n``
        (``2n`` for the zig-zag layout).
      causal: causal attention; fully masked block pairs are skipped.
      segment_ids: ``int [B, T]`` packed-document ids (0 = padding), rotated with ``k``/``v``.
      layout: ``"contiguous"`` (device ``i`` holds tokens ``[iT/n, (i+1)T/n)``) or ``"zigzag"``: the
        inputs (and ``segment_ids``) are in :func:`zigzag_permute` order, and so is the output
        (undo it with :func:`zigzag_unpermute`); balances the causal work across devices.
      scale, impl: as :func:`attn_jax.attention` (``impl`` is used for every block pair).
      return_lse: also return the float32 log-sum-exp ``[B, T, H]``.
      batch_axes: mesh axes (those present with size > 1) the batch is split over.

    Returns:
      ``o [B, T, H, Dv]`` in ``q``'s dtype, in the layout of the inputs (and ``lse [B, T, H]``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    zigzag = layout == "zigzag"
    n, bax, seg = _validate(q, k, v, segment_ids, mesh, axis_name, batch_axes, 2 if zigzag else 1, "ring_attention")
    body = partial(_ring_body, axis_name=axis_name, n=n, causal=bool(causal), zigzag=zigzag, scale=scale, impl=impl)
    o, lse = _run_sharded(body, mesh, bax, axis_name, q, k, v, seg)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- Ulysses


def _ulysses_body(q, k, v, seg, *, axis_name, n, causal, scale, impl):
    H, K = q.shape[2], k.shape[2]
    if K % n:   # fewer kv heads than devices: give every query head its own copy of its kv head
        k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
    to_heads = partial(lax.all_to_all, axis_name=axis_name, split_axis=2, concat_axis=1, tiled=True)
    qh, kh, vh = to_heads(q), to_heads(k), to_heads(v)         # [B, T, H/n, D]
    mask = masks.causal() if causal else None
    if seg is not None:
        full_seg = lax.all_gather(seg, axis_name, axis=1, tiled=True)
        mask = masks.segments(full_seg) if mask is None else mask & masks.segments(full_seg)
    o, lse = attention(qh, kh, vh, mask=mask, scale=scale, return_lse=True, impl=impl)
    o = lax.all_to_all(o, axis_name, split_axis=1, concat_axis=2, tiled=True)
    lse = lax.all_to_all(lse, axis_name, split_axis=1, concat_axis=2, tiled=True)
    return o, lse


def ulysses_attention(q: Float[Array, "B T H Dk"], k: Float[Array, "B T K Dk"], v: Float[Array, "B T K Dv"], *,
                      mesh: Mesh, axis_name: str = "sequence", causal: bool = False,
                      segment_ids: Int[Array, "B T"] | None = None, scale: float | None = None,
                      return_lse: bool = False, batch_axes=("data", "fsdp"),
                      impl="auto") -> AttentionOutput:
    """Exact self-attention, sequence-sharded in and out, computed head-sharded (DeepSpeed Ulysses).

    Same arguments and result as :func:`ring_attention` (contiguous layout).  ``H`` must be divisible
    by the size ``n`` of ``axis_name``; when the kv heads ``K`` are not, each device gets a copy of
    the kv heads its query heads use (``n / K`` times the kv all-to-all volume).
    """
    n, bax, seg = _validate(q, k, v, segment_ids, mesh, axis_name, batch_axes, 1, "ulysses_attention")
    H, K = q.shape[2], k.shape[2]
    if H % n:
        raise ValueError(f"q: expected the number of heads H divisible by the {axis_name!r} axis size {n} "
                         f"(Ulysses splits heads over it), got H={H}")
    if K == 0 or H % K:
        raise ValueError(f"k: expected kv heads K dividing H={H}, got K={K}")
    body = partial(_ulysses_body, axis_name=axis_name, n=n, causal=bool(causal), scale=scale, impl=impl)
    o, lse = _run_sharded(body, mesh, bax, axis_name, q, k, v, seg)
    return (o, lse) if return_lse else o
