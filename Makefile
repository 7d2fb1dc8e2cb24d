# The two commands a newcomer needs: `make demo` and `make test`. Both set up everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sd-pipeline-installed
export SD_PIPELINE_HOME ?= $(CURDIR)/.sd-pipeline
# glibc otherwise hands big freed blocks back to the kernel and training re-faults them
# every step (see docs/architecture.md); harmless elsewhere.
export MALLOC_TRIM_THRESHOLD_ ?= 2147483647
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export GX_ANALYTICS_ENABLED := false

.PHONY: install demo test test-fast lint up constraints clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=25"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sd-pipeline demo --config configs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/ruff check sd_pipeline dags plugins tests benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check sd_pipeline dags plugins tests benchmarks
	$(VENV)/bin/mypy sd_pipeline

# The Airflow UI (http://127.0.0.1:8080) and the MLflow UI (http://127.0.0.1:5000) on the
# embedded home, in the foreground; Ctrl-C stops both.
up: $(STAMP)
	$(VENV)/bin/sd-pipeline up --config configs/demo.yaml

constraints: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > constraints.txt.new
	@echo "review constraints.txt.new, then move it over constraints.txt"

clean:
	rm -rf $(SD_PIPELINE_HOME)
