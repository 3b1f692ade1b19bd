"""`hllm data ...`: import, generate, validate, build, inspect and version datasets.

Thin wrappers over :mod:`hllm.data`; heavy libraries are imported inside each
command so ``hllm --help`` stays instant. Bad input exits non-zero with the
file/row/field named, never with a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from hllm.cli.common import ParamsOpt, SetOpt, fail, load

app = typer.Typer(no_args_is_help=True)


def _load(params: Path, sets: list[str] | None):
    """The config, after putting back a ``paths.raw_dir`` that a crash left half-replaced
    (:func:`hllm.data.raw.recover_dir`): every command below reads or writes it."""
    from hllm.data.raw import recover_dir

    cfg = load(params, sets)
    recover_dir(cfg.paths.raw_dir)
    return cfg


RawOpt = Annotated[Path | None, typer.Option("--raw", help="raw data folder (default: paths.raw_dir)")]


@app.command("import")
def import_(
    src: Annotated[list[Path], typer.Argument(help="input files or folders")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="hllm | amazon | movielens | recbole")] = "hllm",
    out: RawOpt = None,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="skip validation before replacing raw")] = False,
    drop_duplicates: Annotated[
        bool, typer.Option("--drop-duplicates", help="keep the first of duplicate (user, item, timestamp) rows")
    ] = False,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Import a dataset (HLLM CSVs, Amazon, MovieLens, RecBole) into the canonical raw layout."""
    from hllm.data.errors import DataError
    from hllm.data.ingest import FORMATS, import_dataset
    from hllm.data.validate import ValidationFailed

    cfg = _load(params, sets)
    if fmt not in FORMATS:
        fail(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}", code=2)
    try:
        res = import_dataset(
            cfg, fmt, list(src), raw_dir=out, validate=not no_validate, drop_duplicates=drop_duplicates
        )
    except ValidationFailed as e:
        fail(f"{e}\nnothing was imported: {out or cfg.paths.raw_dir} is unchanged")
    except DataError as e:
        fail(f"{e}\nnothing was imported: {out or cfg.paths.raw_dir} is unchanged")
    typer.echo(f"imported {res.interactions} interactions, {res.items} items -> {res.raw_dir}")
    if res.validation is not None:
        typer.echo(f"validation passed; report: {res.validation.report_path}")


@app.command()
def synth(
    out: RawOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Generate the embedded synthetic dataset (deterministic from synth.seed)."""
    from hllm.data.synth import synthesize

    cfg = _load(params, sets)
    try:
        path = synthesize(cfg, out)
    except ValueError as e:
        fail(str(e), code=2)
    typer.echo(
        f"synthetic dataset ({cfg.synth.n_users} users, {cfg.synth.n_items} items, seed {cfg.synth.seed}) -> {path}"
    )


@app.command()
def validate(
    raw: RawOpt = None,
    no_docs: Annotated[bool, typer.Option("--no-docs", help="skip GX Data Docs (validate.data_docs=false)")] = False,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Validate the raw tables with the Great Expectations suites; exit 1 on failure."""
    from hllm.data.errors import DataError
    from hllm.data.validate import validate_raw

    cfg = _load(params, sets)
    try:
        report = validate_raw(cfg, raw_dir=raw, data_docs=False if no_docs else None)
    except DataError as e:
        fail(str(e))
    if not report.passed:
        fail(report.summary())
    typer.echo(report.summary())


@app.command()
def build(
    raw: RawOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="built folder (default: paths.built_dir)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Build training sequences, id maps, stats and the item token cache from validated raw data."""
    from hllm.data.build import build_dataset, load_stats
    from hllm.data.errors import DataError

    cfg = _load(params, sets)
    try:
        path = build_dataset(cfg, raw_dir=raw, built_dir=out)
    except (DataError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    s = load_stats(cfg, path)
    typer.echo(
        f"built {s['users']} users, {s['items']} items, {s['interactions']} interactions "
        f"({s['split']['train_windows']} training windows) -> {path}"
    )


@app.command()
def stats(
    as_json: Annotated[bool, typer.Option("--json", help="print stats.json as is")] = False,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Show statistics of the built dataset (users, items, sequence lengths, k-core, split)."""
    from hllm.data.build import load_stats
    from hllm.data.errors import DataError

    cfg = _load(params, sets)
    try:
        s = load_stats(cfg)
    except DataError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    sl = s["sequence_length"]
    kc = s["k_core"]
    lines = [
        f"users         {s['users']:>12,}",
        f"items         {s['items']:>12,}",
        f"interactions  {s['interactions']:>12,}   density {s['density']:.4%}",
        f"seq length    min {sl['min']}  p50 {sl['p50']:g}  mean {sl['mean']:g}  p95 {sl['p95']:g}  max {sl['max']}",
        f"k-core        {kc['mode']} users>={kc['user']} items>={kc['item']}: {kc['rows_removed']:,} rows removed "
        f"in {kc['iterations']} pass(es)",
        f"ties          {s['same_timestamp_ties']:,} interactions share their user's previous timestamp "
        "(kept in file order)",
        f"split         {s['split']['train_windows']:,} training windows; {s['split']['valid_users']:,} valid / "
        f"{s['split']['test_users']:,} test users",
    ]
    sp = s["split"]
    if sp.get("split") == "temporal":  # eval.protocol.split at build time
        import datetime as dt

        def when(t: float) -> str:
            return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

        lines.append(
            f"temporal      cutoffs valid {when(sp['valid_cutoff_time'])} / test {when(sp['test_cutoff_time'])}: "
            f"{sp['train_interactions']:,} training interactions; users with no history before their target "
            f"(left out): {sp['valid_users_without_history']:,} valid / {sp['test_users_without_history']:,} test"
        )
    h = s.get("holdout")
    if h:  # build.holdout_items: the item cold-start split
        lines.append(
            f"holdout       {h['items']:,} items held out ({h['share']:g} of the catalogue, seed {h['seed']}, among "
            f"{h['candidates']:,} last items): {h['test_targets']:,} test targets, {h['rows_removed']:,} rows removed"
        )
    typer.echo("\n".join(lines))


@app.command()
def push(
    remote: Annotated[
        str | None,
        typer.Option(
            "--remote",
            "-r",
            help="DVC remote (default: `s3` when $HLLM_DVC_REMOTE_URL is set, else .dvc/config's default)",
        ),
    ] = None,
    raw: RawOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Record data/raw as a new version in data.dvc and push it to the DVC remote."""
    from hllm.data.errors import DataError
    from hllm.data.versioning import VersioningError, add_and_push, choose_remote

    cfg = _load(params, sets)
    try:
        v = add_and_push(raw or cfg.paths.raw_dir, remote=choose_remote(remote or ""))
    except (DataError, VersioningError) as e:
        fail(str(e))
    typer.echo(f"dataset version {v.md5} ({v.nfiles} files, {v.size} bytes) pushed; commit data.dvc to name it")


@app.command()
def pull(
    remote: Annotated[
        str | None,
        typer.Option(
            "--remote",
            "-r",
            help="DVC remote (default: `s3` when $HLLM_DVC_REMOTE_URL is set, else .dvc/config's default)",
        ),
    ] = None,
) -> None:
    """Bring data/raw to the version recorded in data.dvc (downloads from the DVC remote)."""
    from hllm.data.errors import DataError
    from hllm.data.versioning import VersioningError, choose_remote
    from hllm.data.versioning import pull as dvc_pull

    try:
        v = dvc_pull(remote=choose_remote(remote or ""))
    except (DataError, VersioningError) as e:
        fail(str(e))
    typer.echo(f"data/raw is at dataset version {v.md5}")
