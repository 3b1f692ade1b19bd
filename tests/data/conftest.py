"""Fixtures for the data-layer tests: a config whose paths all live in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from hllm.config import Config, load_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FORMATS = FIXTURES / "formats"
BAD = FIXTURES / "bad"


def make_cfg(tmp: Path, *overrides: str) -> Config:
    return load_config(None, [
        f"paths.raw_dir={tmp / 'data' / 'raw'}",
        f"paths.built_dir={tmp / 'data' / 'built'}",
        f"paths.reports_dir={tmp / 'reports'}",
        "validate.data_docs=false",  # HTML rendering costs ~0.5 s; test_data_validate covers it explicitly
        *overrides,
    ])


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_cfg(tmp_path)


@pytest.fixture
def tiny_synth() -> list[str]:
    """Synth params small enough for a sub-second generate, big enough to survive k-core."""
    return ["synth.n_users=60", "synth.n_items=80", "synth.min_seq_len=6", "synth.max_seq_len=12"]
