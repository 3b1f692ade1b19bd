"""`hllm evaluate`, `hllm export`, `hllm recommend`: offline metrics and serving artefacts of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from hllm.cli.common import ParamsOpt, SetOpt, fail, load

CkptOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint", "-c", help="checkpoint folder (default: runs/<train.run_name>/best, else its latest step)"
    ),
]


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
    app.command("export")(export_cmd)
    app.command("recommend")(recommend_cmd)


def _checkpoint(cfg, checkpoint: Path | None) -> Path:
    from hllm.evaluation.evaluate import default_checkpoint

    if checkpoint is not None:
        if not (checkpoint / "model.safetensors").exists():
            fail(f"{checkpoint}: not a checkpoint (no model.safetensors)")
        return checkpoint
    try:
        return default_checkpoint(cfg)
    except FileNotFoundError as e:
        fail(str(e))


def evaluate_cmd(
    checkpoint: CkptOpt = None,
    split: Annotated[str, typer.Option("--split", help="valid, test or both")] = "test",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="output folder (default: <reports_dir>/eval/<run_name>)")
    ] = None,
    built: Annotated[
        Path | None, typer.Option("--built", help="built dataset folder (default: the checkpoint's)")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Full-ranking Recall/NDCG of a checkpoint under the protocol in params.yaml.

    Prints the table (percentages) and writes <out>/<split>/metrics.json (fractions,
    protocol hash) and per_user.npz (per-user values for paired bootstrap)."""
    from hllm.evaluation import metrics as M
    from hllm.evaluation.evaluate import evaluate_checkpoint

    cfg = load(params, sets)
    splits = {"valid": ("valid",), "test": ("test",), "both": ("valid", "test")}.get(split)
    if splits is None:
        fail(f"--split must be valid, test or both, got {split!r}", code=2)
    ckpt = _checkpoint(cfg, checkpoint)
    try:
        results = evaluate_checkpoint(ckpt, cfg, splits, built_dir=built)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    from hllm.models.loading import read_meta

    run_name = read_meta(ckpt)["config"].get("train", {}).get("run_name", cfg.train.run_name)
    base = out or Path(cfg.paths.reports_dir) / "eval" / run_name
    for s, res in results.items():
        res.save(base / s)
    first = next(iter(results.values()))
    users = ", ".join(f"{s}={r.n_users}" for s, r in results.items())
    typer.echo(f"checkpoint {ckpt}  protocol {first.protocol_hash}  users {users}")
    info = first.split_info
    if info.get("split") == "temporal":  # where the cutoffs fell, and who had no history to be scored on
        typer.echo(
            f"temporal split: cutoffs valid {info['valid_cutoff_time']:.0f} / test {info['test_cutoff_time']:.0f} "
            f"(epoch s); {info['train_interactions']:,} training interactions; left out, no history before the "
            f"target: {info['valid_users_without_history']:,} valid / {info['test_users_without_history']:,} test users"
        )
    for s, res in results.items():
        new = res.slices.get("new_items", {})
        if new.get("n"):  # the cold-start slice, the one a text tower is for
            rk = f"recall@{min(cfg.eval.protocol.ks, key=lambda k: abs(k - 10))}"
            typer.echo(f"{s}: {int(new['n'])} new-item targets (never in training), {rk} {100 * new.get(rk, 0):.2f}%")
    typer.echo(M.format_table({s: r.metrics for s, r in results.items()}, cfg.eval.protocol.ks))
    typer.echo(f"(percent; fractions in {base}/<split>/metrics.json)")


def export_cmd(
    checkpoint: CkptOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="export folder (default: <export_dir>/<run_name>)")
    ] = None,
    built: Annotated[
        Path | None, typer.Option("--built", help="built dataset folder (default: the checkpoint's)")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Item + user embeddings, a FAISS index and a manifest for serving.

    Atomic; items unchanged since the previous export in the same folder are reused."""
    from hllm.serving.export import export

    cfg = load(params, sets)
    ckpt = _checkpoint(cfg, checkpoint)
    try:
        res = export(ckpt, out, cfg, built_dir=built)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    c = res.manifest["counts"]
    typer.echo(
        f"exported {c['items']} items ({res.items_encoded} encoded, {res.items_reused} reused) and "
        f"{c['users']} users, dim {res.manifest['dim']}, index {res.manifest['index']['type']} -> {res.out_dir}"
    )


def recommend_cmd(
    user: Annotated[str | None, typer.Option("--user", "-u", help="original user id")] = None,
    history: Annotated[
        str | None, typer.Option("--history", help="comma-separated item ids (needs the checkpoint)")
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="number of items")] = 10,
    export_dir: Annotated[
        Path | None, typer.Option("--export", "-e", help="export folder (default: <export_dir>/<run_name>)")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", "-c", help="checkpoint, for --history")] = None,
    include_seen: Annotated[bool, typer.Option("--include-seen", help="do not exclude items already seen")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    params: ParamsOpt = Path("params.yaml"),
    sets: SetOpt = None,
) -> None:
    """Top-K items for a user (from the export) or for an item history (with the user model)."""
    from hllm.serving.recommend import Recommender

    if (user is None) == (history is None):
        fail("give exactly one of --user or --history", code=2)
    cfg = load(params, sets)
    d = export_dir or Path(cfg.paths.export_dir) / cfg.train.run_name
    try:
        if history is not None:
            ckpt = checkpoint
            if ckpt is None:
                from hllm.serving.export import read_manifest

                saved = (read_manifest(d) or {}).get("model", {}).get("checkpoint")
                ckpt = Path(saved) if saved else None
            if ckpt is None:
                fail("--history needs the user model: pass --checkpoint")
            rec = Recommender.from_export(d, checkpoint=ckpt)
            items = [x.strip() for x in history.split(",") if x.strip()]
            recs = rec.for_history(items, k, exclude_seen=not include_seen)
        else:
            assert user is not None  # exactly one of --user / --history was given
            rec = Recommender.from_export(d)
            recs = rec.for_user(user, k, exclude_seen=not include_seen)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        fail(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
    if as_json:
        typer.echo(json.dumps([r.__dict__ for r in recs], indent=2))
        return
    typer.echo(f"{'rank':>4}  {'item_id':<16} {'score':>9}  title")
    for i, r in enumerate(recs, 1):
        typer.echo(f"{i:>4}  {r.item_id:<16} {r.score:>9.4f}  {r.title}")
