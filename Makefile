# Two set-up commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned here (the CPU build on this machine); an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: venv test lint typecheck pytest demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH_PIN)"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check lightning_bagpipe tests examples
	$(BIN)/ruff format --check lightning_bagpipe tests examples

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

demo: venv
	$(BIN)/python examples/deepfm.py

clean:
	rm -rf $(VENV) build dist *.egg-info
