"""The offline, telemetry-free environment of the Makefile (docs/operations.md, "Environment"), set before
any library reads it: by tests/conftest.py for the suite and by benchmarks that drive the test harness."""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "ITERATIVE_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GX_ANALYTICS_ENABLED": "false",
}


def apply(**extra: str) -> None:
    """Set every default (and ``extra``) that the environment does not set already."""
    for k, v in {**OFFLINE_ENV, **extra}.items():
        os.environ.setdefault(k, v)
