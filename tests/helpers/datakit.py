"""Helpers for the data-layer tests (a uniquely named module: `conftest` is ambiguous across test folders)."""

from __future__ import annotations

from pathlib import Path

from hllm.config import Config, load_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FORMATS = FIXTURES / "formats"
BAD = FIXTURES / "bad"


def make_cfg(tmp: Path, *overrides: str) -> Config:
    """A config whose paths all live under ``tmp``."""
    return load_config(
        None,
        [
            f"paths.raw_dir={tmp / 'data' / 'raw'}",
            f"paths.built_dir={tmp / 'data' / 'built'}",
            f"paths.reports_dir={tmp / 'reports'}",
            "validate.data_docs=false",  # HTML rendering costs ~0.5 s; test_data_validate covers it explicitly
            *overrides,
        ],
    )
