# Everything a user or CI needs; each target creates/updates .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline-safe, telemetry-free defaults (see docs/operations.md, "Environment").
export DO_NOT_TRACK ?= true
export MLFLOW_DISABLE_TELEMETRY ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export DVC_NO_ANALYTICS ?= 1
export ITERATIVE_DO_NOT_TRACK ?= 1
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export GX_ANALYTICS_ENABLED ?= false

.PHONY: install run lint test test-faults test-replay test-integration test-all mlflow-ui bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	# torch==2.13.0 in the same call, so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install  ## the nightly retraining flow on the embedded default data
	$(BIN)/hllm flows run nightly

lint: install  ## ruff (lint + format) and mypy on the library and the flows
	$(BIN)/ruff check hllm flows
	$(BIN)/ruff format --check hllm flows
	$(BIN)/mypy

test: install lint  ## lint, then unit + slow tests (no external services needed)
	$(BIN)/python -m pytest -m "not integration and not faults and not replay" -q

test-faults: install  ## fault injection: SIGKILL/SIGTERM real nightly runs, the next run recovers
	$(BIN)/python -m pytest -m faults -q

test-replay: install  ## the A/B service under replayed traffic (hot swap under load, A/A and A/B replays)
	$(BIN)/python -m pytest -m replay -q

test-integration: install  ## local production stack (PostgreSQL, moto S3, mlflow/prefect servers)
	$(BIN)/python -m pytest -m integration -q

test-all: test test-faults test-replay test-integration

mlflow-ui: install  ## the MLflow UI over the local store, on http://127.0.0.1:5000 (MLFLOW_PORT=... to change)
	MLFLOW=$(BIN)/mlflow mlflow/ui.sh

clean:
	rm -rf data/built reports runs exports .pytest_cache
