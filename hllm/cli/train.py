"""`hllm train`: single process, or torchrun with ``--nproc N`` (DDP/FSDP, gloo on CPU, NCCL on GPU).

Every training is an MLflow run (``hllm.ops.tracking.training_run``: config, git commit, data version
and lineage, system info, per-window training metrics, per-epoch validation, the loss curve, and
the best checkpoint's test evaluation under the protocol hash), so its id can go straight to
``hllm registry register --run-id``. ``--no-mlflow`` or ``tracking.enabled: false`` skips it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from hllm.cli.common import ParamsOpt, SetOpt, fail, load
from hllm.data import versioning

if TYPE_CHECKING:
    from hllm.ops.tracking import Tracker


def _taken(cfg) -> bool:
    """The check ``hllm.training.trainer.train`` makes, done before an MLflow run is opened for nothing."""
    from hllm.models.loading import latest_checkpoint

    run_dir = Path(cfg.paths.runs_dir) / cfg.train.run_name
    return latest_checkpoint(run_dir) is not None or (run_dir / "best").exists()


def _ui_hint(cfg, tracker) -> str:
    from flows.report import RunReport
    from hllm.ops import tracking

    uri = tracking.resolve_tracking_uri(cfg)
    rep = RunReport(tracking_uri=uri, experiment_id=tracker.client.get_run(tracker.run_id).info.experiment_id)
    return (
        f"MLflow run {tracker.run_id} (experiment {cfg.tracking.experiment!r}, {uri})\n"
        f"  UI: {rep.ui_command()}\n  then {rep.run_url(tracker.run_id)}"
    )


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        params: ParamsOpt = Path("params.yaml"),
        sets: SetOpt = None,
        nproc: int | None = typer.Option(
            None, "--nproc", "-n", min=1, help="processes on this machine (torchrun); default train.nproc"
        ),
        resume: bool = typer.Option(
            False, "--resume", help="continue the run (and its MLflow run) from its latest checkpoint"
        ),
        model: str | None = typer.Option(
            None, "--model", "-m", help="model kind: hllm | sasrec | gru4rec | pop (model.kind)"
        ),
        mlflow: bool = typer.Option(
            True, "--mlflow/--no-mlflow", help="log the run to MLflow (default unless tracking.enabled is false)"
        ),
        time_budget: float | None = typer.Option(
            None,
            "--time-budget",
            min=0,
            help="seconds of training after which the run validates, keeps its best checkpoint and stops "
            "(train.time_budget_s)",
        ),
        test: bool = typer.Option(
            True,
            "--test/--no-test",
            help="with MLflow: evaluate the best checkpoint on the test split and log it "
            "(what `hllm registry promote` gates on)",
        ),
    ) -> None:
        """Train a model on the built dataset; checkpoints go to paths.runs_dir/train.run_name."""
        sets = list(sets or [])
        if time_budget is not None:
            sets.append(f"train.time_budget_s={time_budget}")
        if model is not None:
            sets.append(f"model.kind={model}")
        cfg = load(params, sets)
        from hllm.models import kinds

        if cfg.model.kind not in kinds():
            fail(f"model.kind {cfg.model.kind!r} is not registered; known: {kinds()}", code=2)
        if not resume and _taken(cfg):
            fail(
                f"{Path(cfg.paths.runs_dir) / cfg.train.run_name} already holds checkpoints: pass --resume to "
                "continue it, or choose another train.run_name (nothing was overwritten)"
            )
        n = nproc or cfg.train.nproc
        track = mlflow and cfg.tracking.enabled
        scope: contextlib.AbstractContextManager[Tracker | None] = contextlib.nullcontext(None)
        if track:
            from hllm.ops import tracking

            scope = tracking.training_run(cfg, resume=resume, world_size=n)
        with scope as tracker:
            if tracker is not None:
                typer.echo(_ui_hint(cfg, tracker), err=True)
            result = _train(cfg, params, sets, n, resume, tracker)
            if tracker is not None:
                tracker.log_train_result(result)
                if test:
                    _log_test(cfg, result, tracker)
        best = (
            f"{result.select_metric}={result.best_value:.5f} at step {result.best_step}"
            if result.best_value is not None
            else "n/a"
        )
        typer.echo(
            f"run: {result.run_dir}\nsteps: {result.steps}\nbest: {best}\n"
            f"best checkpoint: {result.best_checkpoint}\nlast checkpoint: {result.last_checkpoint}"
        )
        if tracker is not None:
            typer.echo(f"mlflow run: {tracker.run_id}")


def _train(cfg, params: Path, sets: list[str], n: int, resume: bool, tracker):
    if n > 1:
        from hllm.ops import tracking
        from hllm.training.launch import LaunchError, run_torchrun

        try:  # rank 0 logs into this run (hllm.cli.worker.main)
            return run_torchrun(
                cfg,
                n,
                params=params,
                sets=sets,
                resume=resume,
                run_id=tracker.run_id if tracker is not None else None,
                tracking_uri=tracking.resolve_tracking_uri(cfg) if tracker is not None else None,
            )
        except LaunchError as e:
            fail(str(e), code=e.returncode)
    from hllm.training.trainer import train

    try:
        return train(cfg, resume=resume, logger=tracker)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        fail(str(e))


def _log_test(cfg, result, tracker) -> None:
    """The best checkpoint's test metrics + per-user arrays under eval/test/<protocol>/<data version>/,
    as the nightly flow's evaluate task logs them (the validation table cached at training time
    spares the item encoding)."""
    from hllm.evaluation import metrics as M
    from hllm.evaluation.evaluate import evaluate_checkpoint

    ckpt = result.best_checkpoint or result.last_checkpoint
    try:
        res = evaluate_checkpoint(ckpt, cfg, ("test",))["test"]
    except (FileNotFoundError, ValueError) as e:
        fail(f"test evaluation of {ckpt}: {e}")
    tracker.log_eval_result(res, versioning.data_version(cfg).version)
    typer.echo(M.format_table({"test": res.metrics}, cfg.eval.protocol.ks))
