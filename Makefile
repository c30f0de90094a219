# fope-megatron: `make smoke` and `make test` set everything up on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
# SYSTEM_TORCH=1: reuse the torch already installed in $(PYTHON) (a cluster container with a CUDA
# build). The venv then sees system site-packages and torch/triton are dropped from the constraints.
SYSTEM_TORCH ?= 0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fope-installed
PYTEST_ARGS ?=

.PHONY: install test test-fast smoke lint format bench wheelhouse gpu-check study study-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@if [ "$(SYSTEM_TORCH)" = "1" ]; then \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	  grep -v -e '^torch==' -e '^triton==' constraints.txt > $(VENV)/constraints.txt; \
	else \
	  [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	  cp constraints.txt $(VENV)/constraints.txt; \
	fi
	$(PY) -m pip install -q --disable-pip-version-check -c $(VENV)/constraints.txt -e '.[test,lm-eval]'
	@touch $(STAMP)

# Two test tiers. `make test`: every test, what CI runs (.ci/run), about 20 minutes on 2 cores: real
# trainings under torchrun / the DeepSpeed launcher, SIGKILLed ranks, a local Slurm cluster.
# `make test-fast`: unit and numerics tests only, under 5 minutes on 2 cores, for the edit-test
# loop. It leaves out these markers (pyproject.toml, [tool.pytest.ini_options]): integration
# (starts the trainer, a CLI or a script in child processes), slow (over ~15 s), slurm, gpu and
# kernel_variant (the kernel along paths its shapes do not pick; every path training takes is in).
FAST_TESTS := not integration and not slow and not slurm and not gpu and not kernel_variant

test: install
	$(PY) -m pytest --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "$(FAST_TESTS)" --durations=10 $(PYTEST_ARGS)

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

# Offline wheels for a GPU node without network (megatron-core, deepspeed, ...; git-ignored).
wheelhouse: install
	BUILD_PYTHON=$(PY) scripts/build_wheelhouse.sh wheelhouse

# On the GPU node (Python with a CUDA torch, no network): install offline from ./wheelhouse, run
# the kernel tests on CUDA, the benchmark and three short 1B-class trainings -> docs/results/gpu/.
GPU_CHECK_ARGS ?=
gpu-check:
	scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# Issue 11's length-generalization study: CPU (tiny twins, 61 min measured on 2 cores) / GPU (60M twins).
STUDY_ARGS ?=
study: install
	$(PY) -m fope_megatron.study --out docs/results/study --runs-dir runs/study $(STUDY_ARGS)

study-gpu:
	scripts/length_study_gpu.sh $(STUDY_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
