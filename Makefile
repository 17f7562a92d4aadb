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

# The main job: GRPO + token IS + multi-criterion RS on the embedded default (tiny model, 2-digit
# addition), warm start included, tracked in ./mlflow.db. Extra overrides: make run ARGS='k=v ...'
run: setup
	$(BIN)/rcx train --preset grpo-multi-rs $(ARGS)

lint: setup
	$(BIN)/ruff check rcx tests bench
	$(BIN)/ruff format --check rcx tests bench

bench: setup
	$(BIN)/python bench/correction.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/step.py
	$(BIN)/python bench/whatif.py

# The mismatch study (issue 7): ~22 min on 2 cores; results in bench/results/. QUICK: make study ARGS=--quick
study: setup
	$(BIN)/python bench/mismatch_study.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
