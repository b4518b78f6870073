"""Test-session settings.

XLA:CPU compile time dominates this suite (most tests compile a few small programs and run them
once).  LLVM's backend optimisation level changes how fast the generated code runs, not what it
computes (no fast-math either way), so tests compile at level 0 — about 40% less CPU time for the
suite.  Benchmarks never import this file and compile at the default level.  An ``XLA_FLAGS``
already set in the environment wins.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
