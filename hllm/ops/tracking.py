"""MLflow tracking: run lifecycle, lineage and the metric logger the training loop calls.

Everything here talks to MLflow through ``MlflowClient`` with an explicit run
id rather than the fluent "active run" state, so a run opened by a Prefect
task can be written to from a torchrun worker (``MLFLOW_RUN_ID`` in its
environment), from another thread, or re-opened later to attach an
evaluation (e.g. the champion's, on today's data, for the promotion gate).

Layout of a training run::

    params      the resolved config, flattened (``train.lr``, ``model.user.config.hidden_size`` ...)
    tags        hllm.kind (train | baseline | flow), hllm.model_kind, hllm.data_version,
                hllm.data.dvc_md5, hllm.data.sequences_md5, hllm.protocol_hash,
                mlflow.source.git.commit, prefect.flow_run_id, hllm.launcher (cli | flow),
                sys.* (from the training process: rank 0 of torchrun overwrites the launcher's)
    inputs      the built sequences as an MLflow dataset (digest = sequences hash)
    metrics     train/loss, train/scale, train/lr (+ train/lr_new), throughput: means over each
                window of train.log_every steps, logged at its last step; valid/<metric> (per
                epoch), test/<metric> (final)
    artifacts   config/params.yaml, data/validation/*, plots/*.png,
                eval/<split>/<protocol_hash>/<data_version>/{metrics.json,per_user.npz}

MLflow metric names may not contain ``@``: ``ndcg@10`` is logged as ``ndcg_at_10``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hllm.config import Config, protocol_hash
from hllm.data.versioning import DataVersion, data_version
from hllm.evaluation.results import EvalResult, artifact_dir
from hllm.lineage import code_version, system_info
from hllm.logs import is_rank0

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

DEFAULT_STORE_DIR = "mlflow"  # mlflow/mlflow.db + mlflow/artifacts/, git-ignored

TAG_KIND = "hllm.kind"  # train | baseline | flow | audit
TAG_MODEL_KIND = "hllm.model_kind"
TAG_DATA_VERSION = "hllm.data_version"
TAG_DVC_MD5 = "hllm.data.dvc_md5"
TAG_SEQ_MD5 = "hllm.data.sequences_md5"
TAG_PROTOCOL = "hllm.protocol_hash"
TAG_FLOW_RUN = "prefect.flow_run_id"
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own key: the UI links it
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own key: the UI nests the run under it
TAG_NOTE = "mlflow.note.content"  # MLflow's own key: the run's (markdown) description on its page
# MLflow's own experiment tag: without it the UI infers the kind and may open a model-training
# experiment on its GenAI overview (traces) instead of the runs table
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MAX_NOTE_LEN = 8000  # MLflow's limit on a tag value

_MAX_PARAM_LEN = 6000
_BATCH = 100  # MLflow's per-request limit for params/tags


# --------------------------------------------------------------------------- store


def resolve_tracking_uri(cfg: Config) -> str:
    """``tracking.tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow/mlflow.db``."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = Path.cwd() / DEFAULT_STORE_DIR
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _default_artifact_location(uri: str) -> str | None:
    """Local stores keep artifacts next to the db; a server decides for itself."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def configure(cfg: Config, experiment: str | None = None) -> str:
    """Point MLflow at the configured store and return the experiment id (created if missing).

    Every experiment it returns carries ``mlflow.experimentKind=custom_model_development`` (set at
    creation, and added to an existing experiment that lacks it), so the MLflow UI opens it on the
    runs table. Also sets the process-wide tracking/registry URI, so
    ``mlflow.pyfunc.load_model("models:/...")`` resolves against the same store.
    """
    import mlflow

    # tqdm bars per artifact download clutter CLI output and logs; a user's explicit setting wins
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = resolve_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = experiment or cfg.tracking.experiment
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        _ensure_kind(client, exp)
        return exp.experiment_id
    location = cfg.tracking.artifact_location or _default_artifact_location(uri)
    try:
        return client.create_experiment(name, artifact_location=location, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
    except Exception:  # a concurrent process created it between the two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        _ensure_kind(client, exp)
        return exp.experiment_id


def _ensure_kind(client: "MlflowClient", exp: Any) -> None:
    """Tag an experiment created before the kind was set (or by someone else); a kind already
    chosen (e.g. by a user in the UI) is left alone. Best effort: a read-only store still works."""
    if (exp.tags or {}).get(TAG_EXPERIMENT_KIND):
        return
    try:
        client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    except Exception as e:  # noqa: BLE001  (e.g. no permission on a shared server)
        log.warning("could not tag experiment %s with %s: %s", exp.name, TAG_EXPERIMENT_KIND, e)


def client(cfg: Config) -> "MlflowClient":
    import mlflow

    configure(cfg)
    return mlflow.MlflowClient()


# --------------------------------------------------------------------------- names and versions


def metric_key(name: str, split: str | None = None) -> str:
    """``("ndcg@10", "test")`` -> ``test/ndcg_at_10`` (MLflow rejects ``@`` in names)."""
    key = name.replace("@", "_at_")
    return f"{split}/{key}" if split else key


# --------------------------------------------------------------------------- the run handle


class Tracker:
    """Writes to one MLflow run. ``run_id=None`` is a silent no-op (ranks other than 0).

    Implements ``log_metrics(metrics, step)``, the logger interface of ``hllm.training.trainer.train``.
    """

    def __init__(self, run_id: str | None, cfg: Config | None = None):
        self.run_id = run_id
        self.cfg = cfg
        self._client: MlflowClient | None = None

    @property
    def active(self) -> bool:
        return self.run_id is not None

    @property
    def _active_run_id(self) -> str:
        """``run_id`` where the caller has checked :attr:`active`."""
        assert self.run_id is not None
        return self.run_id

    @property
    def client(self) -> "MlflowClient":
        if self._client is None:
            import mlflow

            if self.cfg is not None:
                configure(self.cfg)
            self._client = mlflow.MlflowClient()
        return self._client

    # -- metrics / params / tags

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, prefix: str = "") -> None:
        """Log finite numeric values; ``@`` in names becomes ``_at_``. Non-finite values are skipped
        (MLflow would store them, but they break the UI's charts) with a warning."""
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = []
        for k, v in metrics.items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(v):
                log.warning("metric %s=%s is not finite; not logged (step %s)", k, v, step)
                continue
            batch.append(Metric(metric_key(f"{prefix}{k}"), v, ts, int(step or 0)))
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self._active_run_id, metrics=batch[i : i + 1000])

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self._active_run_id, params=items[i : i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self._active_run_id, tags=items[i : i + _BATCH])

    # -- artifacts

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"artifact {p} does not exist")
        if p.is_dir():
            self.client.log_artifacts(self._active_run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self._active_run_id, str(p), artifact_path)

    def set_note(self, markdown: str) -> None:
        """The run's description (``mlflow.note.content``, markdown), cut to MLflow's tag limit."""
        self.set_tags({TAG_NOTE: note_text(markdown)})

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.active:
            self.client.log_text(self._active_run_id, text, artifact_file)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        if self.active:
            self.client.log_dict(self._active_run_id, obj, artifact_file)

    # -- what every training run logs

    def log_config(self, cfg: Config) -> None:
        """The resolved config: flattened as params, and as ``config/params.yaml``."""
        import yaml

        self.log_params(cfg.flat())
        self.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config/params.yaml")
        self.set_tags(
            {
                "hllm.config_hash": cfg.hash(),
                TAG_PROTOCOL: protocol_hash(cfg.eval.protocol),
                TAG_MODEL_KIND: cfg.model.kind,
            }
        )

    def log_git(self, cwd: str | Path | None = None) -> None:
        cv = code_version(cwd)
        if cv.sha:
            self.set_tags({TAG_GIT_COMMIT: cv.sha, "hllm.git_dirty": str(cv.dirty).lower()})

    def log_system_info(self, world_size: int | None = None, device: str | None = None) -> None:
        self.set_tags(system_info(world_size, device))

    def log_dataset(self, cfg: Config, root: str | Path = ".", context: str = "training") -> DataVersion:
        """Record the dataset version (tags) and the built sequences as an MLflow dataset input, so the
        run page shows which data it was trained on (name, digest, schema, row count, source)."""
        dv = data_version(cfg, root)
        self.set_tags({TAG_DATA_VERSION: dv.version, TAG_DVC_MD5: dv.dvc_md5, TAG_SEQ_MD5: dv.sequences_md5})
        built = Path(root) / cfg.paths.built_dir
        if not self.active or not (built / "sequences.parquet").is_file():
            if self.active:
                log.warning("%s has no sequences.parquet: dataset version tags only, no dataset input", built)
            return dv
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        entity = _sequences_dataset(built, dv)
        inp = DatasetInput(
            entity,
            tags=[
                InputTag(MLFLOW_DATASET_CONTEXT, context),
                InputTag("dvc_md5", dv.dvc_md5),
                InputTag("data_version", dv.version),
            ],
        )
        self.client.log_inputs(self._active_run_id, datasets=[inp])
        return dv

    def log_validation_report(self, path: str | Path) -> None:
        """The GX validation report (a JSON file or a Data Docs folder) under ``data/validation/``."""
        self.log_artifact(path, "data/validation")

    def log_eval_result(self, result: EvalResult, data_ver: str, log_as_metrics: bool = True) -> str:
        """Log one evaluation result (:mod:`hllm.evaluation.results`: ``metrics.json`` + ``per_user.npz``,
        what the promotion gate bootstraps over) under ``eval/<split>/<protocol>/<data_version>/``;
        with ``log_as_metrics`` the values are also run metrics ``<split>/<name>``. Returns the
        artifact directory."""
        art_dir = artifact_dir(result.split, result.protocol_hash, data_ver)
        if not self.active:
            return art_dir
        if log_as_metrics:
            self.log_metrics(result.metrics, step=0, prefix=f"{result.split}/")
            for name, row in result.slices.items():  # e.g. test/slice/new_items/recall_at_10, .../n
                self.log_metrics(row, step=0, prefix=f"{result.split}/slice/{name}/")
            self.set_tags({TAG_PROTOCOL: result.protocol_hash})
        with tempfile.TemporaryDirectory() as tmp:
            dataclasses.replace(result, data_version=data_ver).save(tmp)
            self.client.log_artifacts(self._active_run_id, tmp, art_dir)
        return art_dir

    def log_figure_file(self, path: str | Path) -> None:
        self.log_artifact(path, "plots")

    def log_loss_curve(self, keys: tuple[str, ...] = ("train/loss",)) -> Path | None:
        """Plot the logged per-step series (default ``train/loss``) as ``plots/loss_curve.png``."""
        from hllm.ops import plots

        if not self.active:
            return None
        series = {k: [(m.step, m.value) for m in self.client.get_metric_history(self._active_run_id, k)] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            log.warning("run %s has no %s history; no loss curve", self.run_id, keys)
            return None
        with tempfile.TemporaryDirectory() as tmp:
            out = plots.loss_curve(series, Path(tmp) / "loss_curve.png")
            self.log_figure_file(out)
        return Path("plots/loss_curve.png")

    def log_comparison(self, runs: Mapping[str, str], split: str = "test", ks: list[int] | None = None) -> Path | None:
        """Recall@K / NDCG@K bars of this run against others (label -> run id, e.g. the baselines),
        from their logged ``<split>/<metric>`` values, as ``plots/<split>_metrics.png``."""
        from hllm.ops import plots

        if not self.active:
            return None
        ks = ks or (list(self.cfg.eval.protocol.ks) if self.cfg else [5, 10, 50, 200])
        results: dict[str, dict[str, float]] = {}
        for label, rid in runs.items():
            m = self.client.get_run(rid).data.metrics
            vals = {
                f"{name}@{k}": m[metric_key(f"{name}@{k}", split)]
                for name in ("recall", "ndcg")
                for k in ks
                if metric_key(f"{name}@{k}", split) in m
            }
            if vals:
                results[label] = vals
        if not results:
            log.warning("no %s metrics on runs %s; no comparison plot", split, list(runs))
            return None
        name = f"{split}_metrics.png"
        with tempfile.TemporaryDirectory() as tmp:
            self.log_figure_file(plots.metric_bars(results, ks, Path(tmp) / name, title=f"{split} metrics"))
        return Path("plots") / name

    def log_train_result(self, result: Any) -> None:
        """What a finished ``hllm.training.trainer.TrainResult`` adds to its run: where the checkpoints are,
        the selection outcome as tags, and the loss curve."""
        if not self.active:
            return
        ckpt = result.best_checkpoint or result.last_checkpoint
        self.set_tags(
            {
                "hllm.checkpoint": str(Path(ckpt).resolve()),
                "hllm.run_dir": str(Path(result.run_dir).resolve()),
                "hllm.steps": result.steps,
                "hllm.best_step": result.best_step,
                "hllm.select_metric": result.select_metric or None,
                "hllm.stopped_early": str(bool(result.stopped_early)).lower(),
                "hllm.stopped_by_budget": str(bool(getattr(result, "stopped_by_budget", False))).lower(),
            }
        )
        if result.best_value is not None and result.select_metric:
            self.log_metrics({f"best/{result.select_metric}": result.best_value}, step=result.best_step or 0)
        if result.steps:
            self.log_loss_curve()

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            self.client.set_terminated(self._active_run_id, status)


def _sequences_dataset(built: Path, dv: DataVersion):
    """The MLflow dataset entity of ``sequences.parquet`` from its footer alone: schema, users and
    interactions without reading the data (``mlflow.data.from_pandas`` infers the schema row by row:
    ~40 s for 300k users)."""
    import pyarrow.parquet as pq
    from mlflow.entities import Dataset
    from mlflow.types.schema import Array, ColSpec, Schema

    path = built / "sequences.parquet"
    meta = pq.ParquetFile(path).metadata
    interactions = sum(
        meta.row_group(g).column(c).num_values
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
        if meta.row_group(g).column(c).path_in_schema.startswith("items")
    )
    schema = Schema([ColSpec("integer", "user_idx"), ColSpec(Array("integer"), "items")])
    stats = {}
    if (built / "stats.json").is_file():
        try:
            stats = json.loads((built / "stats.json").read_text())
        except ValueError:
            stats = {}
    profile = {
        "num_rows": meta.num_rows,
        "num_interactions": int(interactions),
        **{f"num_{k}": stats[k] for k in ("items", "users") if isinstance(stats.get(k), int)},
    }
    return Dataset(
        name=f"hllm-sequences@{dv.version}",
        digest=dv.sequences_md5[:20],
        source_type="local",
        source=json.dumps({"uri": str(path.resolve())}),
        schema=json.dumps({"mlflow_colspec": schema.to_dict()}),
        profile=json.dumps(profile),
    )


def note_text(markdown: str, limit: int = MAX_NOTE_LEN) -> str:
    """``markdown`` as a run description: cut at a line end to fit ``limit`` characters."""
    if len(markdown) <= limit:
        return markdown
    tail = "\n\n_(cut to fit MLflow's description limit; the full text is an artifact of this run)_\n"
    head = markdown[: limit - len(tail)]
    return head[: head.rfind("\n") + 1 or len(head)] + tail


def _param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 3] + "..."


