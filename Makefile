# One-command setup: every target (re)creates .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)

.PHONY: demo demo-figure test test-slow fuzz bench matrix hardware-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,experiments]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.demo

demo-figure: $(STAMP)
	$(BIN)/python -m experiments.demo --write_results

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m slow

fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz.campaign --minutes $(or $(MINUTES),10)

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.exact_attention

# On the lent GPU machine (BUILD.md, "Hardware check"): its image's python3 already has jax with CUDA;
# nothing is installed (no network there), the repository runs from the working tree.
HW_ARGS ?=
hardware-check:
	PYTHONPATH=. PYTHONUNBUFFERED=1 $(PY) -m benchmarks.hardware_check $(HW_ARGS)

matrix: $(STAMP)
	$(BIN)/python -m attn_jax.feature_matrix --write README.md

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
