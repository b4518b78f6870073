"""Flip-Flop language modelling (FFLM).

Paper: Liu, Ash, Goel, Krishnamurthy, Zhang, "Exposing Attention Glitches with Flip-Flop
Language Modeling", 2023, arXiv:2306.00946.  Also one of the CoPE tasks (Golovneva et al. 2024,
arXiv:2405.18719).

The flip-flop language ``FFL(T, p)``: strings of ``T`` tokens (``T`` even) made of ``T/2``
instruction/data pairs ``(x, b)`` with instruction ``x`` in ``{w, i, r}`` (write, ignore, read)
and data bit ``b`` in ``{0, 1}``:

* the first instruction is ``w`` and (``final_read=True``, as in the paper's definition) the
  last instruction is ``r``; every other instruction is i.i.d. with probabilities
  ``(p_write, p_ignore, p_read)``;
* the bit after ``w`` or ``i`` is uniform; the bit after ``r`` equals the bit of the most recent
  ``w`` (the one-bit register).

The paper's canonical distribution is ``FFL(p_i = 0.8)``, i.e. ``p_ignore = 0.8`` and
``p_write = p_read = 0.1`` with ``T = 512`` (the defaults here); its sparse / dense
out-of-distribution tests are ``p_ignore = 0.98`` and ``p_ignore = 0.1`` (writes and reads
splitting the remainder equally) — see :meth:`FlipFlop.ffl`.  Provenance: the paper's full
text was not available offline; the definition above (first ``w``, last ``r``, ``FFL(0.8)`` =
10% writes / 10% reads) is as recalled from the paper and agrees with a public
re-implementation's description; the sparse/dense values are from memory of the paper.

Token ids (``vocab_size = 5``): ``w = 0``, ``i = 1``, ``r = 2``, ``0 -> 3``, ``1 -> 4``.
Layout: ``inputs`` is the whole string ``s_0 .. s_{T-1}``; ``targets[:, t] = s_{t+1}``
(``targets[:, T-1] = 0``).  ``weights`` are 1 exactly at positions ``t`` with ``s_t = r``:
the deterministic predictions (the bit after each read), which is what the paper scores
(its "glitch rate" is the error rate on these bits).  The random bits after ``w``/``i`` and
the instructions themselves are not scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from experiments.tasks import base

__all__ = ["FlipFlop", "W", "I", "R", "BIT0", "BIT1"]

W, I, R, BIT0, BIT1 = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class FlipFlop:
    seq_len: int = 512
    p_write: float = 0.1
    p_ignore: float = 0.8
    p_read: float = 0.1
    final_read: bool = True
    seed: int = 0
    name: str = field(default="flip_flop", init=False)
    kind: str = field(default="lm", init=False)

    @classmethod
    def ffl(cls, p_ignore: float = 0.8, **kwargs) -> "FlipFlop":
        """``FFL(p_i)``: ``p_write = p_read = (1 - p_ignore) / 2`` (paper's parameterisation)."""
        rest = (1.0 - p_ignore) / 2.0
        return cls(p_write=rest, p_ignore=p_ignore, p_read=rest, **kwargs)

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or self.seq_len < 4 or self.seq_len % 2:
            raise ValueError(f"seq_len: expected an even int >= 4, got {self.seq_len!r}")
        for fname in ("p_write", "p_ignore", "p_read"):
            v = getattr(self, fname)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{fname}: expected a probability in [0, 1], got {v!r}")
        total = self.p_write + self.p_ignore + self.p_read
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"p_read: p_write + p_ignore + p_read must be 1, got {total!r}")

    @property
    def vocab_size(self) -> int:
        return 5

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = base.rng_for(self.seed, split, index)
        B, T = batch_size, self.seq_len
        P = T // 2
        probs = np.array([self.p_write, self.p_ignore, self.p_read], dtype=np.float64)
        cdf = np.cumsum(probs)
        cdf[-1] = 1.0
        instr = np.searchsorted(cdf, rng.random((B, P)), side="right").astype(np.int32)
        instr[:, 0] = W
        if self.final_read:
            instr[:, -1] = R
        bits = rng.integers(0, 2, size=(B, P))
        is_w = instr == W
        last_w = np.maximum.accumulate(np.where(is_w, np.arange(P)[None, :], 0), axis=1)
        register = np.take_along_axis(bits, last_w, axis=1)
        bits = np.where(instr == R, register, bits)
        seq = np.empty((B, T), dtype=np.int32)
        seq[:, 0::2] = instr
        seq[:, 1::2] = BIT0 + bits
        targets = np.zeros((B, T), dtype=np.int32)
        targets[:, :-1] = seq[:, 1:]
        weights = (seq == R).astype(np.float32)
        return {"inputs": seq, "targets": targets, "weights": weights}


base.register("flip_flop", FlipFlop)
