"""Counting: how many times does a designated token occur in the context?

Paper: Golovneva, Wang, Weston, Sukhbaatar, "Contextual Position Encoding: Learning to Count
What's Important", 2024, arXiv:2405.18719 (CoPE; its counting task is one of the toy tasks on
which standard position encodings fail and CoPE succeeds).

Provenance caveat: the paper's full text was not available offline when this generator was
written, so its exact counting-task definition could not be checked.  We implement the
project's fallback definition (a designated target token among random tokens; output its
count), extended to ``num_vars`` possible target tokens named by the query — mirroring, as far
as we recall, the paper's setting with 1, 3 or 5 "variables".  Treat results as "CoPE-style
counting", not as a reproduction of the paper's numbers.

Generative process (``T = seq_len``, ``L = T - 2`` context tokens, ``S = num_symbols``,
``K = num_vars <= S``):

* context ``c_0 .. c_{L-1}`` i.i.d. uniform over the ``S`` symbol tokens ``{0, ..., S-1}``;
* the queried symbol ``v`` is uniform over ``{0, ..., K-1}`` (with ``K = 1`` it is always 0:
  the designated target token ``x = 0``);
* ``inputs = [c_0 .. c_{L-1}, QUERY, v]`` with ``QUERY = S``;
* the answer is ``n = #{j : c_j = v}`` in ``{0, ..., L}``, emitted as the count token
  ``S + 1 + n``: ``targets[:, T-1] = S + 1 + n`` and ``weights`` are 1 only at ``T-1``.

``vocab_size = S + 1 + (L + 1)``.  The count is ``Binomial(L, 1/S)``, so the number of target
occurrences grows with the sequence length (length generalisation = a larger ``seq_len``,
whose larger counts the model has never emitted; compare models at equal ``seq_len`` for
in-distribution accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from experiments.tasks import base

__all__ = ["Counting"]


@dataclass(frozen=True)
class Counting:
    seq_len: int = 64
    num_symbols: int = 8
    num_vars: int = 1
    seed: int = 0
    name: str = field(default="counting", init=False)
    kind: str = field(default="lm", init=False)

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or self.seq_len < 3:
            raise ValueError(f"seq_len: expected an int >= 3, got {self.seq_len!r}")
        if not isinstance(self.num_symbols, int) or self.num_symbols < 2:
            raise ValueError(f"num_symbols: expected an int >= 2, got {self.num_symbols!r}")
        if not isinstance(self.num_vars, int) or not 1 <= self.num_vars <= self.num_symbols:
            raise ValueError(f"num_vars: expected an int in [1, num_symbols={self.num_symbols}], got {self.num_vars!r}")

    @property
    def context_len(self) -> int:
        return self.seq_len - 2

    @property
    def query_token(self) -> int:
        return self.num_symbols

    @property
    def count_offset(self) -> int:
        return self.num_symbols + 1

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 1 + self.context_len + 1

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = base.rng_for(self.seed, split, index)
        B, T, L = batch_size, self.seq_len, self.context_len
        ctx = rng.integers(0, self.num_symbols, size=(B, L))
        var = rng.integers(0, self.num_vars, size=B)
        count = (ctx == var[:, None]).sum(axis=1)
        inputs = np.empty((B, T), dtype=np.int32)
        inputs[:, :L] = ctx
        inputs[:, L] = self.query_token
        inputs[:, L + 1] = var
        targets = np.zeros((B, T), dtype=np.int32)
        targets[:, T - 1] = self.count_offset + count
        weights = np.zeros((B, T), dtype=np.float32)
        weights[:, T - 1] = 1.0
        return {"inputs": inputs, "targets": targets, "weights": weights}


base.register("counting", Counting)
