"""Logging survives the stream it was set up under being closed (in-process CLI runs, test capture)."""

from __future__ import annotations

import io
import logging
import sys

from hllm.logs import setup_logging


def test_handler_follows_the_current_stderr(monkeypatch):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers[:] = [h for h in root.handlers if not getattr(h, "_hllm", False)]
        first = io.StringIO()
        monkeypatch.setattr(sys, "stderr", first)
        setup_logging("INFO")
        first.close()  # e.g. a CliRunner's captured stream after the command returned
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("hllm.test").info("still logging")
        assert "INFO hllm.test: still logging" in second.getvalue()
        assert "Logging error" not in second.getvalue()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_only_rank0_logs_info(monkeypatch):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers[:] = [h for h in root.handlers if not getattr(h, "_hllm", False)]
        out = io.StringIO()
        monkeypatch.setattr(sys, "stderr", out)
        setup_logging("INFO")
        monkeypatch.setenv("RANK", "1")
        logging.getLogger("hllm.test").info("rank one info")
        logging.getLogger("hllm.test").error("rank one error")
        assert "rank one info" not in out.getvalue()
        assert "rank one error" in out.getvalue()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
