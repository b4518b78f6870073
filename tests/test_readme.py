"""The README stays true: the feature matrix matches the registries, and its commands exist."""

import pathlib
import re

from attn_jax import feature_matrix

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_feature_matrix_matches_registry():
    text = (ROOT / "README.md").read_text()
    block = re.search(re.escape(feature_matrix.BEGIN) + r"\n(.*?)\n" + re.escape(feature_matrix.END), text, re.S)
    assert block, "README lacks the feature-matrix block"
    assert block.group(1) == feature_matrix.markdown(), (
        "README feature matrix is stale: run `python -m attn_jax.feature_matrix --write README.md`")


def test_linear_matrix_matches_catalogue():
    text = (ROOT / "README.md").read_text()
    block = re.search(re.escape(feature_matrix.LINEAR_BEGIN) + r"\n(.*?)\n" + re.escape(feature_matrix.LINEAR_END),
                      text, re.S)
    assert block, "README lacks the linear-matrix block"
    assert block.group(1) == feature_matrix.linear_markdown(), (
        "README linear matrix is stale: run `python -m attn_jax.feature_matrix --write README.md`")


def test_readme_commands_are_the_makefile_targets():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no '{target}' target"
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_python_examples_run():
    """Every ```python block of the README runs, in order, in one namespace."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation


def test_family_matrices_match_declarations():
    text = (ROOT / "README.md").read_text()
    for family in feature_matrix.FAMILY_MATRICES:
        begin, end = feature_matrix.family_markers(family)
        block = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), text, re.S)
        assert block, f"README lacks the {family}-matrix block"
        assert block.group(1) == feature_matrix.family_markdown(family), (
            f"README {family} matrix is stale: run `python -m attn_jax.feature_matrix --write README.md`")
