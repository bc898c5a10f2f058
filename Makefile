# loraforge: `make demo` runs the demo, `make test` the test suite; both set everything up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint up services

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, and the CPU build where there is no GPU: a bare `torch` pulls multi-GB
	# CUDA wheels. The +cpu build comes from a local wheel cache or PyTorch's CPU index.
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install "torch==$(TORCH_VERSION)"; \
	else \
	  $(PY) -m pip install "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
	  $(PY) -m pip install "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PY) -m pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/loraforge demo

services:
	bash .ci/services.sh

test: install services
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check app worker tests bench
	$(VENV)/bin/lint-imports
	$(PY) -m mypy

up: install
	$(VENV)/bin/loraforge db upgrade && $(VENV)/bin/loraforge up
