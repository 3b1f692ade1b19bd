"""Logging survives the stream it was set up under being closed (in-process CLI runs, test capture)."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from hllm.logs import setup_logging


@pytest.fixture
def fresh_root():
    """Root logger without our handler, restored afterwards (other tests share it)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = [h for h in handlers if not getattr(h, "_hllm", False)]
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_handler_follows_the_current_stderr(fresh_root, monkeypatch):
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging("INFO")
    first.close()  # e.g. a CliRunner's captured stream after the command returned
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("hllm.test").info("still logging")
    assert "INFO hllm.test: still logging" in second.getvalue()
    assert "Logging error" not in second.getvalue()


def test_only_rank0_logs_info(fresh_root, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    setup_logging("INFO")
    monkeypatch.setenv("RANK", "1")
    logging.getLogger("hllm.test").info("rank one info")
    logging.getLogger("hllm.test").error("rank one error")
    assert "rank one info" not in out.getvalue()
    assert "rank one error" in out.getvalue()