# --------------------------------------------------------------------------- run lifecycle


def open_run(
    cfg: Config,
    run_name: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    kind: str = "train",
    log_data: bool = True,
    root: str | Path = ".",
    world_size: int | None = None,
    device: str | None = None,
    validation_report: str | Path | None = None,
    stop_signals: tuple[type[BaseException], ...] = (),
) -> Tracker:
    """Create a run (left RUNNING) with config, git commit, system info, dataset lineage and, when
    given, the GX validation report of its data; the caller ends it with :meth:`Tracker.finish`.

    An error while logging marks it FAILED and raises; a stop (Ctrl-C, or one of ``stop_signals``,
    e.g. the orchestrator's termination signal) marks it KILLED: it was stopped, it did not fail."""
    import mlflow

    exp_id = configure(cfg)
    all_tags = {TAG_KIND: kind, "mlflow.runName": run_name, **({TAG_PARENT: parent_run_id} if parent_run_id else {})}
    all_tags.update({k: str(v) for k, v in (tags or {}).items() if v is not None})
    run = mlflow.MlflowClient().create_run(exp_id, run_name=run_name, tags=all_tags)
    tracker = Tracker(run.info.run_id, cfg)
    log.info("MLflow run %s (%s) in %s", run_name, run.info.run_id, resolve_tracking_uri(cfg))
    try:
        if kind != "flow":
            tracker.log_config(cfg)
            tracker.log_system_info(world_size, device)
        tracker.log_git(root)
        if log_data:
            tracker.log_dataset(cfg, root)
        if validation_report and Path(validation_report).exists():
            tracker.log_validation_report(validation_report)
    except BaseException as e:
        tracker.finish("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit, *stop_signals)) else "FAILED")
        raise
    return tracker


def reopen_run(
    cfg: Config, run_id: str, root: str | Path = ".", world_size: int | None = None, device: str | None = None
) -> Tracker:
    """Set a run back to RUNNING to continue it (``hllm train --resume``).

    MLflow params are immutable, so only keys the run does not have yet are logged; values that
    changed are listed in the tag ``hllm.resume.changed_params`` and the new config is logged as
    ``config/params.resume-<n>.yaml``. Git commit, system info and dataset tags become the ones of
    this process (the code and data that finish the run)."""
    import yaml

    tracker = Tracker(run_id, cfg)
    client = tracker.client
    run = client.get_run(run_id)
    n = int(run.data.tags.get("hllm.resumes", "0")) + 1
    client.update_run(run_id, status="RUNNING")
    try:
        have = run.data.params
        flat = {k: _param_value(v) for k, v in cfg.flat().items()}
        tracker.log_params({k: v for k, v in flat.items() if k not in have})
        changed = {k: {"was": have[k], "now": v} for k, v in flat.items() if k in have and have[k] != v}
        tracker.set_tags(
            {
                "hllm.resumes": n,
                "hllm.config_hash": cfg.hash(),
                TAG_PROTOCOL: protocol_hash(cfg.eval.protocol),
                TAG_MODEL_KIND: cfg.model.kind,
                **({"hllm.resume.changed_params": _param_value(changed)} if changed else {}),
            }
        )
        tracker.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), f"config/params.resume-{n}.yaml")
        tracker.log_system_info(world_size, device)
        tracker.log_git(root)
        tracker.log_dataset(cfg, root)
    except BaseException:
        tracker.finish("FAILED")
        raise
    log.info("MLflow run %s reopened (resume %d) in %s", run_id, n, resolve_tracking_uri(cfg))
    return tracker


