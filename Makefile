# `make run`: set up .venv if needed, then reproduce the pipeline offline and print the table: every DVC stage as
# `dvc --wait-for-lock repro --single-item <stage>`, two independent stages at a time (pipeline.orchestrate).
# `make test`: set up .venv if needed, then run the test suite.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONPATH := $(CURDIR)

.PHONY: install run test test-soak test-fast lint params ui flow pool bench-fashion clean

$(PY):
	python3 -m venv $(VENV)

# pip takes torch 2.14.1 / torchvision 0.29.1 from this machine's disk; everything else from the registry.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[cpu,dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m pipeline.orchestrate run -j 2
	@cat data/reports/summary.md

test: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not soak"

# `make test-soak`: the whole pipeline on a pool and the lost-worker tests (a real Prefect server, two workers: ~10 min)
test-soak: install
	$(PY) -m pytest -q -p no:cacheprovider -m soak

test-fast: install
	$(PY) -m pytest -q -m "not slow and not pipeline"

lint: install
	$(PY) -m ruff check pipeline stages tests

params: install
	$(PY) -m pipeline.compose

ui: install
	bash scripts/ui.sh

flow: install
	$(PY) -m pipeline.dvc_locks
	$(PY) -c "from pipeline.tracking import init_store; init_store('.')"
	$(PY) -m pipeline.flow run

# `make pool`: the pipeline through a Prefect work pool: a server, two workers in their own clones, a local DVC remote
# (scripts/pool.sh, docs/scale_out.md). Commit first: the run pins HEAD and is saved as a DVC experiment.
pool: install
	bash scripts/pool.sh -- $(PY) -m pipeline.flow run --executor pool -j 2

# `make bench-fashion`: the Fashion-MNIST-LT benchmark (CIFAR-10-LT's protocol, every method; about an hour on two
# cores) in .bench/fashion_mnist_lt, beside the default pipeline; installs Debian's dataset-fashion-mnist as root.
bench-fashion: install
	$(PY) benchmarks/fashion_mnist_lt.py

clean:  # data/seeds/README.md is tracked (the evaluate stage's data/seeds dependency)
	rm -rf data checkpoints .dvc/tmp mlflow.db mlartifacts
	git checkout -- data/seeds/README.md
