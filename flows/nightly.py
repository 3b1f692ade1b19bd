"""``nightly-retrain``: snapshot -> validate -> DVC version -> build -> train -> evaluate -> export ->
register -> promotion gate, as one Prefect flow (see docs/operations.md).

Stage graph (each box a task from :mod:`flows.tasks`, each calling the library function that the
matching ``hllm`` command / ``dvc.yaml`` stage runs)::

    snapshot -> validate -> publish -> dvc-add -> dvc-push -> build -+-> train hllm -> evaluate --+
    (folder,    (GX: a      (swap into  (data.dvc)  (remote)          +-> train sasrec -> evaluate  |
     s3://,     failure     data/raw)                                 +-> train pop -> evaluate     |
     synth)     stops all)                                                                          |
       +----------------------------------------------------------------------------------------+
       +-> evaluate-champion (on today's data, if needed) -> export -> register -> promotion-gate

HLLM trains where ``train_backend`` says: this process, torchrun here, or a Kubeflow PyTorchJob
on Kubernetes (:mod:`hllm.training.k8s`) whose checkpoints come back on the shared volume; the stages after
it are the same for all three.

MLflow: one parent run per flow run (tagged ``prefect.flow_run_id``) holding the data lineage,
the validation report, the comparison bars and the summary; HLLM and each baseline are child runs,
and the HLLM run (the one registered) also holds the validation report and the comparison bars.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow

from flows import tasks as T
from flows.report import MODEL_LABELS, ModelRow, RunReport
from flows.slot import SlotBusy, SlotUnavailable
from hllm import faults
from hllm.config import Config

__all__ = ["FLOW_NAME", "SlotBusy", "SlotUnavailable", "nightly_retrain", "nightly_slot"]

log = logging.getLogger("hllm.flows")

FLOW_NAME = "nightly-retrain"
ARTIFACT_KEY = "nightly-retrain-summary"


def _code_version() -> str | None:
    from hllm.lineage import code_version

    sha = code_version(Path(__file__).resolve().parent).label
    return None if sha is None else sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")


@contextlib.contextmanager
def nightly_slot(
    name: str, timeout_s: float, flow_run_id: str | None = None, flow_run_name: str = "", cfg: Any = None
) -> Iterator[None]:
    """Hold the one slot of the global concurrency limit ``name`` for the whole run (:func:`flows.slot.hold`).

    The limit lives in the Prefect API's database, so it guards runs started any way (deployment,
    ``hllm flows run``, a second deployment) against each other. A slot whose holder died is taken
    over within :data:`flows.slot.CHECK_S` (same host) and the dead run's MLflow runs are closed; with
    a live holder a second run waits up to ``timeout_s`` and then fails (:class:`SlotBusy`) before it
    has touched any data. An empty name disables the guard.
    """
    from flows import slot

    def cleanup() -> None:
        if cfg is not None:
            slot.fail_orphans(cfg, name, flow_run_id)

    with slot.hold(name, timeout_s, flow_run_id, flow_run_name, FLOW_NAME, on_recovered=cleanup):
        yield


class _Stages:
    """Times each stage into the report and remembers which one failed."""

    def __init__(self, report: RunReport):
        self.report = report

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        faults.point(f"{name}:start")  # the fault-injection suite kills the run at every stage boundary
        try:
            yield
            faults.point(f"{name}:end")
        except BaseException:
            if not self.report.failed_stage:
                self.report.failed_stage = name
            raise
        finally:
            self.report.stage_seconds[name] = round(time.perf_counter() - t0, 1)


def _model_cfg(cfg, kind: str, run_name: str):
    from hllm.config import apply_overrides, config_from_dict

    c = copy.deepcopy(cfg)
    c.model.kind = kind
    c.train.run_name = f"{run_name}-{kind}"
    extra = (cfg.flow.baseline_overrides or {}).get(kind) if kind != "hllm" else None
    if extra:
        c = config_from_dict(apply_overrides(c.to_dict(), list(extra)))
    return c


@flow(
    name=FLOW_NAME,
    version=_code_version(),
    log_prints=True,
    description="Retrain HLLM on the latest snapshot, compare with the champion and baselines, register, gate.",
)
def nightly_retrain(
    snapshot: str | None = None,
    snapshot_format: str | None = None,
    nproc: int | None = None,
    train_backend: str | None = None,
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    baselines: bool = True,
    promote: bool | None = None,
) -> dict[str, Any]:
    """One nightly retraining.

    Args:
        snapshot: a folder or ``s3://bucket/prefix`` with the new data; default ``flow.snapshot``
            ("" = the embedded synthetic dataset). Ending in ``/`` with dated child folders
            (``s3://shop-logs/`` holding ``2026-11-23/``, ...): the newest of them.
        snapshot_format: ``raw`` (canonical parquet) or an import format; default ``flow.snapshot_format``.
        nproc: training processes here; 1 = this process, N = torchrun; default ``train.nproc``.
        train_backend: where HLLM trains: ``local`` (this process, torchrun when nproc > 1),
            ``torchrun`` (torchrun with nproc ranks) or ``k8s`` (a PyTorchJob of ``flow.k8s``
            nodes x GPUs on Kubernetes, see :mod:`hllm.training.k8s`); default ``flow.train_backend``.
            The baselines always train here, in this process.
        params: the params.yaml to load (relative to the working directory).
        overrides: ``key=value`` config overrides, e.g. ``["train.max_steps=50"]``.
        baselines: also train and evaluate ``flow.baselines`` (SASRec, popularity).
        promote: run the promotion gate; default ``flow.promote``.
    Returns the run summary (:class:`flows.report.RunReport` as a dict).
    """
    from prefect.runtime import flow_run

    from flows import slot
    from hllm.config import load_config
    from hllm.ops import tracking

    if logging.getLogger("hllm").level == logging.NOTSET:  # a worker's process: Prefect sets root to WARNING
        logging.getLogger("hllm").setLevel(logging.INFO)
    t_start = time.perf_counter()
    cfg = load_config(params, list(overrides or []))
    fc = cfg.flow
    source = fc.snapshot if snapshot is None else snapshot
    nproc = cfg.train.nproc if nproc is None else nproc
    backend = train_backend or fc.train_backend
    run_id = str(flow_run.id or "local")
    run_name = f"nightly-{datetime.now(UTC):%Y%m%d-%H%M%S}-{run_id[:8]}"
    report = RunReport(
        flow_run_id=run_id,
        flow_run_name=str(flow_run.name or ""),
        run_name=run_name,
        snapshot=source or "",
        model_name=cfg.registry.model_name,
        ks=list(cfg.eval.protocol.ks),
        tracking_uri=tracking.resolve_tracking_uri(cfg),
    )
    n = _Night(cfg, report, _Stages(report), T.io_retry(cfg), run_id, run_name, nproc, backend)
    killed = False
    try:
        if backend not in T.TRAIN_BACKENDS:
            raise ValueError(f"train_backend {backend!r}: expected one of {', '.join(T.TRAIN_BACKENDS)}")
        if backend == "k8s":  # settings, shared volume, template: wrong ones fail before any data is touched
            from hllm.training import k8s

            k8s.check(_model_cfg(cfg, "hllm", run_name))
        stop = contextlib.ExitStack()
        stop.enter_context(slot.graceful_stop())  # SIGTERM/SIGINT: unwind (slot released, runs KILLED) in GRACE_S
        _try(lambda: slot.fail_orphans(cfg, fc.concurrency_limit, run_id))  # zombie runs of dead flow runs
        t_wait = time.perf_counter()
        with stop, nightly_slot(fc.concurrency_limit, fc.slot_timeout_s, run_id, report.flow_run_name, cfg):
            report.stage_seconds["wait-for-slot"] = round(time.perf_counter() - t_wait, 1)
            report.experiment_id = tracking.configure(cfg)
            with n.stage("recover"):  # what a killed run left half-done: data, exports, registry
                report.recovered = T.recover(cfg)
            _open_parent(n, source)
            vreport = _data(n, source, snapshot_format or fc.snapshot_format)  # nothing below runs unless it passes
            champion = T.current_champion.with_options(**n.io)(cfg)  # before this run changes anything
            kinds = ["hllm"] + ([k for k in fc.baselines if k != "hllm"] if baselines else [])
            results = _train_and_evaluate(n, kinds, vreport, champion)
            _ship(n, results["hllm"], fc.promote if promote is None else promote)
            report.status = "COMPLETED"
    except BaseException as e:
        report.status = "FAILED"
        killed = _is_stop(e)
        report.error = "".join(traceback.format_exception_only(type(e), e)).strip()
        if isinstance(e, SlotBusy):
            report.failed_stage = "wait-for-slot"
        report.failed_stage = report.failed_stage or "setup"
        with contextlib.suppress(Exception):
            e.run_report = report  # type: ignore[attr-defined]  # `hllm flows run` prints it
        raise
    finally:
        report.seconds = round(time.perf_counter() - t_start, 1)
        _finish(cfg, report, n.parent, n.open_children, killed=killed)
    return report.to_dict()


@dataclass
class _Night:
    """One flow run's state, shared by its stages."""

    cfg: Config
    report: RunReport
    stage: _Stages
    io: dict[str, Any]  # retry options of the I/O tasks
    run_id: str
    run_name: str
    nproc: int
    backend: str
    parent: str | None = None  # the MLflow parent run
    open_children: list[str] = field(default_factory=list)  # child runs to close if the night fails

    @property
    def world(self) -> int:
        k = self.cfg.flow.k8s
        return (k.workers + 1) * k.gpus_per_node if self.backend == "k8s" else max(1, self.nproc)


def _open_parent(n: _Night, source: str) -> None:
    from flows import slot
    from hllm.ops import tracking

    with n.stage("mlflow"):
        tags = {tracking.TAG_FLOW_RUN: n.run_id, "prefect.flow_run_name": n.report.flow_run_name,
                "hllm.snapshot": source or "synth", **slot.process_tags()}  # fmt: skip
        n.parent = T.open_run.with_options(**n.io)(n.cfg, n.run_name, "flow", tags=tags, log_data=False)
        n.report.parent_run_id = n.parent


def _data(n: _Night, source: str, fmt: str) -> Any:
    """snapshot -> validate -> publish -> DVC add + push -> build; returns the validation report."""
    from hllm.data import journal
    from hllm.ops import tracking

    cfg, report = n.cfg, n.report
    # until the push succeeds, a pending marker tells the next run to roll data/raw back to what
    # data.dvc names and push it (hllm.data.journal): a crash in between never leaves a mix
    journal.begin(cfg, n.run_id)
    try:
        with n.stage("snapshot"):
            snap = T.stage_snapshot.with_options(**n.io)(cfg, source, fmt)
            staged, report.snapshot = snap["staged"], snap["source"]  # "dir/" -> its newest dated child
            journal.note(cfg, staged=staged)
        with n.stage("validate"):
            try:
                vreport = T.validate_snapshot(cfg, staged, report.snapshot)
            except Exception as e:
                rep = getattr(e, "report", None)
                report.validation = rep.summary() if rep is not None else ""
                if rep is not None and n.parent:
                    parent = n.parent
                    _try(lambda: tracking.attach(parent, cfg).log_validation_report(rep.report_path))
                raise
            report.validation = vreport.summary()
    except Exception:
        journal.finish(cfg)  # nothing was published (the staged copy is gone): nothing to recover
        raise
    with n.stage("publish"):
        T.publish_snapshot(cfg, staged, vreport)
    with n.stage("dvc"):
        report.data["dvc_md5"] = T.dvc_add(cfg)["md5"]
        report.data["pushed_to"] = T.dvc_push.with_options(**n.io)(cfg)
    journal.finish(cfg)
    with n.stage("build"):
        built = T.build(cfg)
        report.data["stats"] = built["stats"]
        assert n.parent is not None  # opened by _open_parent
        report.data["data_version"] = T.log_lineage.with_options(**n.io)(cfg, n.parent, vreport.report_path, built)
    return vreport


def _train_and_evaluate(n: _Night, kinds: list[str], vreport: Any, champion: dict[str, Any] | None
                        ) -> dict[str, dict[str, Any]]:  # fmt: skip
    """HLLM first (a failure here registers nothing), then the baselines; then the champion on
    today's data and the comparison bars. Returns each kind's config, run, checkpoint and metrics."""
    from flows import slot
    from hllm.ops import tracking

    cfg, report = n.cfg, n.report
    results: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        mcfg = _model_cfg(cfg, kind, n.run_name)
        label = MODEL_LABELS.get(kind, kind)
        with n.stage(f"train-{kind}"):
            child = T.open_run.with_options(**n.io)(
                mcfg,
                mcfg.train.run_name,
                "train" if kind == "hllm" else "baseline",
                parent_run_id=n.parent,
                tags={tracking.TAG_FLOW_RUN: n.run_id, **slot.process_tags()},
                world_size=n.world if kind == "hllm" else 1,
                # the run that gets registered carries its data's GX report (the parent has it too)
                validation_report=vreport.report_path if kind == "hllm" else None,
            )
            n.open_children.append(child)
            report.run_ids[label] = child
            where = (n.nproc, n.backend) if kind == "hllm" else (1, "local")  # baselines train in this process
            trained = T.train_model(mcfg, child, *where)
            if trained.get("k8s_job"):
                report.paths[f"{kind}_k8s_job"] = trained["k8s_job"]
        with n.stage(f"evaluate-{kind}"):
            ev = T.evaluate_model(mcfg, trained["checkpoint"], child)
        T.close_run.with_options(**n.io)(mcfg, child, "FINISHED")
        n.open_children.remove(child)
        results[kind] = {"cfg": mcfg, "run_id": child, **trained, "eval": ev}
        report.protocol_hash = ev["protocol_hash"]
        report.paths[f"{kind}_checkpoint"] = trained["checkpoint"]
        report.paths[f"{kind}_eval"] = ev["dir"]
        name = f"{label} (this run)" if kind == "hllm" else label
        budget = mcfg.train.time_budget_s
        note = f"stopped by train.time_budget_s={budget:.0f} after {trained['steps']} steps" if trained.get(
            "stopped_by_budget") else ""  # fmt: skip
        if trained.get("resumed_from"):  # a crashed night's checkpoints (flow.resume_crashed)
            note = "; ".join(x for x in (f"resumed from {trained['resumed_from']}", note) if x)
        report.models.append(ModelRow(name, kind, ev["metrics"], child, note, ev.get("slices", {})))
    if champion:
        with n.stage("evaluate-champion"):
            champ = T.evaluate_champion(cfg, champion, report.protocol_hash, results["hllm"]["eval"]["data_version"])
        row = ModelRow(f"champion v{champion['version']}", champion["model_kind"], champ["metrics"],
                       champion["run_id"], champ["note"])  # fmt: skip
        report.models.insert(1, row)
    if len(results) > 1:  # the bars on the parent and on the HLLM run that gets registered
        runs = {MODEL_LABELS.get(k, k): r["run_id"] for k, r in results.items()}
        assert n.parent is not None  # opened by _open_parent
        T.log_comparison.with_options(**n.io)(cfg, [n.parent, results["hllm"]["run_id"]], runs)
    return results


def _ship(n: _Night, hllm: dict[str, Any], do_promote: bool) -> None:
    """export -> register -> promotion gate -> prune the run folders of old nights."""
    report = n.report
    with n.stage("export"):
        export_dir = T.export_embeddings(hllm["cfg"], hllm["checkpoint"])
        report.paths["export"] = export_dir
    with n.stage("register"):
        report.registered_version = T.register.with_options(**n.io)(
            hllm["cfg"], hllm["run_id"], export_dir, hllm["checkpoint"]
        )
    if do_promote:
        with n.stage("promotion-gate"):
            who = f"nightly-retrain flow run {report.flow_run_name or n.run_id}"
            gate = T.promotion_gate.with_options(**n.io)(n.cfg, report.registered_version, who)
            report.alias, report.promotion = gate["alias"], gate["message"]
            report.promotion_accepted = bool(gate["passed"])
    else:
        report.promotion = "skipped (promote=false)"
    with n.stage("prune-old-runs"):
        T.prune_old_runs(n.cfg)


def _is_stop(e: BaseException) -> bool:
    """SIGTERM (Prefect's TerminationSignal) or Ctrl-C: the run was stopped, its MLflow runs end KILLED."""
    from prefect.exceptions import ExternalSignal

    return isinstance(e, (KeyboardInterrupt, ExternalSignal, SystemExit))


def _try(fn) -> Any:
    """Best effort while reporting a failure: never hide the original error."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        log.warning("while reporting: %s", e)
        return None


def _finish(cfg, report: RunReport, parent: str | None, open_children: list[str], killed: bool = False) -> None:
    """Close the MLflow runs (KILLED when the run was stopped), publish the summary (Prefect artifact,
    MLflow, reports/nightly/). The parent run gets the summary as its description, each model's test
    metrics and the promotion outcome (:meth:`RunReport.parent_metrics` / ``parent_tags``); each
    model's child run a short description (:meth:`RunReport.child_note`)."""
    from prefect.artifacts import create_markdown_artifact

    from hllm.ops import tracking

    status = "FINISHED" if report.status == "COMPLETED" else "KILLED" if killed else "FAILED"
    for child in open_children:
        _try(lambda c=child: tracking.attach(c, cfg).finish("KILLED" if killed else "FAILED"))
    md = report.markdown()
    out = Path(cfg.paths.reports_dir) / "nightly"
    if report.failed_stage != "wait-for-slot":  # a run that never got the slot writes no files
        _try(lambda: out.mkdir(parents=True, exist_ok=True))
        _try(lambda: (out / f"{report.run_name}.md").write_text(md, encoding="utf-8"))
        _try(lambda: (out / f"{report.run_name}.json").write_text(report.to_json() + "\n", encoding="utf-8"))
    if parent:
        tr = tracking.attach(parent, cfg)
        _try(lambda: tr.log_text(md, "summary.md"))
        _try(lambda: tr.log_dict(report.to_dict(), "summary.json"))
        _try(lambda: tr.set_tags(report.parent_tags()))
        _try(lambda: tr.log_metrics(report.parent_metrics(), step=0))
        _try(lambda: tr.set_note(md))
        _try(lambda: tr.finish(status))
    own = set(report.run_ids.values())
    for row in report.models:
        if row.run_id in own:  # this night's runs (not the champion's)
            _try(lambda r=row: tracking.attach(r.run_id, cfg).set_note(report.child_note(r)))
    _try(
        lambda: create_markdown_artifact(
            markdown=md, key=ARTIFACT_KEY, description=f"{FLOW_NAME} {report.run_name}: {report.headline()}"
        )
    )
    log.info("summary: %s", out / f"{report.run_name}.md")
