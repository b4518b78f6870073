"""Block sizes of the flash-attention kernels: one table, overridable per call.

Keyed by ``(platform, head_dim bucket, dtype class)``.  No accelerator is available to this
project, so the defaults are not tuned here: they follow the published defaults of the
kernels we imitate (JAX's Pallas TPU flash/splash kernels use 128-multiples up to 512 on the
lane dimension; Triton FlashAttention-2 uses 128x64 tiles with 4 warps for head_dim <= 64 and
smaller tiles / 8 warps for large heads, num_stages 2-3).  Blocks shrink to fit short sequences.

Platform rules enforced when a block is *derived* (explicit overrides are taken as given, so
interpret-mode tests can use tiny tiles):

* ``tpu``: ``block_q`` is a multiple of 8 (sublanes), ``block_k`` a multiple of 128 (lanes of
  the ``[bq, bk]`` logits, bias and segment-id tiles), unless one block covers the whole
  (padded) sequence, which Mosaic always accepts.
* ``gpu``: Triton tiles are powers of two and at least 16 (``tl.dot``).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from pallas_kernels.common import next_pow2, round_up

__all__ = ["BlockSizes", "TABLE", "get_block_sizes"]


@dataclass(frozen=True)
class BlockSizes:
    block_q: int
    block_k: int
    num_warps: int | None = None   # gpu only
    num_stages: int | None = None  # gpu only


# (platform, head_dim upper bound, "16bit" | "32bit") -> BlockSizes; first bound >= head_dim wins.
TABLE: dict[tuple[str, int, str], BlockSizes] = {
    ("tpu", 128, "16bit"): BlockSizes(512, 512),
    ("tpu", 128, "32bit"): BlockSizes(256, 512),
    ("tpu", 256, "16bit"): BlockSizes(256, 512),
    ("tpu", 256, "32bit"): BlockSizes(256, 256),
    ("tpu", 1 << 30, "16bit"): BlockSizes(128, 256),
    ("tpu", 1 << 30, "32bit"): BlockSizes(128, 128),
    ("gpu", 64, "16bit"): BlockSizes(128, 64, num_warps=4, num_stages=3),
    ("gpu", 64, "32bit"): BlockSizes(64, 64, num_warps=4, num_stages=2),
    ("gpu", 128, "16bit"): BlockSizes(128, 64, num_warps=8, num_stages=2),
    ("gpu", 128, "32bit"): BlockSizes(64, 32, num_warps=4, num_stages=2),
    ("gpu", 256, "16bit"): BlockSizes(64, 32, num_warps=8, num_stages=2),
    ("gpu", 256, "32bit"): BlockSizes(32, 32, num_warps=8, num_stages=1),
    ("gpu", 1 << 30, "16bit"): BlockSizes(32, 16, num_warps=8, num_stages=1),
    ("gpu", 1 << 30, "32bit"): BlockSizes(16, 16, num_warps=8, num_stages=1),
}


def lookup(platform: str, head_dim: int, dtype) -> BlockSizes:
    cls = "16bit" if jnp.dtype(dtype).itemsize <= 2 else "32bit"
    for (p, bound, c), bs in sorted(TABLE.items(), key=lambda kv: kv[0][1]):
        if p == platform and c == cls and head_dim <= bound:
            return bs
    raise KeyError((platform, head_dim, cls))


def get_block_sizes(platform: str, head_dim: int, dtype, T: int, S: int, *, block_q: int | None = None,
                    block_k: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None) -> BlockSizes:
    """Block sizes for one call: the table entry, shrunk to the sequence, then overrides."""
    if platform not in ("tpu", "gpu"):
        raise ValueError(f"platform: expected 'tpu' or 'gpu', got {platform!r}")
    d = lookup(platform, head_dim, dtype)
    bq, bk = d.block_q, d.block_k
    if platform == "tpu":
        if T <= bq:
            bq = round_up(T, 8)
        if S <= bk:
            bk = round_up(S, 8)
    else:
        bq = min(bq, max(16, next_pow2(T)))
        bk = min(bk, max(16, next_pow2(S)))
    for name, v in (("block_q", block_q), ("block_k", block_k)):
        if v is not None and (not isinstance(v, int) or v <= 0):
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return BlockSizes(block_q or bq, block_k or bk,
                      num_warps if num_warps is not None else d.num_warps,
                      num_stages if num_stages is not None else d.num_stages)
