"""Cost of the promotion gate's paired bootstrap, and of MLflow logging from the training loop.

    .venv/bin/python benchmarks/registry_gate.py                   # 10k / 100k / 1M users, 1000 resamples
    .venv/bin/python benchmarks/registry_gate.py --users 100000 --samples 2000

1. ``hllm.ops.gate.paired_bootstrap`` on synthetic per-user arrays (wall time; its memory is bounded
   by blocks of ~4M indices whatever the user count);
2. ``Tracker.log_metrics`` of one training-step row (4 metrics) into a fresh SQLite store: the
   per-call cost the training loop pays every ``train.log_every`` steps.

Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def bench_bootstrap(users: int, samples: int) -> dict:
    from hllm.ops.gate import paired_bootstrap

    rng = np.random.default_rng(0)
    champ = rng.uniform(0, 1, users)
    cand = np.clip(champ + rng.normal(0.002, 0.05, users), 0, 1)
    t0 = time.perf_counter()
    mean, lo, hi = paired_bootstrap(cand, champ, samples, 0.95)
    return {
        "what": "paired_bootstrap",
        "users": users,
        "samples": samples,
        "seconds": round(time.perf_counter() - t0, 3),
        "mean_diff": round(mean, 5),
        "ci": [round(lo, 5), round(hi, 5)],
    }


def bench_log_metrics(steps: int) -> dict:
    from hllm.config import Config
    from hllm.ops import tracking

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config()
        cfg.tracking.tracking_uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        with tracking.start_run(cfg, "bench", log_data=False) as tr:
            tr.log_metrics({"train/loss": 1.0}, 0)  # warm: connection, first insert
            t0 = time.perf_counter()
            for s in range(1, steps + 1):
                tr.log_metrics(
                    {"train/loss": 1.0 / s, "train/scale": 14.0, "train/lr": 1e-4, "train/items_per_s": 1e3}, s
                )
            dt = time.perf_counter() - t0
    return {
        "what": "Tracker.log_metrics (4 metrics, SQLite)",
        "calls": steps,
        "ms_per_call": round(1000 * dt / steps, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--log-steps", type=int, default=200)
    args = ap.parse_args()
    for n in args.users:
        print(json.dumps(bench_bootstrap(n, args.samples)), flush=True)
    print(json.dumps(bench_log_metrics(args.log_steps)), flush=True)


if __name__ == "__main__":
    main()