@contextlib.contextmanager
def start_run(
    cfg: Config,
    run_name: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    kind: str = "train",
    log_data: bool = True,
    root: str | Path = ".",
) -> Iterator[Tracker]:
    """Open a run, log config/git/system info/dataset lineage, yield a :class:`Tracker`; the run
    ends FINISHED, or FAILED if the body raises. On ranks other than 0 it yields a no-op tracker.

    ``parent_run_id`` nests the run under a flow's parent run (HLLM and baselines as siblings).
    """
    if not is_rank0():
        yield Tracker(None)
        return
    tracker = open_run(cfg, run_name, parent_run_id, tags, kind, log_data, root)
    with _finishing(tracker):
        yield tracker


@contextlib.contextmanager
def _finishing(tracker: Tracker) -> Iterator[None]:
    """End the run FINISHED, KILLED on Ctrl-C, FAILED on any other exception (re-raised)."""
    try:
        yield
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except SystemExit as e:  # typer.Exit / sys.exit(0) after a successful body is not a failure
        tracker.finish("FINISHED" if e.code in (0, None) else "FAILED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")


RUN_POINTER = "mlflow_run.json"  # in the training run folder: the MLflow run that `--resume` continues


def read_run_pointer(run_dir: str | Path) -> dict[str, str] | None:
    p = Path(run_dir) / RUN_POINTER
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
        return d if isinstance(d, dict) and d.get("run_id") else None
    except ValueError:
        log.warning("%s is not JSON; --resume opens a new MLflow run", p)
        return None


