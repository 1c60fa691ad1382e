# Two commands set everything up from a fresh clone (see README.md):
#   make demo   installs everything, then opens napari with the sample and live training
#   make test   installs everything, then runs the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench system-deps env clean

demo: system-deps $(STAMP)
	$(BIN)/napari-dsparse demo

test: system-deps $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_sparse.py
	$(BIN)/python benchmarks/bench_quality.py
	$(BIN)/python benchmarks/bench_latency.py
	$(BIN)/python benchmarks/bench_large.py
	xvfb-run -a $(BIN)/python benchmarks/bench_ui.py
	xvfb-run -a $(BIN)/python benchmarks/soak.py  # 10 minutes

system-deps:
	./scripts/system-deps.sh

env: $(STAMP)

# torch first, through the constraint: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV)
