# Two set-up commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned here (the CPU build on this machine); an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# Where pip finds torch: empty uses pip's configuration (this machine's has the CPU build). Elsewhere,
# `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` gets the CPU build instead of CUDA's.
TORCH_INDEX ?=

.PHONY: venv test lint typecheck pytest demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_PIN)"
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

# Every benchmark suite at its defaults, with the optional peers (TorchRec, matplotlib): JSON and PNG in
# $(BENCH_OUT)/ (docs/benchmarks.md explains them). About 8 minutes on 2 cores. scale refuses to start
# unless ~40 GB are free: its files are sparse and allocate far less, but that is their worst case.
BENCH_OUT ?= bench-results
BENCH_ENV := GOMP_SPINCOUNT=10000
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -e ".[plot,torchrec]"
	$(BIN)/pip install --no-deps torchrec==1.8.0
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	mkdir -p $(BENCH_OUT)
	$(BENCH_ENV) $(BIN)/lightning-bagpipe bench oracle --json $(BENCH_OUT)/oracle.json
	$(BENCH_ENV) $(BIN)/lightning-bagpipe bench train --json $(BENCH_OUT)/train.json --plot $(BENCH_OUT)/train.png
	$(BENCH_ENV) $(BIN)/lightning-bagpipe bench distributed --json $(BENCH_OUT)/distributed.json \
		--plot $(BENCH_OUT)/distributed.png
	$(BENCH_ENV) $(BIN)/lightning-bagpipe bench cache --json $(BENCH_OUT)/cache.json --plot $(BENCH_OUT)/cache.png
	$(BENCH_ENV) $(BIN)/lightning-bagpipe bench scale --json $(BENCH_OUT)/scale.json --plot $(BENCH_OUT)/scale.png

clean:
	rm -rf $(VENV) build dist *.egg-info