def _resumable(cfg: Config, pointer: dict[str, str] | None) -> str | None:
    """The pointer's run id when it lives in this store and still exists (not deleted)."""
    if not pointer or pointer.get("tracking_uri") != resolve_tracking_uri(cfg):
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client(cfg).get_run(pointer["run_id"])
    except MlflowException:
        return None
    return run.info.run_id if run.info.lifecycle_stage == "active" else None


@contextlib.contextmanager
def training_run(
    cfg: Config,
    *,
    resume: bool = False,
    world_size: int = 1,
    launcher: str = "cli",
    tags: Mapping[str, Any] | None = None,
    root: str | Path = ".",
) -> Iterator[Tracker]:
    """The MLflow run of one training of ``cfg.train.run_name`` outside a flow (``hllm train``).

    A new run (``hllm.kind`` train for HLLM, baseline otherwise) with everything :func:`open_run`
    logs, its id written to ``<runs_dir>/<run_name>/mlflow_run.json``; with ``resume`` the run
    recorded there is reopened when it is in this store (:func:`reopen_run`), else a new run is
    tagged ``hllm.resumed=true``. torchrun workers log into it through ``MLFLOW_RUN_ID``. Ends
    FINISHED, or FAILED/KILLED when the body raises."""
    run_dir = Path(cfg.paths.runs_dir) / cfg.train.run_name
    device = cfg.train.device
    prev = _resumable(cfg, read_run_pointer(run_dir)) if resume else None
    if prev is not None:
        tracker = reopen_run(cfg, prev, root, world_size, device)
    else:
        kind = "train" if cfg.model.kind == "hllm" else "baseline"
        all_tags = {"hllm.launcher": launcher, **({"hllm.resumed": "true"} if resume else {}), **(tags or {})}
        tracker = open_run(
            cfg, cfg.train.run_name, tags=all_tags, kind=kind, root=root, world_size=world_size, device=device
        )
    with _finishing(tracker):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_POINTER).write_text(
            json.dumps(
                {
                    "run_id": tracker.run_id,
                    "tracking_uri": resolve_tracking_uri(cfg),
                    "experiment_id": tracker.client.get_run(tracker._active_run_id).info.experiment_id,
                },
                indent=2,
            )
            + "\n"
        )
        yield tracker


