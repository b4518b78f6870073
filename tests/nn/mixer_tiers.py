"""Which registry-suite checks run in ``make test`` and which only under ``slow``.

jit == eager runs the mixer eagerly (op-by-op compilation: the registry suites' most expensive
invariant).  The linear mixers built from a typed recipe share one layer skeleton
(``attn_jax/nn/linear_mixers.py``), so ``make test`` runs it for every other mixer and for the
first of them; the rest are under ``slow`` (``make test-slow``; their ops' own jit == eager runs
in ``tests/linear/test_catalog.py``, also ``slow``).
"""

import pytest

from attn_jax.core import declaration
from attn_jax.core.recipe import LinearLayer


def shares_the_linear_skeleton(name: str) -> bool:
    return any(d.name == name and isinstance(d.layer, LinearLayer) for d in declaration.declarations())


def eager_params(names: list[str]) -> list:
    """``names`` as pytest params, the linear-skeleton ones after the first marked ``slow``."""
    skeleton = [n for n in names if shares_the_linear_skeleton(n)]
    return [pytest.param(n, marks=[pytest.mark.slow] if n in skeleton[1:] else []) for n in names]
