"""``impl="pallas"``: fused flash attention (Pallas; Triton on CUDA GPUs, Mosaic on TPUs).

Paper: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
2023, arXiv:2307.08691.  The kernels and their recurrences live in
:mod:`pallas_kernels.flash_attention` (which never imports attn_jax); this module is the
adapter that turns an :class:`~attn_jax.softmax.problem.AttentionProblem` into kernel metadata:

* masks -> a static predicate plus segment-id arrays.  A conjunction (``&``) of
  ``causal``, ``sliding_window``, ``chunked``, ``prefix_lm`` (integer or default offsets),
  at most one ``segments`` and any ``key_padding`` masks is supported.  Key padding is folded
  into the key segment ids (``kv_ids = 0`` past the length).  ``|`` compositions, dense masks and
  per-row (array) offsets are refused with a reason.
* ``mask.classify`` -> per-query-block lists of non-empty key blocks (NumPy at trace time for
  static masks, traced arrays for data-dependent ones), so empty tiles are skipped.
* ``attn_jax.positional.ALiBi`` -> slopes evaluated inside the kernel (never a dense bias);
  other structured biases are refused.  Dense ``[B|1, H|1, T, S]`` biases get ``dbias``.
* padding positions (segment id 0, keys past a key-padding length) are zeroed in q/k/v before
  the kernel, so NaN there cannot leak (the reference's NaN-safety rule).

Dispatch happens by lowering platform: ``attention_pallas`` is a ``lax.platform_dependent``
switch whose ``cuda`` branch is the Triton kernel and ``tpu`` branch the Mosaic kernel.
:func:`flash_attention` runs the same adapter with an explicit kernel platform, optionally in
interpret mode on CPU (how the tests exercise the kernels).

Dropout uses the counter-hash keep mask of :mod:`attn_jax.core.random`, recomputed inside the
kernels (bit-identical keep decisions; the hash is re-implemented in ``pallas_kernels``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxtyping import Array

from attn_jax.core import masks as M
from attn_jax.core.array_types import ArrayLike, Float
from attn_jax.core import random as aj_random
from attn_jax.core.bias import StructuredBias
from attn_jax.softmax.problem import attention_problem

__all__ = ["attention_pallas", "unsupported", "flash_attention"]

_KERNEL_PLATFORM = {"cuda": "gpu", "tpu": "tpu"}


# ----------------------------------------------------------------------------- mask translation


def _translate_mask(mask, T: int, S: int):
    """``(terms, segment masks, key-padding masks, reasons)`` for a mask."""
    terms, segs, pads, reasons = [], [], [], []
    for m in (() if mask is None else mask.conjuncts()):
        if isinstance(m, M.PositionalMask) and not M.is_concrete_int(m.query_offset(T, S)):
            reasons.append(f"mask {m!r}: per-row (array) offsets are not supported by the kernels")
            continue
        match m:
            case M.Causal():
                terms.append(("causal", int(m.query_offset(T, S))))
            case M.SlidingWindow(left=left, right=right):
                terms.append(("window", int(m.query_offset(T, S)), int(left), int(right)))
            case M.Chunked(size=size):
                terms.append(("chunked", int(m.query_offset(T, S)), int(size)))
            case M.PrefixLM(prefix_len=n):
                terms.append(("prefix", int(m.query_offset(T, S)), int(n)))
            case M.Segments():
                segs.append(m)
            case M.KeyPadding():
                pads.append(m)
            case M.DenseMask():
                reasons.append("dense boolean masks are not supported by the Pallas kernels (they would be read as "
                               "T x S per tile); use structured masks")
            case M.Combination():
                reasons.append(f"mask {m!r}: '|' compositions have no tile predicate in the kernels "
                               "(only '&' of causal/sliding_window/chunked/prefix_lm/segments/key_padding)")
            case _:
                reasons.append(f"mask {m!r}: mask type {type(m).__name__} has no kernel predicate")
    if len(segs) > 1:
        reasons.append("more than one segments() mask in one conjunction is not supported by the kernels")
    return tuple(terms), segs, pads, reasons


def _is_alibi(bias) -> bool:
    from attn_jax.positional.alibi import ALiBi
    return isinstance(bias, ALiBi)


def unsupported(platform: str, p) -> list[str]:
    r = []
    if platform not in _KERNEL_PLATFORM:
        r.append(f"Pallas kernels need a GPU or TPU (lowering platform '{platform}'); use interpret mode for "
                 "testing (attn_jax.softmax.pallas.flash_attention(..., interpret=True))")
    if jnp.dtype(p.dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
        r.append(f"the Pallas kernels take float32/bfloat16/float16, got {jnp.dtype(p.dtype).name}")
    if p.bias_kind == "structured" and not _is_alibi(p.bias):
        r.append(f"structured bias {type(p.bias).__name__} has no in-kernel form (only ALiBi is evaluated in the "
                 "kernel; materialising it would cost T x S)")
    if p.bias_kind == "query":
        r.append(f"query-dependent bias {type(p.bias).__name__} (q · E per tile) has no in-kernel form; the xla "
                 "path evaluates it per tile")
    d = p.dims
    if platform == "cuda" and max(d.Dk, d.Dv) > 256:
        r.append(f"head_dim > 256 exceeds the Triton kernel's register budget (Dk={d.Dk}, Dv={d.Dv})")
    r += _translate_mask(p.mask, d.T, d.S)[3]
    return r


# ----------------------------------------------------------------------------- the adapter


def _run(p, q, k, v, bias, sinks, seed, *, platform: str, interpret=False, block_q=None, block_k=None,
         num_warps=None, num_stages=None):
    """Kernel call for ``platform`` ("gpu" | "tpu"); returns ``o`` or ``(o, lse)`` as the problem asks."""
    from pallas_kernels import flash_attention as fa

    d = p.dims
    B, T, S = d.B, d.T, d.S
    terms, segs, pads, reasons = _translate_mask(p.mask, T, S)
    if reasons:
        raise ValueError("impl='pallas' cannot serve this mask: " + "; ".join(reasons))

    q_ids = kv_ids = None
    if segs:
        q_ids = jnp.broadcast_to(segs[0].q_ids.astype(jnp.int32), (B, T))
        kv_ids = jnp.broadcast_to(segs[0].kv().astype(jnp.int32), (B, S))
    if pads:
        if q_ids is None:
            q_ids = jnp.ones((B, T), jnp.int32)
            kv_ids = jnp.ones((B, S), jnp.int32)
        j = jnp.arange(S, dtype=jnp.int32)[None, :]
        for m in pads:
            kv_ids = jnp.where(j < jnp.broadcast_to(m.lengths, (B,))[:, None], kv_ids, 0)
    if q_ids is not None:  # NaN-safety: positions no pair uses never reach a product
        q = jnp.where((q_ids != 0)[:, :, None, None], q, 0)
        kv_used = (kv_ids != 0)[:, :, None, None]
        k = jnp.where(kv_used, k, 0)
        v = jnp.where(kv_used, v, 0)

    mask = p.mask
    if mask is None:
        tile_nonempty, static = None, True
    else:
        static = mask.is_static

        def tile_nonempty(bq, bk):
            cls = mask.classify(T, S, bq, bk)
            return (cls != M.EMPTY).any(axis=1)

    slopes = dense = None
    if isinstance(bias, StructuredBias):
        slopes = bias.slopes
    elif bias is not None:  # the kernels read [B|1, H|1, T, S]; a bias broadcast over T or S is expanded
        dense = jnp.broadcast_to(bias, (*bias.shape[:2], T, S))
    o, lse = fa.flash_attention(
        q, k, v, bias=dense, alibi_slopes=slopes, sinks=sinks, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
        mask_terms=terms, tile_nonempty=tile_nonempty, tile_nonempty_static=static, scale=p.scale,
        softcap=p.softcap, dropout_rate=p.dropout_rate, dropout_seed=seed, platform=platform, interpret=interpret,
        block_q=block_q, block_k=block_k,
        num_warps=num_warps, num_stages=num_stages)
    return (o, lse) if p.return_lse else o


def attention_pallas(p, q, k, v, bias, sinks, dropout_rng):
    """Registered implementation: Triton kernel when lowered for cuda, Mosaic kernel for tpu."""
    seed = aj_random.dropout_seed(dropout_rng) if p.dropout_rate > 0 else None

    def branch(platform):
        return lambda q, k, v, bias, sinks, seed: _run(p, q, k, v, bias, sinks, seed, platform=platform)

    return lax.platform_dependent(q, k, v, bias, sinks, seed, cuda=branch("gpu"), tpu=branch("tpu"))


def flash_attention(q: Float[ArrayLike, "B T H Dk"], k: Float[ArrayLike, "B S K Dk"],
                    v: Float[ArrayLike, "B S K Dv"], *, mask=None, bias=None, scale: float | None = None,
                    softcap: float | None = None, sinks: Float[ArrayLike, " H"] | None = None,
                    dropout_rate: float = 0.0, dropout_rng=None, return_lse: bool = False, platform: str = "tpu",
                    interpret=False, block_q: int | None = None, block_k: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None
                    ) -> Float[Array, "B T H Dv"] | tuple[Float[Array, "B T H Dv"], Float[Array, "B T H"]]:
    """``aj.attention(..., impl="pallas")`` with an explicit kernel ``platform`` ("tpu" | "gpu").

    ``interpret=True`` runs the kernel on CPU (TPU kernels with race detection and NaN-filled
    uninitialised memory, see :func:`pallas_kernels.testing.interpret_params`); a
    ``pltpu.InterpretParams`` may be passed instead.  Block sizes override the table in
    :mod:`pallas_kernels.flash_attention.block_sizes`.
    """
    from pallas_kernels.testing import interpret_params

    if platform not in ("tpu", "gpu"):
        raise ValueError(f"platform: expected 'tpu' or 'gpu', got {platform!r}")
    p = attention_problem(q, k, v, mask, bias, scale, softcap, sinks, dropout_rate, dropout_rng, return_lse)
    reasons = [r for r in unsupported({"gpu": "cuda", "tpu": "tpu"}[platform], p)]
    if reasons:
        raise ValueError("impl='pallas' cannot serve this call: " + "; ".join(reasons))
    if interpret is True:
        interpret = interpret_params(platform)
    bias_arr = bias if (bias is None or isinstance(bias, StructuredBias)) else jnp.asarray(bias)
    seed = aj_random.dropout_seed(dropout_rng) if p.dropout_rate > 0 else None
    return _run(p, q, k, v, bias_arr, sinks, seed, platform=platform, interpret=interpret, block_q=block_q,
                block_k=block_k, num_warps=num_warps, num_stages=num_stages)
