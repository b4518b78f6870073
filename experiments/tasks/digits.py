"""Handwritten digits: scikit-learn's bundled 8x8 digits, as image classification.

Data: ``sklearn.datasets.load_digits`` — 1797 images of 8x8 pixels with values 0..16 (the test
part of the UCI "Optical Recognition of Handwritten Digits" data, Alpaydin & Kaynak 1998),
shipped inside scikit-learn (no download).  Pixels are scaled to ``[0, 1]`` by dividing by 16.

Split: stratified by class, fixed and independent of the task ``seed``: for each class ``c``
its indices are permuted by ``np.random.default_rng(SPLIT_SEED)`` (``SPLIT_SEED = 20240101``,
classes processed in order 0..9 with one generator), and the first ``round(n_c *
valid_fraction)`` of them go to validation; the validation and training index lists are
each sorted.  ``valid_fraction = 0.2`` gives 359 validation / 1438 training images.

Batches (kind ``"image"``: ``inputs`` float32 ``[B, 8, 8, 1]``, ``targets`` int32 ``[B]``,
``weights`` float32 ``[B]``):

* ``"train"``: ``B`` images drawn uniformly with replacement by ``rng_for(seed, "train", i)``;
  weights 1.
* ``"valid"``: deterministic consecutive slices of the validation set (``seed`` is ignored).
  With ``nb = ceil(num_valid / B)`` batches per pass, batch ``i`` is slice number ``i % nb``:
  entries ``k*B .. k*B + B - 1`` (``k = i % nb``), wrapped modulo ``num_valid``; wrapped entries
  (positions ``>= num_valid``) get weight 0, so batches ``0 .. nb-1`` weight every validation
  image exactly once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from experiments.tasks import base

__all__ = ["Digits", "SPLIT_SEED", "load_split"]

SPLIT_SEED = 20240101


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[..., None]
    images.flags.writeable = False
    labels = d.target.astype(np.int32)
    labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=8)
def load_split(valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(train_indices, valid_indices)`` into the 1797 images (each sorted)."""
    _, labels = _load()
    rng = np.random.default_rng(SPLIT_SEED)
    valid = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        valid.append(idx[: int(round(idx.size * valid_fraction))])
    valid_idx = np.sort(np.concatenate(valid))
    train_idx = np.setdiff1d(np.arange(labels.size), valid_idx)
    return train_idx, valid_idx


@dataclass(frozen=True)
class Digits:
    valid_fraction: float = 0.2
    seed: int = 0
    name: str = field(default="digits", init=False)
    kind: str = field(default="image", init=False)

    def __post_init__(self):
        if not isinstance(self.valid_fraction, (int, float)) or not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction: expected a float in (0, 1), got {self.valid_fraction!r}")

    @property
    def seq_len(self) -> int:
        return 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (8, 8, 1)

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def num_valid(self) -> int:
        return int(load_split(self.valid_fraction)[1].size)

    @property
    def num_train(self) -> int:
        return int(load_split(self.valid_fraction)[0].size)

    def valid_batches_per_epoch(self, batch_size: int) -> int:
        return -(-self.num_valid // batch_size)

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        images, labels = _load()
        train_idx, valid_idx = load_split(self.valid_fraction)
        if split == "train":
            rng = base.rng_for(self.seed, split, index)
            sel = train_idx[rng.integers(0, train_idx.size, size=batch_size)]
            weights = np.ones(batch_size, dtype=np.float32)
        else:
            base.rng_for(self.seed, split, index)            # validates split and index
            n = valid_idx.size
            k = index % self.valid_batches_per_epoch(batch_size)
            pos = k * batch_size + np.arange(batch_size)
            sel = valid_idx[pos % n]
            weights = (pos < n).astype(np.float32)
        return {"inputs": images[sel].copy(), "targets": labels[sel].copy(), "weights": weights}


base.register("digits", Digits)
