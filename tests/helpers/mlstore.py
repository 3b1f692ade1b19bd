"""Fixtures for the MLflow tests: one real SQLite store per session (creating its schema takes
seconds), a fresh registered-model name and experiment per test, a tiny built dataset."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from hllm.config import Config
from tests.helpers.reghelpers import SEQS, write_built

_counter = itertools.count()


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlstore")
    write_built(root / "data" / "built", SEQS)
    write_built(root / "data" / "built2", [s[::-1] for s in SEQS])  # another dataset version
    (root / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data/raw\n")
    return root


@pytest.fixture
def cfg(store: Path, monkeypatch) -> Config:
    monkeypatch.chdir(store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("HLLM_ACTOR", "tester")
    n = next(_counter)
    c = Config()
    c.tracking.tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
    c.tracking.experiment = f"exp-{n}"
    c.registry.model_name = f"model-{n}"
    c.registry.audit_experiment = f"audit-{n}"
    c.registry.bootstrap_samples = 500
    return c


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    from tests.helpers.reghelpers import train_tiny

    return train_tiny(tmp_path_factory.mktemp("tiny"))
