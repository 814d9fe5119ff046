# mlpscale: one-command set-up, lint, tests, jobs and local services.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-$(shell sha1sum pyproject.toml | cut -c1-12)
DEB_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config
PYTEST_ARGS ?= -q
RAY_PORT ?= 6379
DASHBOARD_PORT ?= 8265
AGENT_PORT ?= 52365
MLFLOW_PORT ?= 5000
SERVICES := .services
export MLPSCALE_REPO := $(CURDIR)

.PHONY: setup lint test test-fast pretrain up down ui bench tune scaling-demo clean-services

setup: $(STAMP)

$(STAMP):
	@if ! dpkg -s $(DEB_PACKAGES) >/dev/null 2>&1; then \
	  echo "installing Debian packages: $(DEB_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_PACKAGES) >/dev/null; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0 numpy cython pkgconfig
	$(PY) -m pip install -q --no-build-isolation ffcv==1.0.2
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.setup-*
	touch $@

# lint: ruff's checks and its formatter, in check mode (nothing is rewritten); settings in pyproject.toml.
LINT_PATHS := platform jobs tests benchmarks
lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# test-fast: the inner loop, every test but the integration ones (Ray, servers, job processes); under 2 minutes.
test-fast: setup
	$(PY) -m pytest $(PYTEST_ARGS) -m "not integration"

# scaling-demo (scaling helper): the cpu-demo grid (16 tiny trials on digits) then the scaling-law fit,
# end to end into outputs/scaling-demo (fit.json, points.parquet, plots/) and the MLflow store.
SCALING_DEMO_NAME := scaling-demo-$(shell date +%Y%m%d-%H%M%S)
scaling-demo: setup
	$(PY) jobs/scaling_grid.py --preset cpu-demo --name $(SCALING_DEMO_NAME)
	$(PY) jobs/fit_scaling_laws.py --sweep $(SCALING_DEMO_NAME) --out outputs/scaling-demo

# --- services (helper services) ---
# up/down/ui: a local Ray head (dashboard 127.0.0.1:$(DASHBOARD_PORT)) and an MLflow server (127.0.0.1:$(MLFLOW_PORT)),
# state and stores under $(SERVICES)/ (see docs/services.md). `make up NUM_CPUS=4` limits the head's CPUs.
# pretrain: the default run on the bundled digits (converted first when missing); PRETRAIN_ARGS adds options.
SERVICE_PORTS = RAY_PORT=$(RAY_PORT) DASHBOARD_PORT=$(DASHBOARD_PORT) AGENT_PORT=$(AGENT_PORT) MLFLOW_PORT=$(MLFLOW_PORT)
up: setup
	$(SERVICE_PORTS) $(PY) jobs/services.py up --services-dir $(SERVICES) $(if $(NUM_CPUS),--num-cpus $(NUM_CPUS))

down:
	@if [ -x $(PY) ]; then $(SERVICE_PORTS) $(PY) jobs/services.py down --services-dir $(SERVICES); fi

ui: setup
	$(SERVICE_PORTS) $(PY) jobs/services.py ui --services-dir $(SERVICES)

pretrain: setup
	$(PY) jobs/prepare_data.py digits
	$(PY) jobs/pretrain.py $(PRETRAIN_ARGS)

clean-services: down
	rm -rf $(SERVICES)

# tune (tune helper): a smoke sweep (search_spaces/smoke.yaml) on the bundled digits, converted first when
# missing; TUNE_ARGS adds sweep or pretrain options (see docs/tune.md).
tune: setup
	$(PY) jobs/prepare_data.py digits
	$(PY) jobs/tune.py --space search_spaces/smoke.yaml --num-samples 4 --arch B_2-Wi_64 --epochs 4 $(TUNE_ARGS)

# bench: the measured comparisons behind benchmarks/RESULTS.md (loader and training throughput on this machine).
bench: setup
	$(PY) benchmarks/loader_throughput.py --images 20000 --resolutions 32 64 --workers 2 --epochs 5
	$(PY) benchmarks/train_throughput.py --rounds 3