@contextlib.contextmanager
def start_parent_run(
    cfg: Config,
    run_name: str,
    flow_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    root: str | Path = ".",
) -> Iterator[Tracker]:
    """The parent run of one nightly flow run, tagged with the Prefect flow-run id; open child runs
    with ``start_run(..., parent_run_id=parent.run_id)``."""
    with start_run(
        cfg, run_name, tags={TAG_FLOW_RUN: flow_run_id, **(tags or {})}, kind="flow", log_data=True, root=root
    ) as t:
        yield t


def attach(run_id: str | None = None, cfg: Config | None = None) -> Tracker:
    """A tracker on an existing run (default ``$MLFLOW_RUN_ID``); a no-op tracker on ranks other than 0
    or when there is no run id. Used by torchrun workers whose run was opened by the flow."""
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    if not is_rank0() or not run_id:
        return Tracker(None)
    if cfg is not None:
        configure(cfg)
    return Tracker(run_id, cfg)


def find_runs(cfg: Config, filter_string: str = "", max_results: int = 100) -> list[Any]:
    exp_id = configure(cfg)
    import mlflow

    return mlflow.MlflowClient().search_runs(
        [exp_id], filter_string=filter_string, max_results=max_results, order_by=["attributes.start_time DESC"]
    )


TAG_FAILURE_REASON = "hllm.failure_reason"


