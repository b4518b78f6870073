"""Test-run configuration: shape annotations of attn_jax are checked at run time in every test.

jaxtyping's import hook must be installed before anything imports attn_jax, so this runs first;
the library itself never imports a checker (zero cost outside tests).  The checker is beartype
(tests/shapecheck.py explains the one deviation: library validation errors come first).
"""

import os
import sys

#: XLA:CPU compile options for the whole test run (they halve its CPU time: test programs are
#: small, so compilation dominates).  XLA reads XLA_FLAGS when the backend starts, i.e. after this
#: file runs; flags the user set come last and win.  Benchmarks and the library never set them.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()

from jaxtyping import install_import_hook  # noqa: E402

import tests.shapecheck  # noqa: F401  (the hook refers to it by name)

if any(m == "attn_jax" or m.startswith("attn_jax.") for m in sys.modules):
    raise RuntimeError("attn_jax was imported before tests/conftest.py could install the shape-check hook")

#: The families of pure ops (their public functions carry the shape annotations).
CHECKED = ("attn_jax.softmax", "attn_jax.linear", "attn_jax.positional", "attn_jax.variants", "attn_jax.local",
           "attn_jax.sparse", "attn_jax.analysis")
_hook = install_import_hook(CHECKED, "tests.shapecheck.checker")


def pytest_configure(config):
    # beartype's notice about typing.Callable-style hints in annotated modules (not a check failure)
    config.addinivalue_line("filterwarnings", "ignore::beartype.roar.BeartypeDecorHintPep585DeprecationWarning")
