"""ListOps, generated as the Long Range Arena generator does, posed as a causal LM task.

Papers: Tay et al., "Long Range Arena: A Benchmark for Efficient Transformers", 2020,
arXiv:2011.04006; Nangia & Bowman, "ListOps: A Diagnostic Dataset for Latent Tree Learning",
2018, arXiv:1804.06028.  Generator semantics read from LRA's ``lra_benchmarks/data/listops.py``
(independent re-implementation, not a copy).

Generative process (LRA's ``generate_tree(1, max_depth, max_args)``):

* a node at depth ``< max_depth`` is a leaf with probability ``0.75`` (LRA's ``VALUE_P = 0.25``
  is the probability of an operator node); at depth ``max_depth`` it is always a leaf;
  the root has depth 1 (so 75% of raw draws are a single digit and get rejected);
* a leaf is a digit uniform in ``0..9``;
* an operator node picks ``k`` uniform in ``{2, ..., max_args}`` arguments (each generated at
  depth + 1) and an operator uniform in ``{MIN, MAX, MED, SM}``;
* value semantics: MIN/MAX of the arguments; MED = ``int(np.median(args))`` (mean of the two
  middle values for an even count, truncated — floor, as all values are >= 0); SM = sum mod 10;
* length = number of tokens (a leaf 1, an operator node 2 + its arguments: the operator token
  ``[MAX`` etc. and the closing ``]``); trees are rejection-sampled until
  ``min_length < length < max_length`` (strict, as in LRA).  We grow many candidate trees at
  once, breadth-first (node attributes are i.i.d. given depth, so the draw order does not
  change the distribution), and stop growing a candidate once it reaches ``max_length``
  tokens — it would be rejected anyway, so the accepted distribution is unchanged.

Deviations: LRA draws a fixed de-duplicated set of 96k/2k/2k trees with lengths in (500, 2000);
here every batch is fresh (no de-duplication) and the default sizes are CPU-scale.

Tokens (``vocab_size = 17``): ``0`` pad, ``1..4`` = ``[MIN [MAX [MED [SM``, ``5`` = ``]``,
``6..15`` = digits 0..9, ``16`` = answer query ``?``.  LRA's parentheses are dropped (LRA's
input pipeline strips them too).  Layout: the expression tokens left-aligned, then the query
token, then padding.  Posed as "lm" with a causal model: the classification head is "predict
at the last token" — ``targets`` at the query position is the digit token of the answer
(``6 + value``) and ``weights`` are 1 there only.  :func:`evaluate` is an independent
recursive evaluator used by the tests.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from experiments.tasks import base

__all__ = ["ListOps", "evaluate", "detokenize", "PAD", "MIN", "MAX", "MED", "SM", "CLOSE", "DIGIT0", "QUERY",
           "VOCAB_SIZE"]

PAD, MIN, MAX, MED, SM, CLOSE, DIGIT0 = 0, 1, 2, 3, 4, 5, 6
QUERY = 16
VOCAB_SIZE = 17
_OPERATORS = (MIN, MAX, MED, SM)            # LRA's OPERATORS order
_NAMES = {PAD: "<pad>", MIN: "[MIN", MAX: "[MAX", MED: "[MED", SM: "[SM", CLOSE: "]", QUERY: "?"}
_NAMES.update({DIGIT0 + v: str(v) for v in range(10)})
_VALUE_P = 0.25                             # probability of an operator node (LRA)


def _apply(op: int, vals: list[int]) -> int:
    if op == MIN:
        return min(vals)
    if op == MAX:
        return max(vals)
    if op == SM:
        return sum(vals) % 10
    s = sorted(vals)
    m = len(s)
    return s[m // 2] if m % 2 else (s[m // 2 - 1] + s[m // 2]) // 2


def _sample_trees(rng: np.random.Generator, count: int, max_depth: int, max_args: int,
                  min_length: int, max_length: int) -> list[tuple[list[int], int]]:
    """``count`` i.i.d. LRA trees conditioned on ``min_length < length < max_length``.

    Candidates are grown breadth-first, all at once: every node's attributes (leaf or
    operator, argument count, operator, digit) are i.i.d. given its depth, so the order in
    which they are drawn does not change the tree distribution.  A candidate stops growing as
    soon as its token count reaches ``max_length`` (it can only be rejected).  Accepted trees are
    then written out in prefix order (LRA's token order) and evaluated.
    """
    accepted: list[tuple[list[int], int]] = []
    while len(accepted) < count:
        K = max(256, 32 * (count - len(accepted)))
        levels = []                                   # per depth: (tree id, is_op, nargs, op, digit)
        tree_of = np.arange(K)
        size = np.zeros(K, dtype=np.int64)
        alive = np.ones(K, dtype=bool)
        for depth in range(1, max_depth + 1):
            n = tree_of.size
            if n == 0:
                break
            if depth < max_depth:
                is_op = rng.random(n) <= _VALUE_P
            else:
                is_op = np.zeros(n, dtype=bool)
            nargs = np.where(is_op, rng.integers(2, max_args + 1, size=n), 0)
            op = rng.integers(0, 4, size=n)
            digit = rng.integers(0, 10, size=n)
            levels.append((tree_of, is_op, nargs, op, digit))
            size += np.bincount(tree_of, weights=1 + is_op, minlength=K).astype(np.int64)
            alive &= size < max_length
            tree_of = np.repeat(tree_of, nargs * alive[tree_of])
        ok = np.flatnonzero(alive & (size > min_length))
        bounds = [(lv[0], np.searchsorted(lv[0], ok, "left"), np.searchsorted(lv[0], ok, "right")) for lv in levels]
        for j, c in enumerate(ok[: count - len(accepted)]):
            per_level = []
            for (tid, is_op, nargs, op, digit), (_, lo, hi) in zip(levels, bounds):
                a, b = lo[j], hi[j]
                if a == b:
                    break
                na = nargs[a:b]
                per_level.append((na.tolist(), (np.cumsum(na) - na).tolist(), op[a:b].tolist(), digit[a:b].tolist()))
            out: list[int] = []

            def emit(d: int, i: int) -> int:
                na, start, opk, dig = per_level[d]
                if na[i] == 0:
                    out.append(DIGIT0 + dig[i])
                    return dig[i]
                o = _OPERATORS[opk[i]]
                out.append(o)
                vals = [emit(d + 1, start[i] + k) for k in range(na[i])]
                out.append(CLOSE)
                return _apply(o, vals)

            value = emit(0, 0)
            accepted.append((out, value))
    return accepted


def evaluate(tokens) -> int:
    """Independent recursive evaluator of a token sequence (stops at the query token/pad)."""
    toks = [int(t) for t in tokens]
    pos = 0

    def node() -> int:
        nonlocal pos
        t = toks[pos]
        pos += 1
        if DIGIT0 <= t < DIGIT0 + 10:
            return t - DIGIT0
        if t not in _OPERATORS:
            raise ValueError(f"tokens: unexpected token {t} at {pos - 1}")
        args = []
        while toks[pos] != CLOSE:
            args.append(node())
        pos += 1
        if t == MIN:
            return min(args)
        if t == MAX:
            return max(args)
        if t == MED:
            return int(statistics.median(args))
        return sum(args) % 10

    value = node()
    if pos < len(toks) and toks[pos] not in (QUERY, PAD):
        raise ValueError("tokens: trailing tokens after a complete expression")
    return value


def detokenize(tokens) -> str:
    """LRA-style string (without parentheses) of a token sequence, pad dropped."""
    return " ".join(_NAMES[int(t)] for t in tokens if int(t) != PAD)


@dataclass(frozen=True)
class ListOps:
    seq_len: int = 256
    max_depth: int = 10
    max_args: int = 10
    min_length: int = 32
    max_length: Optional[int] = None     # None -> seq_len (expression < max_length, + 1 query token)
    seed: int = 0
    name: str = field(default="listops", init=False)
    kind: str = field(default="lm", init=False)

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or self.seq_len < 3:
            raise ValueError(f"seq_len: expected an int >= 3, got {self.seq_len!r}")
        if not isinstance(self.max_depth, int) or self.max_depth < 2:
            raise ValueError(f"max_depth: expected an int >= 2, got {self.max_depth!r}")
        if not isinstance(self.max_args, int) or self.max_args < 2:
            raise ValueError(f"max_args: expected an int >= 2, got {self.max_args!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or not 2 <= self.max_length <= self.seq_len):
            raise ValueError(f"max_length: expected None or an int in [2, seq_len={self.seq_len}], got {self.max_length!r}")
        if not isinstance(self.min_length, int) or self.min_length < 0 or self.min_length + 1 >= self.effective_max_length:
            raise ValueError(f"min_length: expected an int >= 0 with min_length + 1 < max_length="
                             f"{self.effective_max_length}, got {self.min_length!r}")

    @property
    def effective_max_length(self) -> int:
        return self.seq_len if self.max_length is None else self.max_length

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = base.rng_for(self.seed, split, index)
        T = self.seq_len
        inputs = np.zeros((batch_size, T), dtype=np.int32)
        targets = np.zeros((batch_size, T), dtype=np.int32)
        weights = np.zeros((batch_size, T), dtype=np.float32)
        trees = _sample_trees(rng, batch_size, self.max_depth, self.max_args, self.min_length,
                              self.effective_max_length)
        for b, (toks, value) in enumerate(trees):
            n = len(toks)
            inputs[b, :n] = toks
            inputs[b, n] = QUERY
            targets[b, n] = DIGIT0 + value
            weights[b, n] = 1.0
        return {"inputs": inputs, "targets": targets, "weights": weights}


base.register("listops", ListOps)
