# One source of truth for installing, testing, serving and benchmarking: CI, the Dockerfile and the
# README all call these targets. `make test` and `make serve` work on a fresh clone: the first run
# creates .venv and installs the pinned dependencies (constraints.txt).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= serve,train,dev

.PHONY: install test test-fast lint format ohif serve bench bench-mc bench-serve bench-train bench-archive bench-allocator bench-audit reliability demo-model wheelhouse image-smoke clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

test: lint
	$(PY) -m pytest

# Unit tests only, for the edit-test loop: tests/conftest.py marks what starts a server, an external program or a
# Python subprocess (see the README's "Fast tests and markers"); `make test` (CI) still runs everything, and mypy.
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -m "not slow and not integration"

# OHIF (pinned, from the npm registry, checked against its sha512, cached outside the repository) for the viewer
# test, tests/viewer/; without it that test skips. Never fails: no registry means a skip, said in the output.
ohif: $(STAMP)
	$(PY) -m tests.viewer.ohif fetch

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy bayesnet service
	$(VENV)/bin/hadolint docker/Dockerfile

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

serve: $(STAMP)
	$(PY) -m service

bench: bench-mc bench-serve bench-train bench-archive bench-allocator bench-audit

bench-allocator: $(STAMP)
	$(PY) bench/allocator.py

bench-mc: $(STAMP)
	$(PY) bench/mc_cost.py

bench-serve: $(STAMP)
	$(PY) bench/serve.py

bench-train: $(STAMP)
	$(PY) bench/train_throughput.py

bench-audit: $(STAMP)
	$(PY) bench/audit.py

bench-archive: $(STAMP)
	$(PY) bench/archive_scorer.py

# Load, overload, faults and hostile input against a fresh server with the demo model; one summary table,
# non-zero on any lost request, 5xx on bad input, memory growth or no recovery. The fast checks are tests in
# `make test` (tests/reliability/); RELIABILITY_ARGS=--quick for a one-minute run.
RELIABILITY_ARGS ?=
reliability: $(STAMP)
	$(PY) bench/reliability.py $(RELIABILITY_ARGS)

# The demo model `make serve` ships: trained on CPU from the NIH sample in ../shared (offline ImageNet
# Lite0 initialisation), calibrated and evaluated on its valid split, exported in half precision.
# The demo recipe is train/config.py's DEMO_RECIPE (`train fit --recipe demo`), which `train crossfit` also trains;
# DEMO_FIT_ARGS adds only the model's name.
DEMO_DATA ?= ../shared/data/nih-cxr14-sample
DEMO_RUN ?= runs/demo
DEMO_FIT_ARGS ?= --recipe demo --name bayesnet-cxr-demo

demo-model: $(STAMP)
	rm -rf $(DEMO_RUN)
	$(PY) -m train fit --train $(DEMO_DATA)/train.csv --valid $(DEMO_DATA)/valid.csv --out $(DEMO_RUN) $(DEMO_FIT_ARGS)
	$(PY) -m train calibrate --checkpoint $(DEMO_RUN)/best --data $(DEMO_DATA)/valid.csv --out $(DEMO_RUN)/calibrated
	$(PY) -m train evaluate --checkpoint $(DEMO_RUN)/calibrated --data $(DEMO_DATA)/valid.csv --out $(DEMO_RUN)/report
	$(PY) -m train export --checkpoint $(DEMO_RUN)/calibrated --report $(DEMO_RUN)/report --out models/demo \
		--data-notes docs/demo-data.md --training-notes docs/demo-training.md
	$(PY) -m train evaluate --checkpoint models/demo --data $(DEMO_DATA)/valid.csv --out $(DEMO_RUN)/report-shipped
	# The card quotes the shipped (half-precision) model's own numbers; the weights written are identical.
	$(PY) -m train export --checkpoint $(DEMO_RUN)/calibrated --report $(DEMO_RUN)/report-shipped --out models/demo \
		--data-notes docs/demo-data.md --training-notes docs/demo-training.md
	# Out-of-distribution gate from the shipped weights' own features (weights untouched; see docs/ood.md).
	$(PY) -m train ood --checkpoint models/demo --train $(DEMO_DATA)/train.csv --valid $(DEMO_DATA)/valid.csv \
		--films $(DEMO_DATA)/../other-sites --check $(DEMO_DATA)/../originals/siim-chest-cr-jpeg-baseline.dcm

# Wheels for an air-gapped install or image build: docker build --build-arg OFFLINE=1 ...
wheelhouse: $(STAMP)
	$(PY) -m pip wheel --quiet -c constraints.txt ".[serve]" -w docker/wheelhouse

# Build the image with podman and smoke-test it (root; minutes; not part of CI: run when docker/ changes).
image-smoke: $(STAMP)
	docker/image_smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
