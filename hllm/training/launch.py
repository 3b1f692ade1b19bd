"""Launching training under torchrun on this machine: one launcher for ``hllm train --nproc N`` and
the nightly flow's ``train`` task. (A PyTorchJob on Kubernetes: :mod:`hllm.training.k8s`.)

Every rank runs :mod:`hllm.cli.worker` on one resolved ``params`` file. When the caller opened an
MLflow run, its id and tracking URI go to the workers through the environment (``MLFLOW_RUN_ID``,
``MLFLOW_TRACKING_URI``) and rank 0 logs into it; this module itself never touches MLflow.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hllm.config import Config, save_config
from hllm.training.trainer import TrainResult

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """torchrun exited non-zero: the message names the exit code and the command."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def torchrun_command(nproc: int, params: str | Path, sets: Sequence[str] = (), resume: bool = False) -> list[str]:
    """The single-machine launch (``--standalone``); for several machines run torchrun yourself (docs/training.md)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={max(1, nproc)}",
        "-m",
        "hllm.cli.worker",
        "--params",
        str(params),
    ]
    for s in sets:
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    return cmd


def worker_env(nproc: int, run_id: str | None = None, tracking_uri: str | None = None) -> dict[str, str]:
    """The workers' environment: this one, one share of the cores per rank (torchrun otherwise sets
    1 thread and warns), and the MLflow run to log into, or none (a stale ``MLFLOW_RUN_ID`` from
    the shell must never receive this run's metrics)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    env.pop("MLFLOW_RUN_ID", None)
    if run_id is not None:
        env["MLFLOW_RUN_ID"] = run_id
        if tracking_uri:
            env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def run_torchrun(
    cfg: Config,
    nproc: int,
    *,
    params: str | Path | None = None,
    sets: Sequence[str] = (),
    resume: bool = False,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> TrainResult:
    """Train ``cfg`` under torchrun with ``nproc`` ranks and return the run's :class:`TrainResult`.

    ``params``: the file every rank loads (with ``sets`` applied); default the resolved ``cfg``,
    written to ``<run_dir>/launch-params.yaml`` so that the ranks see exactly what the caller saw."""
    run_dir = Path(cfg.paths.runs_dir) / cfg.train.run_name
    if params is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        params = run_dir / "launch-params.yaml"
        save_config(cfg, params)
        sets = ()
    cmd = torchrun_command(nproc, params, sets, resume)
    log.info("launching: %s", " ".join(cmd))
    rc = subprocess.call(cmd, env=worker_env(nproc, run_id, tracking_uri))
    if rc != 0:
        raise LaunchError(f"training failed: torchrun exited with code {rc} ({' '.join(cmd)})", rc)
    return TrainResult.load(run_dir)
