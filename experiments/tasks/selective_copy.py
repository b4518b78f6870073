"""Selective Copying, as used by Mamba.

Paper: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023,
arXiv:2312.00752 (Section 3.1 / Figure 2; the generator follows the "variable" copying data of
the state-spaces repository that Mamba's experiments used: noise token 0, data tokens
``1 .. A-2``, marker token ``A-1``, data tokens scattered at sorted random positions, ``M``
markers at the end that ask for the data tokens in order).  Also used by CoPE (Golovneva et
al. 2024, arXiv:2405.18719).

Generative process (``A = vocab_size`` total tokens, ``M = num_tokens_to_copy``,
``T = seq_len``):

* token ids: ``0`` = noise/blank, ``1 .. A-2`` = data tokens, ``A-1`` = separator/marker;
* ``M`` data tokens drawn i.i.d. uniformly from ``{1, ..., A-2}`` (with replacement);
* ``M`` distinct positions drawn uniformly among the first ``T - M`` positions and sorted;
  the data tokens are written there in draw order, every other of those positions is noise 0;
* the last ``M`` positions hold the marker ``A-1``.

``targets`` at the ``j``-th marker position (``t = T - M + j``) is the ``j``-th data token:
having read all data and ``j+1`` markers, the causal model outputs data token ``j``.  This is
the same supervision as the state-spaces generator (outputs aligned with the trailing marker
block, no teacher forcing of earlier answers).  ``weights`` are 1 exactly at the ``M`` marker
positions.  Defaults are a CPU-sized version (Mamba: ``A = 16``, ``M = 16``, ``T = 4096``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from experiments.tasks import base

__all__ = ["SelectiveCopy"]


@dataclass(frozen=True)
class SelectiveCopy:
    vocab_size: int = 16
    seq_len: int = 256
    num_tokens_to_copy: int = 16
    seed: int = 0
    name: str = field(default="selective_copy", init=False)
    kind: str = field(default="lm", init=False)

    def __post_init__(self):
        if not isinstance(self.vocab_size, int) or self.vocab_size < 3:
            raise ValueError(f"vocab_size: expected an int >= 3 (noise, >=1 data token, marker), got {self.vocab_size!r}")
        if not isinstance(self.num_tokens_to_copy, int) or self.num_tokens_to_copy < 1:
            raise ValueError(f"num_tokens_to_copy: expected an int >= 1, got {self.num_tokens_to_copy!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2 * self.num_tokens_to_copy:
            raise ValueError(f"seq_len: expected an int >= 2 * num_tokens_to_copy = {2 * self.num_tokens_to_copy}, "
                             f"got {self.seq_len!r}")

    @property
    def noise_token(self) -> int:
        return 0

    @property
    def marker_token(self) -> int:
        return self.vocab_size - 1

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = base.rng_for(self.seed, split, index)
        B, T, M, A = batch_size, self.seq_len, self.num_tokens_to_copy, self.vocab_size
        L = T - M
        data = rng.integers(1, A - 1, size=(B, M))
        pos = np.sort(np.argpartition(rng.random((B, L)), M - 1, axis=1)[:, :M], axis=1)
        inputs = np.zeros((B, T), dtype=np.int32)
        inputs[np.arange(B)[:, None], pos] = data
        inputs[:, L:] = A - 1
        targets = np.zeros((B, T), dtype=np.int32)
        targets[:, L:] = data
        weights = np.zeros((B, T), dtype=np.float32)
        weights[:, L:] = 1.0
        return {"inputs": inputs, "targets": targets, "weights": weights}


base.register("selective_copy", SelectiveCopy)
