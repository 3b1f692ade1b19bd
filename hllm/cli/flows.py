"""`hllm flows run nightly|promote|rollback`, `hllm flows serve`.

``run`` executes a flow in this process: with no ``PREFECT_API_URL`` Prefect starts a temporary
local API for the run (no server to set up), otherwise the run is recorded on that server.
``serve`` registers the deployments (nightly cron + manual promote/rollback) on the configured
Prefect API and executes their runs until interrupted.
"""

from __future__ import annotations

import os
import time
import typing
from pathlib import Path
from typing import Annotated

import typer

from hllm.cli.common import ParamsOpt, SetOpt, fail, load
from hllm.config import TrainBackend

BACKENDS: tuple[str, ...] = typing.get_args(TrainBackend)

app = typer.Typer(no_args_is_help=True)
run_app = typer.Typer(no_args_is_help=True)
app.add_typer(run_app, name="run", help="Run a flow here and now (in-process): nightly, promote, rollback.")


def _prefect_env() -> None:
    """Offline, telemetry-free defaults for direct CLI use (the Makefile exports the same)."""
    for k, v in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(k, v)


def _elapsed(t0: float) -> str:
    s = time.perf_counter() - t0
    return f"{int(s // 60)} min {s % 60:.0f} s"


@run_app.command("nightly")
def nightly(
    snapshot: Annotated[
        str | None,
        typer.Option(
            "--snapshot", help="folder or s3://bucket/prefix with the new data (default: flow.snapshot; '' = synthetic)"
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="raw (interactions/items.parquet) or hllm | amazon | movielens | recbole"),
    ] = None,
    nproc: Annotated[
        int | None, typer.Option("--nproc", "-n", min=1, help="training processes (torchrun when > 1)")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            "--train-backend",
            help="local | torchrun | k8s (a PyTorchJob, settings in flow.k8s); default flow.train_backend",
        ),
    ] = None,
    baselines: Annotated[
        bool, typer.Option("--baselines/--no-baselines", help="train and evaluate flow.baselines")
    ] = True,
    promote: Annotated[bool | None, typer.Option("--promote/--no-promote", help="run the promotion gate")] = None,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """The nightly retraining flow, once, in this process; ends with a summary and the elapsed time."""
    t0 = time.perf_counter()
    load(params, sets)  # config errors exit 2 here, before Prefect starts
    if backend is not None and backend not in BACKENDS:
        fail(f"--train-backend {backend!r}: expected one of {', '.join(BACKENDS)}", code=2)
    _prefect_env()
    from flows.nightly import nightly_retrain
    from flows.report import RunReport

    try:
        result = nightly_retrain(
            snapshot=snapshot,
            snapshot_format=fmt,
            nproc=nproc,
            train_backend=backend,
            params=str(params),
            overrides=list(sets or []),
            baselines=baselines,
            promote=promote,
        )
    except Exception as e:  # noqa: BLE001 - the flow run failed; its report says where and why
        report = getattr(e, "run_report", None)
        if report is not None:
            typer.echo("\n" + report.console())
        typer.echo(f"elapsed: {_elapsed(t0)}")
        fail(f"nightly-retrain failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return
    report = RunReport.from_dict(result)
    typer.echo("\n" + report.console())
    typer.echo(f"elapsed: {_elapsed(t0)}")


@run_app.command("promote")
def promote_cmd(
    version: Annotated[
        str | None, typer.Argument(help="model version (default with --to champion: the challenger)")
    ] = None,
    to: Annotated[
        str, typer.Option("--to", help="challenger (gate, start the A/B test) or champion (end it)")
    ] = "challenger",
    reason: Annotated[str, typer.Option("--reason", "-r", help="recorded in the tags and the audit log")] = "",
    share: Annotated[float | None, typer.Option("--share", help="challenger traffic share")] = None,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """The `promote` flow (same as `hllm registry promote`, recorded as a Prefect flow run)."""
    load(params, sets)
    _prefect_env()
    from flows.registry import promote
    from hllm.ops.registry import RegistryError

    try:
        res = promote(
            version=version, to=to, reason=reason, share=share, params=str(params), overrides=list(sets or [])
        )
    except RegistryError as e:
        fail(str(e))
        return
    typer.echo(res["message"])


@run_app.command("rollback")
def rollback_cmd(
    reason: Annotated[str, typer.Option("--reason", "-r", help="recorded in the tags and the audit log")] = "",
    expect_current: Annotated[
        str | None, typer.Option("--from", help="only roll back while this version is the champion (safe to retry)")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """The `rollback` flow (same as `hllm registry rollback`, recorded as a Prefect flow run)."""
    load(params, sets)
    _prefect_env()
    from flows.registry import rollback
    from hllm.ops.registry import RegistryError

    try:
        res = rollback(reason=reason, expect_current=expect_current, params=str(params), overrides=list(sets or []))
    except RegistryError as e:
        fail(str(e))
        return
    typer.echo(res["message"])


@app.command("serve")
def serve_cmd(
    cron: Annotated[
        str | None, typer.Option("--cron", help="schedule of the nightly deployment (default flow.cron)")
    ] = None,
    paused: Annotated[bool, typer.Option("--paused", help="register the schedule paused")] = False,
    limit: Annotated[int | None, typer.Option("--limit", help="flow runs this process executes at once")] = None,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Serve the nightly (on its cron), promote and rollback deployments from this process until Ctrl-C.

    The deployments are nightly-retrain/<flow.deployment>, promote/manual and rollback/manual. Needs a
    Prefect API: PREFECT_API_URL or `prefect server start`. Trigger by hand:
    prefect deployment run 'nightly-retrain/nightly'."""
    cfg = load(params, sets)
    _prefect_env()
    from prefect.settings import PREFECT_API_URL

    from flows.deploy import serve

    if not PREFECT_API_URL.value():
        typer.secho(
            "warning: PREFECT_API_URL is not set: the deployments live in a temporary local API that only "
            "this process sees; start `prefect server start` and export PREFECT_API_URL for a real one",
            fg=typer.colors.YELLOW,
            err=True,
        )
    serve(cfg, str(params), list(sets or []), cron=cron, paused=paused, limit=limit)
