#!/usr/bin/env bash
# The MLflow UI (and tracking server) over the local store: mlflow/mlflow.db + mlflow/artifacts/.
# `make mlflow-ui` runs this. Host/port: MLFLOW_HOST / MLFLOW_PORT (default 127.0.0.1:5000).
set -euo pipefail
cd "$(dirname "$0")/.."
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
mkdir -p mlflow/artifacts
# The job runner forks ~5 huey consumers for MLflow's GenAI features; nothing here uses them.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
echo "MLflow UI on http://${host}:${port} (store: sqlite:///$PWD/mlflow/mlflow.db)"
# MLflow 3 opens on its GenAI side until a browser picks "Model training" (top left) once
echo "experiments: http://${host}:${port}/#/experiments?workflowType=machine_learning"
# Runs logged by hllm keep their artifacts at file://$PWD/mlflow/artifacts (set per experiment);
# --artifacts-destination is where experiments created through this server put theirs.
exec "${MLFLOW:-.venv/bin/mlflow}" server \
  --backend-store-uri "sqlite:///$PWD/mlflow/mlflow.db" \
  --artifacts-destination "$PWD/mlflow/artifacts" \
  --host "$host" --port "$port" --workers 1
