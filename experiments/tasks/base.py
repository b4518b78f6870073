"""The task protocol every experiment task follows, and the task registry.

A task is a seeded, stateless data source.  ``task.batch(split, index, batch_size)`` returns
numpy arrays that depend only on ``(task.seed, split, index, batch_size)`` and the task's
fields, so a resumed run sees exactly the batches an uninterrupted run would have seen.

Three kinds, each with a fixed batch layout:

* ``"lm"`` (token sequences; trained with a causal decoder, loss at weighted positions)::

    {"inputs": int32 [B, T], "targets": int32 [B, T], "weights": float32 [B, T]}

  ``targets[:, t]`` is the token to predict after reading ``inputs[:, :t+1]``;
  ``weights`` is 0 where no loss or accuracy is counted (e.g. MQAR counts query positions only).
* ``"regress"`` (real-valued sequences, e.g. in-context regression)::

    {"inputs": float32 [B, T, input_dim], "targets": float32 [B, T, output_dim], "weights": float32 [B, T]}
* ``"image"`` (classification of images)::

    {"inputs": float32 [B, H, W, C], "targets": int32 [B], "weights": float32 [B]}

Splits are ``"train"`` and ``"valid"`` (disjoint random streams; real corpora use disjoint
slices of the data).
"""

from __future__ import annotations

import difflib
import zlib
from typing import Callable, Protocol, runtime_checkable

import numpy as np

__all__ = ["Task", "register", "make", "names", "rng_for", "SPLITS"]

SPLITS = ("train", "valid")


@runtime_checkable
class Task(Protocol):
    name: str
    kind: str            # "lm" | "regress" | "image"
    seed: int
    seq_len: int         # T of "lm"/"regress" batches (0 for images)

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        ...


def rng_for(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of batch ``index`` of ``split``: independent streams per (seed, split, index)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index: expected a non-negative int, got {index!r}")
    return np.random.default_rng([int(seed), zlib.crc32(split.encode()), int(index)])


_REGISTRY: dict[str, Callable[..., Task]] = {}


def register(name: str, factory: Callable[..., Task]) -> Callable[..., Task]:
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"name: task {name!r} is already registered")
    _REGISTRY[name] = factory
    return factory


def names() -> list[str]:
    return sorted(_REGISTRY)


def make(name: str, **kwargs) -> Task:
    """Build the task registered as ``name``; unknown names raise ``ValueError`` with the
    registered names and the closest match; unknown keyword arguments raise ``TypeError``
    from the task's constructor."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1, cutoff=0.0)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"task: unknown task {name!r}; registered tasks: {', '.join(names())}{hint}")
    return _REGISTRY[name](**kwargs)
