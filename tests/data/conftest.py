"""Fixtures for the data-layer tests: a config whose paths all live in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from hllm.config import Config
from tests.helpers.datakit import make_cfg


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_cfg(tmp_path)


@pytest.fixture
def tiny_synth() -> list[str]:
    """Synth params small enough for a sub-second generate, big enough to survive k-core."""
    return ["synth.n_users=60", "synth.n_items=80", "synth.min_seq_len=6", "synth.max_seq_len=12"]
