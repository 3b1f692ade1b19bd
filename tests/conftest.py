"""Shared test setup: offline, telemetry-free environment before any library import."""

from __future__ import annotations

import os

import pytest

for _k, _v in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "DVC_NO_ANALYTICS": "1",
    "ITERATIVE_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GX_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session", autouse=True)
def _default_mlflow_store_outside_the_repo(tmp_path_factory):
    """`hllm train` logs to MLflow by default, and without tracking.tracking_uri or
    $MLFLOW_TRACKING_URI the store is ./mlflow/mlflow.db: a test running the CLI from the repository
    would write into the repository's store. Tests that check a store set their own URI."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        yield
        return
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow-default') / 'mlflow.db'}"
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
