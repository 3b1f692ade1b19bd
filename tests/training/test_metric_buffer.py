"""Training metrics go out from a background buffer: a tracker that is down, slow or failing never
stops or slows training; rows are delivered in order once it is back; memory stays bounded."""

from __future__ import annotations

import logging
import threading

from hllm import testing
from hllm.training.metric_buffer import BackgroundMetrics
from hllm.training.trainer import train


class Tracker:
    """A tracking client that is down until ``up`` is set (each call then raises, like MLflow's
    client once its retries are spent), or that holds every call until ``release`` is set."""

    def __init__(self, down: bool = False, hold: bool = False):
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.calls = 0
        self.up = threading.Event()
        self.release = threading.Event()
        if not down:
            self.up.set()
        if not hold:
            self.release.set()

    def log_metrics(self, metrics, step):
        self.calls += 1
        self.release.wait(30)
        if not self.up.is_set():
            raise ConnectionError("tracking server unreachable (injected)")
        self.rows.append((step, dict(metrics)))


def test_rows_are_delivered_in_order_after_an_outage(caplog):
    tr = Tracker(down=True)
    with caplog.at_level(logging.WARNING, "hllm.training.metric_buffer"):
        sink = BackgroundMetrics(tr, max_rows=100, flush_s=10, retry_s=0.01, max_retry_s=0.02)
        for step in range(5):
            sink.log_metrics({"train/loss": float(step)}, step)
        while tr.calls < 3:  # the sender has failed a few times
            threading.Event().wait(0.01)
        assert tr.rows == [] and sink.pending() == 5
        tr.up.set()
        sink.close()
    assert [s for s, _ in tr.rows] == [0, 1, 2, 3, 4]
    assert [m["train/loss"] for _, m in tr.rows] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert sink.sent == 5 and sink.dropped == 0 and sink.failures >= 3
    text = caplog.text
    assert "tracking unavailable" in text and "ConnectionError" in text and "reachable again" in text
    assert text.count("tracking unavailable") == 1  # one warning per outage, not one per retry


def test_log_metrics_never_blocks_on_a_hung_tracker(caplog):
    tr = Tracker(hold=True)  # every call hangs until released (MLflow's client retrying a dead server)
    sink = BackgroundMetrics(tr, max_rows=100, flush_s=5, retry_s=0.01, slow_s=0.05)
    done = threading.Event()

    def trainer():
        for step in range(50):
            sink.log_metrics({"x": 1.0}, step)
        done.set()

    with caplog.at_level(logging.WARNING, "hllm.training.metric_buffer"):
        t = threading.Thread(target=trainer)
        t.start()
        assert done.wait(10), "log_metrics blocked while the tracker hung"
        while tr.calls == 0:
            threading.Event().wait(0.01)
        threading.Event().wait(0.1)  # the call in progress is now older than slow_s
        sink.log_metrics({"x": 1.0}, 50)
        assert tr.rows == []
        assert "tracking slow or unreachable: a metrics call has been pending" in caplog.text
        tr.release.set()
        sink.close()
    assert [s for s, _ in tr.rows] == list(range(51))
    assert "reachable again" in caplog.text


def test_a_full_buffer_drops_the_oldest_rows_and_says_so(caplog):
    tr = Tracker(down=True)
    with caplog.at_level(logging.WARNING, "hllm.training.metric_buffer"):
        sink = BackgroundMetrics(tr, max_rows=3, flush_s=10, retry_s=0.01, max_retry_s=0.02)
        for step in range(10):
            sink.log_metrics({"x": float(step)}, step)
        assert sink.pending() <= 3 and sink.dropped >= 7
        tr.up.set()
        sink.close()
    delivered = [s for s, _ in tr.rows]
    assert delivered[-3:] == [7, 8, 9]  # the newest survive
    assert len(delivered) == len(set(delivered)) and delivered == sorted(delivered)
    assert sink.sent + sink.dropped == 10
    assert "metrics buffer full (3 rows" in caplog.text
    assert f"{sink.dropped} metric rows were not delivered" in caplog.text


def test_close_gives_up_after_flush_s_and_reports_what_was_lost(caplog):
    tr = Tracker(down=True)  # never comes back
    with caplog.at_level(logging.WARNING, "hllm.training.metric_buffer"):
        sink = BackgroundMetrics(tr, max_rows=100, flush_s=0.3, retry_s=0.01, max_retry_s=0.02)
        sink.log_metrics({"x": 1.0}, 1)
        sink.log_metrics({"x": 2.0}, 2)
        sink.close()
    assert tr.rows == [] and sink.pending() == 2
    assert "2 metric rows were not delivered (0 dropped while the buffer was full, 2 still queued" in caplog.text


def test_training_completes_while_the_tracker_is_down(tmp_path, tiny_bert_dir, built_dir, caplog):
    """The real loop (tiny HLLM): every log_metrics raises, the run still trains, validates and saves."""
    cfg = testing.tiny_config(tmp_path, tiny_bert_dir, built_dir, **{
        "train.max_steps": 4, "train.log_every": 1, "train.checkpoint_every": 0,
        "tracking.metrics_flush_s": 0.2})  # fmt: skip
    tr = Tracker(down=True)
    with caplog.at_level(logging.WARNING, "hllm.training.metric_buffer"):
        res = train(cfg, logger=tr, progress=False)
    assert res.steps == 4 and res.last_checkpoint.exists()
    assert res.best_checkpoint is not None and res.best_checkpoint.exists()
    assert tr.calls >= 1 and tr.rows == []
    assert "tracking unavailable" in caplog.text and "were not delivered" in caplog.text
    # and with the tracker up, the same loop delivers every row (train/* per step, valid/* per epoch)
    cfg.train.run_name = "again"
    up = Tracker()
    res = train(cfg, logger=up, progress=False)
    steps = [s for s, m in up.rows if "train/loss" in m]
    assert steps == [1, 2, 3, 4]
    assert any(k.startswith("valid/") for _, m in up.rows for k in m)
