"""Failpoints: named places where a test can kill this process, the way etcd's gofail and
FoundationDB's simulation test themselves (crash at every step, then check that the next run recovers).

``point("register:artifacts-logged")`` does nothing unless the environment variable
``HLLM_FAILPOINTS`` (comma-separated names, exact match) names it; then it logs one line and
SIGKILLs its own process: no ``finally``, no ``atexit``, no flushing, exactly what the OOM killer, a
preempted node or a power cut does. The fault-injection suite (``tests/helpers/faultkit.py``,
``benchmarks/faults.py``) sets the variable for one real ``hllm flows run nightly`` and then checks
that the next run recovers with nothing half-written.

Zero cost when unset: the variable is read once per process (a set lookup per point after that).
Core module: only the standard library, so any layer can place a point.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "HLLM_FAILPOINTS"
TRAIL_ENV = "HLLM_FAILPOINTS_TRAIL"  # optional: a file each fired failpoint appends "<name> <pid>" to

log = logging.getLogger(__name__)

_armed: frozenset[str] | None = None


def armed() -> frozenset[str]:
    """The failpoint names ``HLLM_FAILPOINTS`` sets (read once per process)."""
    global _armed
    if _armed is None:
        _armed = frozenset(n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip())
    return _armed


def is_armed(name: str) -> bool:
    return name in armed()


def point(name: str) -> None:
    """SIGKILL this process here when ``HLLM_FAILPOINTS`` names ``name``; otherwise nothing."""
    if _armed is not None and not _armed:  # the common case: nothing armed, already read
        return
    if name in armed():
        kill(name)


def kill(name: str, pids: tuple[int, ...] = ()) -> None:
    """Log, then SIGKILL ``pids`` (e.g. a parent) and this process. Never returns."""
    msg = f"failpoint {name}: SIGKILL pid {os.getpid()}"
    log.warning(msg)
    # the log handler may buffer or go through a queue (Prefect's): the line must reach the log file
    # before the kill, so it also goes straight to stderr (unbuffered fd write)
    os.write(2, (msg + "\n").encode())
    trail = os.environ.get(TRAIL_ENV)
    if trail:  # a child's stderr may be a pipe that dies with its reader: the harness reads this file
        with open(trail, "a", encoding="utf-8") as f:
            f.write(f"{name} {os.getpid()}\n")
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def _reset() -> None:
    """Forget the cached variable (tests that change it in-process)."""
    global _armed
    _armed = None