def fail_orphaned_runs(
    cfg: Config, dead_reason: Callable[[str, Mapping[str, str]], str | None], status: str = "FAILED"
) -> list[str]:
    """End the runs of this experiment that a dead flow run left RUNNING.

    Runs are grouped by their ``prefect.flow_run_id`` tag; ``dead_reason(flow_run_id, tags)`` (the tags
    of all of that flow run's RUNNING runs, merged) says why the flow run is dead, or None while it may
    be alive. The runs of a dead one end ``status`` with the reason in ``hllm.failure_reason`` and the
    run's note. Returns the run ids ended."""
    runs = find_runs(cfg, "attributes.status = 'RUNNING'", max_results=1000)
    by_flow_run: dict[str, list[Any]] = {}
    for r in runs:
        fr = r.data.tags.get(TAG_FLOW_RUN)
        if fr:
            by_flow_run.setdefault(fr, []).append(r)
    ended: list[str] = []
    for fr, group in by_flow_run.items():
        tags: dict[str, str] = {}
        for r in group:
            tags.update(r.data.tags)
        why = dead_reason(fr, tags)
        if not why:
            continue
        note = f"flow run {fr} died: {why}; run ended {status} by a later flow run"
        for r in group:
            tracker = Tracker(r.info.run_id, cfg)
            tracker.set_tags(
                {
                    TAG_FAILURE_REASON: note,
                    **({"hllm.flow_status": "CRASHED"} if r.data.tags.get(TAG_KIND) == "flow" else {}),
                    **({} if r.data.tags.get("mlflow.note.content") else {"mlflow.note.content": note}),
                }
            )
            tracker.finish(status)
            ended.append(r.info.run_id)
        log.warning("MLflow runs %s ended %s: %s", [r.info.run_id for r in group], status, note)
    return ended
