"""Byte-level language modelling on the CPython standard library sources.

No paper: a small, offline, real-text corpus that ships with every Python — the byte-level
analogue of character-level LM benchmarks (enwik8/text8) for CPU-scale runs.

Corpus (built once per process, cached with ``functools.lru_cache``):

* root: ``sysconfig.get_paths()["stdlib"]`` of the Python running the code;
* files: every ``*.py`` file below the root, recursively, **excluding** any file with a
  directory component in ``{"site-packages", "dist-packages", "test", "tests", "idle_test",
  "__pycache__"}`` (this drops the test suites, e.g. ``test/``, ``unittest/test/``,
  ``idlelib/idle_test/``, ``lib2to3/tests/``, and any installed third-party packages);
* order: sorted by the path relative to the root (POSIX form, plain string order);
* content: the raw bytes of each file, files joined by one separator byte ``0x00``
  (NUL; Python sources never contain it), no trailing separator;
* ``max_bytes`` (optional) keeps only the first ``max_bytes`` bytes of that concatenation;
* split: the last ``valid_fraction`` of the (capped) corpus bytes, by file order, is the
  validation split (``n_valid = int(total * valid_fraction)``); the rest is training data.
  The split is contiguous, so validation text comes from files (alphabetically late modules)
  never seen in training, except for at most one file cut by the boundary.

Batches (kind ``"lm"``, ``vocab_size = 256``): ``B`` window starts ``s`` drawn uniformly by
``rng_for(seed, split, index)`` such that the whole window lies inside the split;
``inputs = bytes[s : s+T]``, ``targets = bytes[s+1 : s+T+1]``, ``weights`` all 1.
:func:`corpus_info` reports the provenance (Python version, stdlib path, file count, sizes,
sha256) — the corpus differs between Python versions, so quote it with results.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from experiments.tasks import base

__all__ = ["BytesLM", "corpus_info", "corpus_files", "load_corpus", "EXCLUDED_DIRS", "SEPARATOR"]

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
SEPARATOR = 0


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def corpus_files() -> tuple[str, ...]:
    """Relative POSIX paths of the corpus files, in corpus order."""
    root = _stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel_dir.parts):
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for f in filenames:
            if f.endswith(".py"):
                files.append((rel_dir / f).as_posix())
    return tuple(sorted(files))


@functools.lru_cache(maxsize=1)
def _full_corpus() -> np.ndarray:
    root = _stdlib_root()
    parts = []
    for i, rel in enumerate(corpus_files()):
        if i:
            parts.append(bytes([SEPARATOR]))
        parts.append((root / rel).read_bytes())
    arr = np.frombuffer(b"".join(parts), dtype=np.uint8)
    arr.flags.writeable = False
    return arr


def load_corpus(max_bytes: Optional[int] = None) -> np.ndarray:
    """The (read-only, uint8) corpus, optionally capped to its first ``max_bytes`` bytes."""
    full = _full_corpus()
    return full if max_bytes is None else full[:max_bytes]


@functools.lru_cache(maxsize=8)
def _sha256(max_bytes: Optional[int]) -> str:
    return hashlib.sha256(load_corpus(max_bytes).tobytes()).hexdigest()


def _split_sizes(total: int, valid_fraction: float) -> tuple[int, int]:
    n_valid = int(total * valid_fraction)
    return total - n_valid, n_valid


def corpus_info(valid_fraction: float = 0.05, max_bytes: Optional[int] = None) -> dict:
    """Provenance of the corpus (JSON-serialisable)."""
    data = load_corpus(max_bytes)
    n_train, n_valid = _split_sizes(int(data.size), valid_fraction)
    files = corpus_files()
    return {
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib_path": str(_stdlib_root()),
        "file_rule": "sorted relative paths of all *.py under stdlib, excluding directories named "
                     + ", ".join(sorted(EXCLUDED_DIRS)) + "; files joined by byte 0x00",
        "num_files": len(files),
        "first_file": files[0] if files else None,
        "last_file": files[-1] if files else None,
        "total_bytes": int(data.size),
        "max_bytes": max_bytes,
        "valid_fraction": valid_fraction,
        "train_bytes": n_train,
        "valid_bytes": n_valid,
        "sha256": _sha256(max_bytes),
    }


@dataclass(frozen=True)
class BytesLM:
    seq_len: int = 256
    valid_fraction: float = 0.05
    max_bytes: Optional[int] = None
    seed: int = 0
    name: str = field(default="bytes_lm", init=False)
    kind: str = field(default="lm", init=False)

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len: expected an int >= 1, got {self.seq_len!r}")
        if not isinstance(self.valid_fraction, (int, float)) or not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction: expected a float in (0, 1), got {self.valid_fraction!r}")
        if self.max_bytes is not None and (not isinstance(self.max_bytes, int) or self.max_bytes < 1):
            raise ValueError(f"max_bytes: expected None or a positive int, got {self.max_bytes!r}")
        n_train, n_valid = self.split_sizes
        if min(n_train, n_valid) < self.seq_len + 1:
            raise ValueError(f"max_bytes: each split needs >= seq_len + 1 = {self.seq_len + 1} bytes, "
                             f"got train={n_train}, valid={n_valid}")

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def split_sizes(self) -> tuple[int, int]:
        return _split_sizes(int(load_corpus(self.max_bytes).size), self.valid_fraction)

    def info(self) -> dict:
        return corpus_info(self.valid_fraction, self.max_bytes)

    def split_bounds(self, split: str) -> tuple[int, int]:
        """``[lo, hi)`` byte range of ``split`` in the corpus."""
        n_train, n_valid = self.split_sizes
        if split == "train":
            return 0, n_train
        if split == "valid":
            return n_train, n_train + n_valid
        raise ValueError(f"split: expected one of {base.SPLITS}, got {split!r}")

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = base.rng_for(self.seed, split, index)
        data = load_corpus(self.max_bytes)
        lo, hi = self.split_bounds(split)
        T = self.seq_len
        starts = rng.integers(lo, hi - T, size=batch_size)        # s + T <= hi - 1
        idx = starts[:, None] + np.arange(T + 1)[None, :]
        window = data[idx].astype(np.int32)
        return {"inputs": window[:, :-1], "targets": window[:, 1:],
                "weights": np.ones((batch_size, T), dtype=np.float32)}


base.register("bytes_lm", BytesLM)
