# `make run`: the whole pipeline on the built-in data. `make test`: the test suite.
# Both create .venv and install the project into it first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned exactly: a looser spec resolved by other packages pulls a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: run test lint format install bench-deps status clean clean-all

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# What benchmarks/codebook_*.py need besides the project (never runtime dependencies).
bench-deps: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,bench]"

run: $(BIN)/.installed
	$(BIN)/vqpipe run

status: $(BIN)/.installed
	$(BIN)/vqpipe status

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# ruff's settings are in pyproject.toml; `make format` rewrites, `make lint` only checks.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# `make clean`: the pipeline's outputs only (the next `make run` recomputes them, or `vqpipe pull`
# restores them). The MLflow store (every run, the model registry) and training checkpoints go
# only with `make clean-all`.
clean:
	rm -rf data models samples eval metrics plots dvc.lock

clean-all: clean
	rm -rf checkpoints mlflow.db mlruns mlartifacts
