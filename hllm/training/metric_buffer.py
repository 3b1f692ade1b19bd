"""Training metrics that never stop training: a background sender with a bounded buffer.

The trainer calls ``log_metrics`` every ``train.log_every`` steps. Sent straight to a tracking
server, one call blocks while the server is slow, and raises once it is down (MLflow's client
retries for about two minutes first), which would kill a night of training for a lost loss curve.
:class:`BackgroundMetrics` puts each row in a queue and returns at once; one daemon thread sends
the rows in order through the wrapped logger. While sending fails, the thread keeps the rows and
retries with a capped back-off; it warns once when the outage starts (a call that fails, or one still
pending after ``slow_s``: MLflow's client itself retries an unreachable server for minutes), once when the buffer starts
dropping its oldest rows (at most ``max_rows`` are held: memory bounded by config, not by run
length), and once when delivery resumes. ``close`` waits up to ``flush_s`` for the rest, then
reports what was never delivered. The wrapped logger needs no changes and no thread-safety: only
the sender thread calls it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Protocol

log = logging.getLogger(__name__)


class _Logger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class BackgroundMetrics:
    """``log_metrics`` in the background; see the module docstring."""

    def __init__(self, inner: _Logger, max_rows: int = 10_000, flush_s: float = 120.0, retry_s: float = 5.0,
                 max_retry_s: float = 60.0, slow_s: float = 10.0):  # fmt: skip
        self.inner = inner
        self.max_rows = max(1, int(max_rows))
        self.flush_s = flush_s
        self.retry_s, self.max_retry_s, self.slow_s = retry_s, max_retry_s, slow_s
        self.sent = 0
        self.dropped = 0
        self.failures = 0
        self._rows: collections.deque[tuple[dict[str, float], int]] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._deadline = float("inf")  # set by close(): the sender gives up after it
        self._outage_since: float | None = None
        self._sending_since: float | None = None  # start of the sender's call in progress
        self._warned_drop = False
        self._thread = threading.Thread(target=self._run, name="metrics-sender", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the trainer's side

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue one row; never blocks on the tracking server, never raises because of it."""
        with self._cv:
            if len(self._rows) >= self.max_rows:
                self._rows.popleft()  # the oldest row goes: the newest say most about the run now
                self.dropped += 1
                if not self._warned_drop:
                    self._warned_drop = True
                    log.warning("metrics buffer full (%d rows, tracking unreachable): dropping the oldest rows; "
                                "training goes on", self.max_rows)  # fmt: skip
            self._rows.append((dict(metrics), int(step)))
            self._cv.notify()
            since = self._sending_since
            if since is not None and self._outage_since is None and time.monotonic() - since > self.slow_s:
                self._outage_since = since
                log.warning("tracking slow or unreachable: a metrics call has been pending for %.0f s; %d rows "
                            "buffered (up to %d); training goes on", time.monotonic() - since, len(self._rows),
                            self.max_rows)  # fmt: skip

    def pending(self) -> int:
        with self._cv:
            return len(self._rows)

    def close(self) -> None:
        """Deliver what is left within ``flush_s``; then report what never reached the tracker."""
        with self._cv:
            self._closing = True
            self._deadline = time.monotonic() + self.flush_s
            self._cv.notify()
        self._thread.join(self.flush_s + 1.0)
        left = self.pending()
        if left or self.dropped:
            log.warning("tracking: %d metric rows were not delivered (%d dropped while the buffer was full, "
                        "%d still queued after %.0f s); the run's checkpoints and history.json have them",
                        left + self.dropped, self.dropped, left, self.flush_s)  # fmt: skip

    def __enter__(self) -> BackgroundMetrics:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ the sender thread

    def _run(self) -> None:
        delay = self.retry_s
        while True:
            with self._cv:
                while not self._rows and not self._closing:
                    self._cv.wait()
                if not self._rows or time.monotonic() > self._deadline:  # closing: all sent, or out of time
                    return
                metrics, step = self._rows[0]
                self._sending_since = time.monotonic()
            try:
                self.inner.log_metrics(metrics, step)
            except Exception as e:  # noqa: BLE001 - any tracker failure: keep the row, training goes on
                self._sending_since = None
                self.failures += 1
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.warning("tracking unavailable (%s: %s): metrics are buffered (up to %d rows) and "
                                "retried; training goes on", type(e).__name__, e, self.max_rows)  # fmt: skip
                with self._cv:
                    # closing: retry every second until close()'s deadline
                    self._cv.wait(min(delay, 1.0) if self._closing else delay)
                delay = min(delay * 2, self.max_retry_s)
                continue
            with self._cv:
                self._sending_since = None
                if self._rows and self._rows[0][0] is metrics:  # not dropped meanwhile by a full buffer
                    self._rows.popleft()
            self.sent += 1
            delay = self.retry_s
            if self._outage_since is not None:
                log.warning("tracking reachable again after %.0f s: delivering %d buffered metric rows",
                            time.monotonic() - self._outage_since, self.pending())  # fmt: skip
                self._outage_since = None
