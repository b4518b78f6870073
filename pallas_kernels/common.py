"""Small helpers shared by the kernel packages (they import nothing from attn_jax)."""

from __future__ import annotations

import importlib

__all__ = ["next_pow2", "round_up", "backend_module"]


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def round_up(n: int, m: int) -> int:
    """``n`` rounded up to a multiple of ``m``."""
    return -(-int(n) // int(m)) * int(m)


def backend_module(package: str, platform: str):
    """The ``gpu`` (Triton) or ``tpu`` (Mosaic) module of the kernel package ``package``."""
    if platform not in ("gpu", "tpu"):
        raise ValueError(f"platform: expected 'tpu' or 'gpu', got {platform!r}")
    return importlib.import_module(f"{package}.{platform}")
