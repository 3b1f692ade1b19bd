"""`hllm ab analyze|simulate`: decide an A/B test from the service logs, replay held-out users against it.

``analyze`` reads the exposure/outcome logs of ``hllm serve`` (:func:`hllm.abtest.analysis.analyze`), logs the
analysis as an MLflow run attached to the challenger, prints the decision and, with ``--apply``, acts on it
through the registry (ship: challenger -> champion, stop: end the test). ``simulate`` drives a running
service on 127.0.0.1 with simulated users from the built dataset's test split
(:func:`hllm.abtest.simulate.simulate`). Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

from hllm.cli.common import ParamsOpt, SetOpt, fail, load

app = typer.Typer(no_args_is_help=True)

LogDirOpt = Annotated[str, typer.Option("--log-dir", help="the service's exposure/outcome logs (folder or URI)")]


@app.command("analyze")
def analyze_cmd(
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
    log_dir: LogDirOpt = "reports/ab/logs",
    experiment: Annotated[
        str | None, typer.Option("--experiment", help="experiment id (default: the registry's running one)")
    ] = None,
    apply: Annotated[bool, typer.Option("--apply", help="act on the decision through the registry")] = False,
    k: Annotated[int, typer.Option("--k", min=1, help="hit@K: the top K of each slate")] = 10,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0001, max=0.5, help="false-positive rate")] = 0.05,
    mde: Annotated[float, typer.Option("--mde", min=0.001, help="relative effect the test is tuned to")] = 0.1,
    min_users: Annotated[int, typer.Option("--min-users", min=2, help="no ship before this many users")] = 200,
    max_days: Annotated[float, typer.Option("--max-days", min=0.0, help="stop a flat test after this")] = 28.0,
    look_hours: Annotated[float, typer.Option("--look-hours", min=0.0001, help="hours between looks")] = 24.0,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Analyse the A/B test (SRM, hit@K with CUPED, always-valid mSPRT, guardrails) and decide it."""
    from hllm.abtest.analysis import analyze

    cfg = load(params, sets)
    try:
        res = analyze(
            cfg,
            log_dir,
            experiment,
            alpha=alpha,
            k=k,
            mde=mde,
            min_units=min_users,
            max_days=max_days,
            look_every=timedelta(hours=look_hours),
            decide_and_apply=apply,
        )
    except ValueError as e:
        fail(str(e), code=2)
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=2))
        return
    typer.echo(res.report_markdown())
    typer.echo(f"decision: {res.verdict} (MLflow run {res.run_id})")
    if res.applied is not None:
        typer.echo(f"registry: {res.applied['message']}")


@app.command("simulate")
def simulate_cmd(
    url: Annotated[str, typer.Option("--url", help="the running service (loopback only)")] = "http://127.0.0.1:8000",
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
    users: Annotated[int, typer.Option("--users", min=1, help="simulated users")] = 500,
    days: Annotated[int, typer.Option("--days", min=1, help="traffic phases; users enter on a random one")] = 1,
    requests: Annotated[int, typer.Option("--requests-per-user", min=1, help="at most one a day")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="random seed (users, clicks)")] = 0,
    k: Annotated[int, typer.Option("--k", min=1, max=100, help="slate size requested")] = 10,
    planted_lift: Annotated[
        float | None, typer.Option("--planted-lift", help="relative consume lift when the challenger serves")
    ] = None,
    max_requests: Annotated[int, typer.Option("--max-requests", min=1, help="hard bound on requests")] = 20_000,
    time_limit_s: Annotated[float, typer.Option("--time-limit-s", min=1.0, help="hard bound on run time")] = 600.0,
    log_dir: Annotated[
        str | None, typer.Option("--log-dir", help="the service's log dir: write the CUPED covariates there")
    ] = None,
) -> None:
    """Replay held-out users (test split of the built dataset) against the service; position-biased clicks."""
    from hllm.abtest.simulate import simulate

    cfg = load(params, sets)
    try:
        rep = simulate(
            cfg,
            url=url,
            n_users=users,
            days=days,
            requests_per_user=requests,
            seed=seed,
            k=k,
            planted_lift=planted_lift,
            max_requests=max_requests,
            time_limit_s=time_limit_s,
            covariates_out=log_dir,
        )
    except (ValueError, FileNotFoundError) as e:
        fail(str(e), code=2)
    typer.echo(json.dumps(rep.to_dict(), indent=2))
