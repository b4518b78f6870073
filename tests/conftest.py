"""Test-run configuration: shape annotations of attn_jax are checked at run time in every test.

jaxtyping's import hook must be installed before anything imports attn_jax, so this runs first;
the library itself never imports a checker (zero cost outside tests).  The checker is beartype
(tests/shapecheck.py explains the one deviation: library validation errors come first).
"""

import sys

from jaxtyping import install_import_hook

import tests.shapecheck  # noqa: F401  (the hook refers to it by name)

if any(m == "attn_jax" or m.startswith("attn_jax.") for m in sys.modules):
    raise RuntimeError("attn_jax was imported before tests/conftest.py could install the shape-check hook")

#: The families of pure ops (their public functions carry the shape annotations).
CHECKED = ("attn_jax.softmax", "attn_jax.linear", "attn_jax.positional", "attn_jax.variants", "attn_jax.local")
_hook = install_import_hook(CHECKED, "tests.shapecheck.checker")


def pytest_configure(config):
    # beartype's notice about typing.Callable-style hints in annotated modules (not a check failure)
    config.addinivalue_line("filterwarnings", "ignore::beartype.roar.BeartypeDecorHintPep585DeprecationWarning")
