# `make test` creates .venv (CPU torch, the package editable with its dev extra) and runs the CPU test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A plain `pip install torch` from PyPI is a multi-GB CUDA build. This machine kind keeps the CPU wheel in
# /opt/wheels; elsewhere pip takes it from PyTorch's CPU index.
TORCH_SPEC ?= torch==2.13.0
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*cpu*.whl),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: install test test-gpu lint format

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SOURCE) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .
