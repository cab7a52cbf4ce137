# The two commands of the README: `make demo` and `make test`. Each sets up .venv on first use.
# `make lint`: ruff (lint and format check) and mypy, configured in pyproject.toml; `make -k lint`
# runs all three checks even when one fails (as .ci/run does).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint lint-ruff lint-format lint-types bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,lint,torch,flax]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/eosflow demo --out runs/demo

# Each test file runs in a pytest process of its own (tests/run_files.py says why).
test: $(STAMP)
	$(BIN)/python tests/run_files.py

lint: lint-ruff lint-format lint-types

lint-ruff: $(STAMP)
	$(BIN)/ruff check

lint-format: $(STAMP)
	$(BIN)/ruff format --check

lint-types: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/sharpness.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
