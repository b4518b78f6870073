"""Experiment tasks: seeded, stateless data generators (see :mod:`experiments.tasks.base`).

``make(name, **fields)`` builds a registered task; ``names()`` lists them.  Each task module
documents its paper, its exact generative process and what is scored.
"""

from experiments.tasks import base
from experiments.tasks.base import SPLITS, Task, make, names, register, rng_for

# Importing a task module registers it.
from experiments.tasks import (  # noqa: E402,F401
    bytes_lm,
    counting,
    digits,
    flip_flop,
    icl_regression,
    induction_heads,
    listops,
    mqar,
    selective_copy,
)

__all__ = ["Task", "make", "names", "register", "rng_for", "SPLITS", "base"]
