# Two commands set everything up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup test test-all run lint bench study clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build first, so the open torch range in pyproject.toml installs nothing more.
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ''

run: setup
	$(BIN)/rcx validate --explain --preset rloo-seq-is
	$(BIN)/rcx validate --explain --preset grpo-multi-rs
	$(BIN)/rcx validate --explain --preset gae-seq-is-rs
	$(BIN)/rcx validate --explain --preset grpo-rs-only

lint: setup
	$(BIN)/ruff check rcx tests bench
	$(BIN)/ruff format --check rcx tests bench

bench: setup
	$(BIN)/python bench/correction.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/step.py
	$(BIN)/python bench/whatif.py

clean:
	rm -rf $(VENV) build *.egg-info
