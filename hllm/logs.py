"""Logging setup: one format everywhere, quiet on every rank but 0 under torchrun."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


class _Rank0Filter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003
        return is_rank0() or record.levelno >= logging.ERROR


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is *now*. A handler bound to the stream
    of the moment breaks once that stream closes (a test runner's capture, a
    CLI invoked in-process), and every later record then fails."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: str | int = "INFO") -> None:
    """Idempotent; called by the CLI and by torchrun entry points, never at import."""
    root = logging.getLogger()
    if any(getattr(h, "_hllm", False) for h in root.handlers):
        root.setLevel(level)
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_Rank0Filter())
    handler._hllm = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("urllib3", "botocore", "filelock", "httpx", "alembic", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
