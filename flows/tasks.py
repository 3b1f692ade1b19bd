"""Prefect tasks of the nightly flow.

Each task wraps one call into the ``hllm`` library (the same functions that the
CLI commands, and so the ``dvc.yaml`` stages, run) and passes paths, URIs and
small dicts between stages, never tensors or models. Retries with exponential
back-off are set per run from ``flow.io_retries`` / ``flow.io_retry_delay_s``
on the I/O tasks only (:func:`io_retry`); compute tasks (validation, build,
training, evaluation, export) never retry: a failure there is a bug or bad
data, and running it again would only burn hours.

No task caches: each one has side effects on disk or in MLflow, and Prefect's
default cache key would hash the config object on every call.
"""

from __future__ import annotations

import logging
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from hllm.config import Config, TrainBackend
from hllm.data import versioning

if TYPE_CHECKING:
    from hllm.data.validate import ValidationReport

log = logging.getLogger(__name__)


def io_retry(cfg: Config) -> dict[str, Any]:
    """``Task.with_options`` arguments for tasks that talk to S3, a DVC remote or the MLflow server."""
    delay = cfg.flow.io_retry_delay_s
    return {
        "retries": cfg.flow.io_retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=delay) if delay > 0 else 0,
        "retry_jitter_factor": 0.2 if delay > 0 else None,
        "retry_condition_fn": retry_unless_bad_input,
    }


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry I/O failures, not bad input.

    A :class:`~hllm.data.errors.DataError` (a missing snapshot folder, an empty S3 prefix, an
    unreadable file) or a :class:`~hllm.config.ConfigError` fails the same way every time, so
    retrying it would only add the back-off (about a minute) before the same error.
    """
    from hllm.config import ConfigError
    from hllm.data.errors import DataError

    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as e:  # noqa: BLE001 - the result could not be read: treat as the error
            exc = e
    return not isinstance(exc, (DataError, ConfigError))


# --------------------------------------------------------------------------- crash recovery


@task(name="recover", cache_policy=NO_CACHE)
def recover(cfg: Config) -> list[str]:
    """Put back what a killed run left half-done: data, exports, registry (:func:`hllm.ops.recovery.recover`)."""
    from hllm.ops.recovery import recover

    return recover(cfg)


# --------------------------------------------------------------------------- data


@task(name="snapshot", cache_policy=NO_CACHE)
def stage_snapshot(cfg: Config, source: str, fmt: str) -> dict[str, str]:
    """Fetch the snapshot (folder, s3:// prefix, or the embedded synthetic data) into a staging folder.

    A source ending in ``/`` with dated child folders means its newest one (:func:`hllm.data.snapshot.resolve`).
    Returns ``{"staged": folder, "source": the snapshot actually taken}``."""
    from hllm.data import snapshot

    resolved = snapshot.resolve(source or None)
    return {"staged": str(snapshot.stage(cfg, resolved, fmt)), "source": resolved or ""}


@task(name="validate", cache_policy=NO_CACHE)
def validate_snapshot(cfg: Config, staged: str, source: str) -> ValidationReport:
    """Great Expectations over the staged tables; raises ``ValidationFailed`` (with the summary) and
    deletes the staged copy when they fail, so nothing downstream runs and ``raw_dir`` is untouched."""
    from hllm.data import snapshot
    from hllm.data.validate import ValidationFailed, validate_raw

    try:
        report = validate_raw(cfg, raw_dir=staged, source=source or "embedded synthetic dataset (hllm data synth)")
    except Exception:
        snapshot.discard(staged)
        raise
    if not report.passed:
        snapshot.discard(staged)
        raise ValidationFailed(report)
    return report


@task(name="publish-snapshot", cache_policy=NO_CACHE)
def publish_snapshot(cfg: Config, staged: str, report) -> str:
    from hllm.data import snapshot

    return str(snapshot.publish(cfg, staged, report))


@task(name="dvc-add", cache_policy=NO_CACHE)
def dvc_add(cfg: Config) -> dict[str, Any]:
    """Hash ``raw_dir`` into the DVC cache and record it in ``data.dvc``: the new data version."""
    from hllm.data import versioning

    v = versioning.add(cfg.paths.raw_dir)
    return {"md5": v.md5, "nfiles": v.nfiles, "size": v.size, "dvc_file": str(v.dvc_file)}


def dvc_remote(cfg: Config, repo: str | Path = ".") -> str | None:
    """The DVC remote the flow pushes a data version to: ``flow.dvc_remote``, else remote ``s3`` when
    ``$HLLM_DVC_REMOTE_URL`` is set, else DVC's default (:func:`hllm.data.versioning.choose_remote`)."""
    from hllm.data import versioning

    return versioning.choose_remote(cfg.flow.dvc_remote, repo=repo)


@task(name="dvc-push", cache_policy=NO_CACHE)
def dvc_push(cfg: Config) -> str:
    """Upload the version to the DVC remote of :func:`dvc_remote` (I/O: retried); returns its name."""
    from hllm.data import versioning

    remote = dvc_remote(cfg)
    versioning.push(remote=remote)
    return remote or _default_remote()


def _default_remote() -> str:
    from hllm.data import versioning

    proc = versioning.dvc("remote", "default", check=False)
    return proc.stdout.strip() or "the default remote"


@task(name="build", cache_policy=NO_CACHE)
def build(cfg: Config) -> dict[str, Any]:
    """Sequences, id maps, split statistics and the item token cache (``hllm data build``)."""
    from hllm.data.build import build_dataset, load_stats

    out = build_dataset(cfg)
    return {"built_dir": str(out), "stats": load_stats(cfg, out)}


# --------------------------------------------------------------------------- MLflow runs


@task(name="mlflow-open-run", cache_policy=NO_CACHE)
def open_run(
    cfg: Config,
    name: str,
    kind: str,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    log_data: bool = True,
    world_size: int = 1,
    validation_report: str | None = None,
) -> str:
    """Create an MLflow run (RUNNING) with config, git, system info, dataset lineage and, when given,
    the GX validation report of its data; returns its id.

    The run stays open across tasks (and torchrun workers, via ``MLFLOW_RUN_ID``) until
    :func:`close_run`, so training and evaluation of one model land in one run.
    """
    from prefect.exceptions import ExternalSignal

    from hllm.ops import tracking

    tracker = tracking.open_run(cfg, name, parent_run_id, tags, kind, log_data, world_size=max(1, world_size),
                                validation_report=validation_report, stop_signals=(ExternalSignal,))  # fmt: skip
    assert tracker.run_id is not None  # a created run has an id
    return tracker.run_id


@task(name="mlflow-close-run", cache_policy=NO_CACHE)
def close_run(cfg: Config, run_id: str, status: str = "FINISHED") -> None:
    from hllm.ops import tracking

    tracking.attach(run_id, cfg).finish(status)


@task(name="mlflow-log-lineage", cache_policy=NO_CACHE)
def log_lineage(cfg: Config, run_id: str, validation_report: str | None, data: dict[str, Any]) -> str:
    """Dataset version (tags + dataset input), validation report and data stats on the flow's parent run."""
    from hllm.ops import tracking

    tr = tracking.attach(run_id, cfg)
    dv = tr.log_dataset(cfg)
    if validation_report and Path(validation_report).exists():
        tr.log_validation_report(validation_report)
    tr.log_dict(data.get("stats", {}), "data/stats.json")
    return dv.version


# --------------------------------------------------------------------------- models


TRAIN_BACKENDS: tuple[str, ...] = typing.get_args(TrainBackend)


@task(name="train", cache_policy=NO_CACHE, retries=0)
def train_model(cfg: Config, run_id: str, nproc: int = 1, backend: str = "local") -> dict[str, Any]:
    """Train ``cfg.model.kind``: in this process (``local``, nproc 1), under torchrun here (``local``
    with nproc > 1, or ``torchrun``), or as a PyTorchJob on Kubernetes (``k8s``, :mod:`hllm.training.k8s`:
    the checkpoints come back on the shared volume). Never retried."""
    from hllm.ops import tracking

    if backend not in TRAIN_BACKENDS:
        raise ValueError(f"train backend {backend!r}: expected one of {', '.join(TRAIN_BACKENDS)}")
    tracker = tracking.attach(run_id, cfg)
    extra: dict[str, Any] = {}
    if backend == "k8s":
        from hllm.training import k8s

        res, sub = k8s.train(cfg, run_id)
        tracker.set_tags({"hllm.k8s_job": sub.ref, "hllm.train_backend": "k8s"})
        extra["k8s_job"] = sub.ref
    else:
        resume = _resume_crashed(cfg, tracker)
        extra["resumed_from"] = resume
        if nproc <= 1 and backend == "local":
            from hllm.training.trainer import train

            res = train(cfg, resume=bool(resume), logger=tracker)
        else:
            from hllm.training.launch import run_torchrun

            uri = tracking.resolve_tracking_uri(cfg)
            res = run_torchrun(cfg, nproc, resume=bool(resume), run_id=run_id, tracking_uri=uri)
    ckpt = res.best_checkpoint or res.last_checkpoint
    tracker.log_train_result(res)  # checkpoint and run folder, selection outcome, budget, loss curve
    return {
        "run_dir": str(res.run_dir),
        "checkpoint": str(ckpt),
        "steps": res.steps,
        "seconds": res.seconds,
        "best_value": res.best_value,
        "select_metric": res.select_metric,
        "stopped_by_budget": res.stopped_by_budget,
        **extra,
    }


def _resume_crashed(cfg: Config, tracker) -> str | None:
    """Adopt the checkpoints of a night killed while it trained this model (:mod:`hllm.training.resume`);
    returns ``<run>/<step>`` resumed from, or None (train from scratch)."""
    if not cfg.flow.resume_crashed:
        return None
    from hllm.data.versioning import content_hash
    from hllm.training import resume

    ckpt = resume.find_crashed(cfg, content_hash(cfg.paths.built_dir))
    if ckpt is None:
        return None
    resume.adopt(ckpt, cfg)
    origin = f"{ckpt.parent.parent.name}/{ckpt.name}"
    tracker.set_tags({"hllm.resumed_from": origin})
    return origin


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(cfg: Config, checkpoint: str, run_id: str) -> dict[str, Any]:
    """Full-ranking valid + test metrics of a checkpoint, as ``hllm evaluate --split both`` (the
    dvc.yaml stage) writes them: ``reports/eval/<run_name>/<split>/{metrics.json,per_user.npz}``;
    both are logged to the model's MLflow run (the test ones are what the promotion gate compares)."""
    from hllm.evaluation.evaluate import evaluate_checkpoint
    from hllm.ops import tracking

    results = evaluate_checkpoint(checkpoint, cfg, ("valid", "test"))
    base = Path(cfg.paths.reports_dir) / "eval" / cfg.train.run_name
    data_ver = versioning.data_version(cfg).version
    tracker = tracking.attach(run_id, cfg)
    # Training already logged valid/* per epoch (at its steps): the curve. Logging the final valid
    # values again as metrics would add a stray step-0 point to it; they stay in eval/valid/.
    trained_valid = any(k.startswith("valid/") for k in tracker.client.get_run(run_id).data.metrics)
    for split, res in results.items():
        res.save(base / split)
        tracker.log_eval_result(res, data_ver, log_as_metrics=not (split == "valid" and trained_valid))
    test = results["test"]
    return {
        "dir": str(base / "test"),
        "metrics": test.metrics,
        "slices": test.slices,
        "protocol_hash": test.protocol_hash,
        "data_version": data_ver,
    }


@task(name="export", cache_policy=NO_CACHE)
def export_embeddings(cfg: Config, checkpoint: str) -> str:
    """Item/user embeddings + FAISS index + manifest (``hllm export``), written atomically."""
    from hllm.serving.export import export

    res = export(checkpoint, Path(cfg.paths.export_dir) / cfg.train.run_name, cfg)
    return str(res.out_dir)


@task(name="mlflow-compare", cache_policy=NO_CACHE)
def log_comparison(cfg: Config, run_ids: list[str], runs: dict[str, str]) -> None:
    """Recall@K / NDCG@K bars of ``runs`` (label -> run id) as ``plots/test_metrics.png`` on each of
    ``run_ids`` (the flow's parent run and the HLLM run that gets registered)."""
    from hllm.ops import tracking

    for run_id in run_ids:
        tracking.attach(run_id, cfg).log_comparison(runs)


# --------------------------------------------------------------------------- registry


@task(name="champion", cache_policy=NO_CACHE)
def current_champion(cfg: Config) -> dict[str, Any] | None:
    """The champion before this run registers anything: version, test metrics, data version, protocol."""
    from hllm.ops.registry import CHAMPION, list_versions

    for row in list_versions(cfg):
        if CHAMPION in row["aliases"]:
            return row
    return None


@task(name="evaluate-champion", cache_policy=NO_CACHE)
def evaluate_champion(cfg: Config, champion: dict[str, Any], protocol_hash: str, data_version: str) -> dict[str, Any]:
    """The champion's test metrics on today's data under today's protocol, for the comparison table
    and the promotion gate. When it was trained on other data (or under another protocol) its
    registered bundle is re-evaluated on today's built data (``hllm registry reevaluate``) and the
    result attached to its run. Returns ``{"metrics": ..., "note": ...}``; a champion that cannot be
    evaluated on this data (e.g. an ID model and a changed catalogue) is a note, not a failure: the
    gate then refuses and says why."""
    import tempfile

    import mlflow

    from hllm.evaluation.results import EvalResult
    from hllm.ops import registry, tracking

    if champion["data_version"] == data_version and champion["protocol_hash"] == protocol_hash:
        return {"metrics": champion["metrics"], "note": ""}
    try:
        art = registry.reevaluate(cfg, champion["version"])
    except registry.RegistryError as e:
        return {"metrics": champion["metrics"], "note": f"not comparable: {e}"}
    tracking.configure(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=champion["run_id"], artifact_path=art, dst_path=tmp)
        metrics = EvalResult.load(path).metrics
    return {"metrics": metrics, "note": f"re-evaluated on today's data (trained on {champion['data_version']})"}


@task(name="register", cache_policy=NO_CACHE)
def register(cfg: Config, run_id: str, export_dir: str, checkpoint: str) -> str:
    """Log the serving pyfunc into the HLLM run and register it (``hllm registry register``).
    Safe to retry: a run already registered gets its version back."""
    from hllm.ops import registry

    return str(registry.register_model(cfg, run_id, export_dir, checkpoint).version)


@task(name="promotion-gate", cache_policy=NO_CACHE)
def promotion_gate(cfg: Config, version: str, reason: str) -> dict[str, Any]:
    """``hllm registry promote VERSION``: the first version becomes champion; later ones become
    challenger when they pass the gate. A refusal is an outcome, not a failure (retries would not
    change it); the version stays registered without an alias."""
    from hllm.ops import registry, tracking

    try:
        res = registry.promote(cfg, version, to=registry.CHALLENGER, reason=reason, actor="prefect:nightly-retrain")
        message, passed = res.message, True
    except registry.PromotionRefused as e:
        message, passed = str(e), False
    mv = tracking.client(cfg).get_model_version(cfg.registry.model_name, version)
    aliases = sorted(mv.aliases or [])
    return {"alias": aliases[0] if aliases else None, "message": message, "passed": passed}


@task(name="prune-old-runs", cache_policy=NO_CACHE)
def prune_old_runs(cfg: Config) -> int:
    """Delete the local folders of all but the newest ``flow.keep_runs`` nightly runs."""
    from flows.retention import prune_nightly_runs

    p = cfg.paths
    return len(prune_nightly_runs([p.runs_dir, p.export_dir, Path(p.reports_dir) / "eval"], cfg.flow.keep_runs))
