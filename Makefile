# One source of truth for installing, testing, serving and benchmarking: CI, the Dockerfile and the
# README all call these targets. `make test` and `make serve` work on a fresh clone: the first run
# creates .venv and installs the pinned dependencies (constraints.txt).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= serve,train,dev

.PHONY: install test lint format serve bench bench-mc bench-serve clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

test: lint
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy bayesnet service

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

serve: $(STAMP)
	$(PY) -m service

bench: bench-mc bench-serve

bench-mc: $(STAMP)
	$(PY) bench/mc_cost.py

bench-serve: $(STAMP)
	$(PY) bench/serve.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
