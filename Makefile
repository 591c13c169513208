# `make demo` and `make test` each set themselves up on a fresh clone (venv + pinned install).
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
# The demo and the tests never reach the model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
CORES ?= 2

.PHONY: install demo test test-fast lint schema clean

$(VENV)/.installed: pyproject.toml envs/constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c envs/constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	snakemake --cores $(CORES)

lint: install
	ruff check .
	ruff format --check .
	snakemake --lint

# The config schema and README's settings reference, from each stage's settings.py.
schema: install
	python -m snaketune.schema

# Everything, slow tests included: what CI runs.
test: lint
	pytest -m "slow or not slow" --durations=25

test-fast: install
	pytest

clean:
	rm -rf results .snakemake
