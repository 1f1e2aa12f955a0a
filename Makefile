# The two commands of the README: `make run` (the benchmark) and `make test` (the tests).
# Each creates .venv and installs the pinned requirements on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: run test bench lint format clean gpu-check

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/retinaperf run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# Speed against baselines measured in the same run (not part of `make test`); see benchmarks/.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py $(ARGS)

# Needs a CUDA GPU (prints what it would run elsewhere); see benchmarks/gpu_check.py.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py $(ARGS)

# Style (ruff), types (mypy, over src/) and the layers of docs/architecture.md (lint-imports);
# each is configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build src/*.egg-info
