# Two commands do all set-up on a fresh machine with Python 3.11:
#   make train   -- create .venv, install apexq, train MountainCar-v0 on the embedded default
#   make test    -- create .venv, install apexq with test extras, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
ARGS   ?=

.PHONY: train test lint venv bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Pin torch first: on this CPU machine the 2.13.0 CPU wheel is on disk; a plain range would
	# fetch a multi-GB CUDA build. Users with GPUs install a CUDA torch 2.x before apexq instead.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test,lint]"
	touch $@

venv: $(BIN)/.installed

train: venv
	$(BIN)/apexq train $(ARGS)

test: venv
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q $(ARGS)

# ruff (lint + format check) and mypy on the packages, as Python imports them (apexq.*): mypy
# cannot follow the editable install's import hook, so .typecheck/apexq links the folders.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf .typecheck && mkdir -p .typecheck/apexq
	for p in core actors learner replay_server cluster configs; do ln -s ../../$$p .typecheck/apexq/$$p; done
	cd .typecheck && ../$(BIN)/mypy --config-file ../pyproject.toml -p apexq

# Each benchmark prints a table and, last, one JSON line (see benchmarks/*.py --help).
bench: venv
	$(BIN)/python benchmarks/replay.py --quick
	$(BIN)/python benchmarks/actors.py --quick
	$(BIN)/python benchmarks/learner.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache .typecheck
