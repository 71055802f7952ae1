# Two entry points (see README): `make run` sets everything up and runs the pipeline on the
# built-in sample; `make test` sets up and runs the tests. Both create .venv on first use.
VENV ?= .venv
# The development environment: the tests' tools and the optional Ray runner (the tests exercise it).
# A user's lean install is `pip install -e .`.
EXTRAS ?= test,ray
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
# dvc.yaml's commands call `python`: put the project's environment first on PATH.
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[$(EXTRAS)]'
	touch $@

run: setup
	dvc repro

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
