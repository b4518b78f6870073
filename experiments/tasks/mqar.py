"""Multi-Query Associative Recall (MQAR), as defined by Zoology.

Paper: Arora, Eyuboglu, Timalsina, Johnson, Poli, Zou, Rudra, Ré, "Zoology: Measuring and
Improving Recall in Efficient Language Models", 2023, arXiv:2312.04927.  Generator semantics
read from the Zoology source (``zoology/data/multiquery_ar.py``, function ``multiquery_ar``,
``num_passes=1``); this is an independent vectorised re-implementation, not a copy.

Generative process for one sequence (``V = vocab_size``, ``T = seq_len``, ``N = num_kv_pairs``):

1. Keys: ``N`` distinct tokens drawn uniformly without replacement from ``{1, ..., V//2 - 1}``
   (Zoology reserves token 0 as the "empty" filler, so keys start at 1).  Values: ``N``
   distinct tokens drawn uniformly without replacement from ``{V//2, ..., V - 1}``.
2. Context: the first ``C = 2N`` positions are ``k_1 v_1 k_2 v_2 ... k_N v_N``.
3. Query gaps: with ``S = (T - C) // 2`` slots, ``N`` distinct gaps ``g`` in ``{0, ..., S-1}``
   are drawn *without replacement* with probabilities ``p_g ∝ (g + 1) ** (power_a - 1)``
   (Zoology's power law; ``power_a = 1`` is uniform, small ``power_a`` favours short gaps).
   Zoology uses ``np.random.choice(replace=False, p=p)`` (successive sampling); we draw the
   same distribution with the Gumbel-top-k trick.  Key ``k_j`` is queried at position
   ``C + 2 * g_j`` — every key exactly once, queries only at even offsets after the context.
4. Targets: the target at a query position is the value bound to the queried key (Zoology
   stores it as ``labels[C + 2g + 1]`` and then shifts labels left by one, i.e. the label sits
   at the query position itself — the same convention as ``targets[:, t]`` here).  Zoology's
   ignore index ``-100`` everywhere else becomes ``weights = 0`` (and ``targets = 0``) here.
5. Filler: every position after the context that holds no query is 0; with
   ``random_non_queries=True`` (Zoology's default) each such position is replaced by a token
   drawn uniformly from the *whole* vocabulary ``{0, ..., V-1}`` (so fillers may collide with
   keys or values, exactly as in Zoology).

Constraints (Zoology's asserts): ``seq_len`` even, ``vocab_size > seq_len``,
``4 * num_kv_pairs <= seq_len``.

Deviation: batches are drawn per ``(seed, split, index)`` from :func:`base.rng_for` instead of
Zoology's fixed pre-generated train/test sets; the sampling distribution is the same.
Scored: accuracy/loss at the ``num_kv_pairs`` query positions only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from experiments.tasks import base

__all__ = ["MQAR", "power_law_probs"]


def power_law_probs(space: int, power_a: float) -> np.ndarray:
    """Zoology's gap distribution over ``{0, ..., space-1}``: ``p_g ∝ (g+1) ** (power_a - 1)``."""
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1.0)
    return p / p.sum()


def _sample_without_replacement(rng: np.random.Generator, n: int, k: int, rows: int) -> np.ndarray:
    """``rows`` independent uniformly random ordered k-subsets of ``range(n)``."""
    u = rng.random((rows, n))
    part = np.argpartition(u, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(u, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


@dataclass(frozen=True)
class MQAR:
    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    random_non_queries: bool = True
    seed: int = 0
    name: str = field(default="mqar", init=False)
    kind: str = field(default="lm", init=False)

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or self.seq_len < 4 or self.seq_len % 2:
            raise ValueError(f"seq_len: expected an even int >= 4, got {self.seq_len!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size <= self.seq_len:
            raise ValueError(f"vocab_size: must be an int > seq_len={self.seq_len} (Zoology's constraint), "
                             f"got {self.vocab_size!r}")
        if not isinstance(self.num_kv_pairs, int) or self.num_kv_pairs < 1 \
                or 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"num_kv_pairs: expected an int >= 1 with 4 * num_kv_pairs <= seq_len, "
                             f"got {self.num_kv_pairs!r}")
        if self.num_kv_pairs > self.vocab_size // 2 - 1:
            raise ValueError(f"num_kv_pairs: at most vocab_size // 2 - 1 distinct keys exist, got {self.num_kv_pairs!r}")
        if not (isinstance(self.power_a, (int, float)) and self.power_a > 0.0):
            raise ValueError(f"power_a: expected a float > 0 (1 = uniform gaps), got {self.power_a!r}")

    @property
    def context_len(self) -> int:
        return 2 * self.num_kv_pairs

    @property
    def num_gap_slots(self) -> int:
        return (self.seq_len - self.context_len) // 2

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = base.rng_for(self.seed, split, index)
        B, T, N, V = batch_size, self.seq_len, self.num_kv_pairs, self.vocab_size
        C, S = self.context_len, self.num_gap_slots
        half = V // 2
        keys = 1 + _sample_without_replacement(rng, half - 1, N, B)          # {1..V/2-1}
        values = half + _sample_without_replacement(rng, V - half, N, B)     # {V/2..V-1}
        # Successive sampling without replacement with probabilities p (Gumbel-top-k).
        logp = np.log(power_law_probs(S, self.power_a))
        scores = logp[None, :] + rng.gumbel(size=(B, S))
        gaps = np.argsort(-scores, axis=1, kind="stable")[:, :N]

        inputs = np.zeros((B, T), dtype=np.int64)
        inputs[:, 0:C:2] = keys
        inputs[:, 1:C:2] = values
        qpos = C + 2 * gaps
        rows = np.arange(B)[:, None]
        if self.random_non_queries:
            filler = rng.integers(0, V, size=(B, T - C))
            inputs[:, C:] = filler
        else:
            inputs[:, C:] = 0
        inputs[rows, qpos] = keys
        targets = np.zeros((B, T), dtype=np.int32)
        weights = np.zeros((B, T), dtype=np.float32)
        targets[rows, qpos] = values
        weights[rows, qpos] = 1.0
        return {"inputs": inputs.astype(np.int32), "targets": targets, "weights": weights}


base.register("mqar", MQAR)
