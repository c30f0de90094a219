# fope-megatron: `make smoke` and `make test` set everything up on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
# SYSTEM_TORCH=1: reuse the torch already installed in $(PYTHON) (a cluster container with a CUDA
# build). The venv then sees system site-packages and torch is dropped from the constraints.
SYSTEM_TORCH ?= 0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fope-installed
PYTEST_ARGS ?=

.PHONY: install test smoke lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@if [ "$(SYSTEM_TORCH)" = "1" ]; then \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	  grep -v '^torch==' constraints.txt > $(VENV)/constraints.txt; \
	else \
	  [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	  cp constraints.txt $(VENV)/constraints.txt; \
	fi
	$(PY) -m pip install -q --disable-pip-version-check -c $(VENV)/constraints.txt -e '.[test,lm-eval]'
	@touch $(STAMP)

test: install
	$(PY) -m pytest --durations=15 $(PYTEST_ARGS)

smoke: install
	$(PY) -m fope_megatron.smoke

lint: install
	$(PY) -m ruff check fope_megatron tests
	$(PY) -m ruff format --check fope_megatron tests

format: install
	$(PY) -m ruff format fope_megatron tests
	$(PY) -m ruff check --fix fope_megatron tests

bench: install
	$(PY) -m fope_megatron.bench.apply

clean:
	rm -rf $(VENV) build *.egg-info
