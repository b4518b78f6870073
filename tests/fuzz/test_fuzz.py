"""The bounded fuzz run of the default test suite: fixed (derandomised) hypothesis examples of every
family against the float64 oracle, plus the reproducers of issue 25 as explicit examples.

Each example is one compiled program (every backend / form of the case, forward and VJP), so the
counts are small; ``make fuzz`` (``python -m tests.fuzz.campaign``) runs the long, random campaign.
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, example, given, settings

from tests.fuzz import harness, strategies
from tests.fuzz.strategies import UNBOUNDED


def bounded(n, phases=tuple(Phase)):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, phases=phases,
                    suppress_health_check=list(HealthCheck))


def _exact(backends, **kw):
    case = {"family": "exact", "B": 1, "T": 8, "S": 8, "H": 2, "K": 1, "Dk": 4, "Dv": 4, "dtype": "float32",
            "mask": None, "bias": None, "neg_inf_bias_rows": False, "softcap": None, "sinks": False, "scale": None,
            "nan": "unused", "block_q": 16, "block_k": 16, "backends": list(backends), "seed": 0}
    case.update(kw)
    return case


#: issue 25, bug 1: a key that only the zero-padded query rows past T can see (T % block_q != 0).
PHANTOM_KEY = _exact(("reference", "xla", "dense"), T=17, S=18, mask={"kind": "causal", "offset": 0})
#: bug 5: a window bound of 2**31 - 1 (p + right wrapped around in int32).
UNBOUNDED_WINDOW = _exact(("reference", "xla", "dense"), T=9, S=12, nan="none",
                          mask={"kind": "window", "left": 0, "right": UNBOUNDED, "offset": 0})
#: bug 2: query rows that see no key (offset -1) and keys of a document no query is in.
PALLAS_UNUSED = _exact(("reference", "pallas-gpu"), mask={"kind": "and", "parts": [
    {"kind": "causal", "offset": -1}, {"kind": "segments", "q": [[1] * 8], "kv": [[1] * 4 + [2] * 4]}]})


@bounded(2)
@given(strategies.exact_cases(backends=("reference", "xla", "dense")))
@example(PHANTOM_KEY)
@example(UNBOUNDED_WINDOW)
def test_exact_attention_against_oracle(case):
    harness.check(case)


@bounded(1, phases=(Phase.explicit,))   # interpret mode is slow: the campaign draws random Pallas cases
@given(strategies.exact_cases(backends=("pallas-gpu",)))
@example(PALLAS_UNUSED)
def test_pallas_interpret_against_oracle(case):
    harness.check(case)


@bounded(2)
@given(strategies.decode_cases())
def test_decode_against_oracle(case):
    harness.check(case)


@bounded(2)
@given(strategies.linear_cases())
def test_linear_family_against_token_loops(case):
    harness.check(case)
