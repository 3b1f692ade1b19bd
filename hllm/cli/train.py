"""`hllm train`: single process, or torchrun with ``--nproc N`` (DDP/FSDP, gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from hllm.cli.common import ParamsOpt, SetOpt, fail, load


def torchrun_command(nproc: int, params: Path, sets: list[str], resume: bool) -> list[str]:
    """The single-machine launch; for several machines run torchrun yourself (README)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "hllm.train", "--params", str(params)]
    for s in sets:
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    return cmd


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        params: ParamsOpt = Path("params.yaml"),
        sets: SetOpt = None,
        nproc: Optional[int] = typer.Option(
            None, "--nproc", "-n", min=1, help="processes on this machine (torchrun); default train.nproc"
        ),
        resume: bool = typer.Option(False, "--resume", help="continue the run from its latest checkpoint"),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="model kind: hllm | sasrec | pop (model.kind)"),
    ) -> None:
        """Train a model on the built dataset; checkpoints go to paths.runs_dir/train.run_name."""
        sets = list(sets or [])
        if model is not None:
            sets.append(f"model.kind={model}")
        cfg = load(params, sets)
        from hllm.models import kinds

        if cfg.model.kind not in kinds():
            fail(f"model.kind {cfg.model.kind!r} is not registered; known: {kinds()}", code=2)
        n = nproc or cfg.train.nproc
        if n > 1:
            env = dict(os.environ)
            # torchrun otherwise sets 1 thread per process and warns about it
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
            cmd = torchrun_command(n, params, sets, resume)
            typer.echo("launching: " + " ".join(cmd), err=True)
            rc = subprocess.call(cmd, env=env)
            if rc != 0:
                fail(f"training failed (torchrun exit code {rc})", code=rc)
            from hllm.train import TrainResult

            result = TrainResult.load(Path(cfg.paths.runs_dir) / cfg.train.run_name)
        else:
            from hllm.train import train

            try:
                result = train(cfg, resume=resume)
            except (FileExistsError, FileNotFoundError, ValueError) as e:
                fail(str(e))
        best = f"{result.select_metric}={result.best_value:.5f} at step {result.best_step}" if result.best_value is not None else "n/a"
        typer.echo(f"run: {result.run_dir}\nsteps: {result.steps}\nbest: {best}\n"
                   f"best checkpoint: {result.best_checkpoint}\nlast checkpoint: {result.last_checkpoint}")
