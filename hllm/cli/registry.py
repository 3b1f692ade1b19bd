"""`hllm registry list|promote|rollback|end-ab|register|reevaluate|attach-eval|audit`.

Refusals exit 1 with the reason on stderr and move nothing; config errors exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from hllm.cli.common import ParamsOpt, SetOpt, fail, load
from hllm.data import versioning

app = typer.Typer(no_args_is_help=True)

ReasonOpt = Annotated[str, typer.Option("--reason", "-r", help="why (recorded in the tags and the audit log)")]
ByOpt = Annotated[str | None, typer.Option("--by", help="who (default $HLLM_ACTOR or user@host)")]


def _run(fn, *args, **kwargs):
    from hllm.ops.registry import PromotionRefused, RegistryError

    try:
        return fn(*args, **kwargs)
    except PromotionRefused as e:
        fail(f"refused: {e}")
    except RegistryError as e:
        fail(str(e))


def _fmt(v) -> str:
    return f"{100 * v:.2f}" if isinstance(v, float) else "-"


@app.command("list")
def list_cmd(
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Versions of the registered model: aliases, test metrics (%), data version, protocol, A/B state."""
    from rich.console import Console
    from rich.table import Table

    from hllm.ops.registry import list_versions

    cfg = load(params, sets)
    rows = list_versions(cfg)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        typer.echo(f"no versions of {cfg.registry.model_name} yet")
        return
    gate = cfg.registry.gate_metric
    shown = [gate] + [m for m in (f"recall@{k}" for k in cfg.eval.protocol.ks[:2]) if m != gate]
    table = Table(title=f"{cfg.registry.model_name} (metrics in %, test split)")
    for col in ("version", "aliases", "created", "kind", *shown, "data version", "protocol", "A/B", "run"):
        table.add_column(col, justify="right" if col in shown or col == "version" else "left")
    for r in rows:
        ab = r["ab"]
        ab_s = f"{ab.get('status', '')} {float(ab['share']):.0%}" if "share" in ab else ab.get("status", "")
        if r.get("incomplete"):  # registered by a flow run that died before its gate: never promoted by itself
            ab_s = (ab_s + " " if ab_s else "") + "incomplete (not gated)"
        table.add_row(
            str(r["version"]),
            ",".join(r["aliases"]),
            r["created"],
            r["model_kind"],
            *[_fmt(r["metrics"].get(m)) for m in shown],
            r["data_version"],
            r["protocol_hash"],
            ab_s,
            (r["run_id"] or "")[:8],
        )
    Console(width=200).print(table)


@app.command()
def promote(
    version: Annotated[
        str | None, typer.Argument(help="model version (default with --to champion: the challenger)")
    ] = None,
    to: Annotated[
        str, typer.Option("--to", help="challenger (start the A/B test) or champion (end it)")
    ] = "challenger",
    share: Annotated[
        float | None, typer.Option("--share", help="challenger traffic share (default registry.challenger_share)")
    ] = None,
    reason: ReasonOpt = "",
    by: ByOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Gate VERSION against the champion and make it the challenger (or end the A/B test with --to champion)."""
    from hllm.ops.registry import promote as do_promote

    cfg = load(params, sets)
    res = _run(do_promote, cfg, version, to=to, reason=reason, actor=by, share=share)
    typer.echo(res.message)


@app.command()
def rollback(
    reason: ReasonOpt = "",
    by: ByOpt = None,
    expect_current: Annotated[
        str | None, typer.Option("--from", help="only roll back while this version is the champion (safe to retry)")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="roll back even when the champion is itself the result of a rollback")
    ] = False,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Put the previous champion back (repeating it right after a rollback is a no-op)."""
    from hllm.ops.registry import rollback as do_rollback

    cfg = load(params, sets)
    typer.echo(_run(do_rollback, cfg, reason=reason, actor=by, expect_current=expect_current, force=force).message)


@app.command("end-ab")
def end_ab(
    reason: ReasonOpt = "", by: ByOpt = None, params: ParamsOpt = Path("params.yaml"), sets: SetOpt = None
) -> None:
    """End the A/B test in favour of the champion (removes the challenger alias)."""
    from hllm.ops.registry import end_ab as do_end

    cfg = load(params, sets)
    typer.echo(_run(do_end, cfg, reason=reason, actor=by).message)


@app.command()
def register(
    run_id: Annotated[str, typer.Option("--run-id", help="the MLflow training run the model comes from")],
    export_dir: Annotated[Path, typer.Option("--export", help="the folder `hllm export` wrote")],
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="checkpoint folder (User LLM weights)")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Log the serving pyfunc into RUN and register it as a new version (no alias is set)."""
    from hllm.ops.registry import register_model

    cfg = load(params, sets)
    if not export_dir.is_dir():
        fail(f"{export_dir}: export folder does not exist; run `hllm export` first")
    if checkpoint is not None and not checkpoint.is_dir():
        fail(f"{checkpoint}: checkpoint folder does not exist")
    mv = _run(register_model, cfg, run_id, export_dir, checkpoint)
    typer.echo(f"registered {cfg.registry.model_name} version {mv.version} from run {run_id}")


@app.command("attach-eval")
def attach_eval(
    run_id: Annotated[str, typer.Option("--run-id", help="run to attach to (e.g. the champion's training run)")],
    metrics: Annotated[Path, typer.Option("--metrics", help="metrics.json written by `hllm evaluate`")],
    per_user: Annotated[Path, typer.Option("--per-user", help="per_user.npz written by `hllm evaluate`")],
    data_version: Annotated[
        str | None, typer.Option("--data-version", help="default: the version of the data under paths.built_dir")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Attach an evaluation to a run, e.g. the champion re-evaluated on today's data for the gate."""
    from hllm.evaluation.results import EvalResult
    from hllm.ops import tracking

    cfg = load(params, sets)
    for p in (metrics, per_user):
        if not p.is_file():
            fail(f"{p}: no such file")
    dv = data_version or versioning.data_version(cfg).version
    tracker = tracking.attach(run_id, cfg)
    try:
        # artifacts only: the run's own test/* metrics stay those of the data it was trained on
        art = tracker.log_eval_result(EvalResult.load_files(metrics, per_user), dv, log_as_metrics=False)
    except ValueError as e:
        fail(str(e))
    typer.echo(f"attached {metrics.name} + {per_user.name} to run {run_id} as {art}/")


@app.command()
def reevaluate(
    version: Annotated[str | None, typer.Argument(help="model version (default: the champion)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Evaluate a registered version on the current data and attach the result to its run.

    The data is paths.built_dir's, so the gate can compare a candidate trained on newer data with it."""
    from hllm.ops.registry import reevaluate as do_reevaluate

    cfg = load(params, sets)
    art = _run(do_reevaluate, cfg, version, progress=True)
    typer.echo(f"evaluation attached as {art}/")


@app.command()
def audit(params: ParamsOpt = Path("params.yaml"), sets: SetOpt = None) -> None:
    """The audit log (JSON lines, oldest first): every alias move and refusal, who, when, why."""
    from hllm.ops.registry import audit_log

    cfg = load(params, sets)
    for ev in audit_log(cfg):
        typer.echo(json.dumps(ev, sort_keys=True))
