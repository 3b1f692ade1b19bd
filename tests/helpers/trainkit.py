"""Helpers for the training tests."""

from __future__ import annotations

from typing import Any


def crash_at(monkeypatch: Any, at: int) -> None:
    """Kill the run (KeyboardInterrupt, as Ctrl-C) when step ``at`` starts: in the loop itself, since
    metrics leave from a background thread (hllm.training.metric_buffer) where a raise stops nothing."""
    from hllm.training import trainer

    real = trainer._Trainer._train_step

    def step(self, step, *a):
        if step >= at:
            raise KeyboardInterrupt(f"killed at step {step}")
        return real(self, step, *a)

    monkeypatch.setattr(trainer._Trainer, "_train_step", step)
