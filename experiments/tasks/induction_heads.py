"""Induction heads (associative recall of the token after a trigger).

Papers: Olsson et al., "In-context Learning and Induction Heads", 2022, arXiv:2209.11895
(the mechanism: ``[A][B] ... [A] -> [B]``); the synthetic task as run by Gu & Dao, "Mamba:
Linear-Time Sequence Modeling with Selective State Spaces", 2023, arXiv:2312.00752 (Section
4.1.2; vocab 16, training length 256), itself taken from H3 (Fu et al. 2022, arXiv:2212.14052).

Generative process (``V = vocab_size``, ``T = seq_len``; the trigger is token ``V - 1``):

* ``inputs[0 : T-1]`` are i.i.d. uniform over the ordinary tokens ``{0, ..., V-2}``;
* one position ``p`` uniform in ``{0, ..., T-3}`` is overwritten by the trigger, so the
  trigger is followed by an ordinary token ``inputs[p+1]`` (the answer);
* the last position ``T-1`` holds the trigger again (its second and final occurrence).

The model must output ``inputs[p+1]`` after reading the final trigger: ``targets[:, T-1] =
inputs[:, p+1]`` and ``weights`` are 1 only at ``T-1``.  The trigger occurs exactly twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from experiments.tasks import base

__all__ = ["InductionHeads"]


@dataclass(frozen=True)
class InductionHeads:
    vocab_size: int = 16
    seq_len: int = 256
    seed: int = 0
    name: str = field(default="induction_heads", init=False)
    kind: str = field(default="lm", init=False)

    def __post_init__(self):
        if not isinstance(self.vocab_size, int) or self.vocab_size < 3:
            raise ValueError(f"vocab_size: expected an int >= 3 (>= 2 ordinary tokens + trigger), got {self.vocab_size!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 3:
            raise ValueError(f"seq_len: expected an int >= 3, got {self.seq_len!r}")

    @property
    def trigger_token(self) -> int:
        return self.vocab_size - 1

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = base.rng_for(self.seed, split, index)
        B, T, V = batch_size, self.seq_len, self.vocab_size
        inputs = rng.integers(0, V - 1, size=(B, T)).astype(np.int32)
        p = rng.integers(0, T - 2, size=B)
        rows = np.arange(B)
        inputs[rows, p] = V - 1
        inputs[:, T - 1] = V - 1
        targets = np.zeros((B, T), dtype=np.int32)
        targets[:, T - 1] = inputs[rows, p + 1]
        weights = np.zeros((B, T), dtype=np.float32)
        weights[:, T - 1] = 1.0
        return {"inputs": inputs, "targets": targets, "weights": weights}


base.register("induction_heads", InductionHeads)
