"""The MLflow model registry for ``hllm-recommender``: register, gate, promote, roll back, list, audit.

Aliases, not stages (deprecated since MLflow 2.9):

- ``champion``   serves the traffic;
- ``challenger`` takes ``ab.share`` of the traffic in the A/B test against the champion.

``promote V`` (to challenger) runs the gate: the candidate and the champion must have been
evaluated under the same protocol hash and on the same dataset version; the candidate's gating
metric must be >= champion * (1 + min_rel_gain), and a paired bootstrap confidence interval of the
per-user difference must not lie below zero. Otherwise nothing moves and the refusal says why.
``promote V --to champion`` ends the A/B test in favour of the challenger; ``rollback`` puts the
previous champion back (the champion history is a registered-model tag).

Each alias move is recorded as version tags (``alias.<alias>.set_by/at/reason`` and ``..removed_*``)
and in the audit log: one JSON object per event, stored as ``audit/<ts>-<id>.json`` artifacts of
the run ``registry-audit`` in the experiment ``registry.audit_experiment``, so the log lives with
the registry whether the store is the local SQLite db or a remote server. Events are separate
files, so two concurrent writers never overwrite each other's record.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hllm import faults
from hllm.config import Config
from hllm.data import versioning
from hllm.ops import tracking
from hllm.ops.gate import GateResult, _gate_dict, gate

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"  # the pyfunc folder inside the training run
HISTORY_TAG = "hllm.champion_history"  # registered-model tag: JSON list of champion versions, oldest first
AUDIT_RUN = "registry-audit"
TAG_REFUSED = "hllm.gate.refused"  # version tag: why the last promotion of this version was refused
TAG_REFUSED_AT = "hllm.gate.refused_at"
TAG_INCOMPLETE = "hllm.incomplete"  # version tag: registered by a flow run that died before its promotion gate
RECOVERY_ACTOR = "recovery"  # the actor of the audit events that crash recovery writes
_HISTORY_MAX = 100
_DESC_MAX = 5000  # MLflow's limit on a model version description (SQL column)
_DESC_HISTORY = "**History**"


class RegistryError(RuntimeError):
    """A registry operation cannot run (missing version, no champion, ...); nothing was moved."""


class PromotionRefused(RegistryError):
    """The gate said no; ``gate`` holds the numbers."""

    def __init__(self, message: str, gate: "GateResult | None" = None):
        super().__init__(message)
        self.gate = gate


@dataclass
class MoveResult:
    action: str  # "champion" | "challenger" | "rollback" | "noop"
    version: str | None
    message: str
    previous: str | None = None
    gate: GateResult | None = None
    events: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def default_actor() -> str:
    """``$HLLM_ACTOR``, else the MLflow login of an authenticated server, else ``user@host``."""
    for var in ("HLLM_ACTOR", "MLFLOW_TRACKING_USERNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _client(cfg: Config) -> "MlflowClient":
    return tracking.client(cfg)


def _get_version(client: "MlflowClient", name: str, version: str | int) -> "ModelVersion":
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        known = sorted(int(v.version) for v in _versions(client, name))
        raise RegistryError(f"model {name!r} has no version {version} (versions: {known or 'none'})") from None


def _versions(client: "MlflowClient", name: str) -> list["ModelVersion"]:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name='{name}'", max_results=10_000))
    except MlflowException:
        return []


def _alias(client: "MlflowClient", name: str, alias: str) -> "ModelVersion | None":
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _history(client: "MlflowClient", name: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    try:
        return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]
    except json.JSONDecodeError:
        log.warning("registered model %s: tag %s is not JSON; starting a new champion history", name, HISTORY_TAG)
        return []


def _set_history(client: "MlflowClient", name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-_HISTORY_MAX:]))


# --------------------------------------------------------------------------- version descriptions
#
# What the registry UI shows first on a version's page: where it came from (written at registration)
# and, under "History", one line per gate verdict and alias move (newest last), with the numbers.


def _today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _pct(v: float) -> str:
    return f"{100 * v:.2f} %"


def registration_description(cfg: Config, run: Any) -> str:
    """The description of a new version: model kind, run, data version, protocol, test metrics."""
    rt, m = run.data.tags, run.data.metrics
    shown = dict.fromkeys([cfg.registry.gate_metric, "ndcg@10", "recall@10"])
    tests = ", ".join(
        f"{k.replace('ndcg', 'NDCG').replace('recall', 'Recall')} **{_pct(m[tracking.metric_key(k, 'test')])}**"
        for k in shown
        if tracking.metric_key(k, "test") in m
    )
    lines = [
        f"**{rt.get(tracking.TAG_MODEL_KIND, 'model')}** from run `{run.info.run_name}` (`{run.info.run_id}`), "
        f"registered {_today()}",
        "",
        f"- data version `{rt.get(tracking.TAG_DATA_VERSION, '?')}` "
        f"(data.dvc md5 `{rt.get(tracking.TAG_DVC_MD5, '?')}`)",
        f"- evaluation protocol `{rt.get(tracking.TAG_PROTOCOL, '?')}`",
        f"- test: {tests or 'no test metrics on the run'} (full ranking over every item)",
    ]
    if rt.get(tracking.TAG_FLOW_RUN):
        lines.append(f"- nightly flow run `{rt[tracking.TAG_FLOW_RUN]}`")
    return "\n".join(lines)


def _with_event(description: str, line: str, limit: int = _DESC_MAX) -> str:
    """``description`` with ``line`` appended under History; the oldest history lines go first
    when it would not fit MLflow's limit."""
    head, _, hist = (description or "").partition(_DESC_HISTORY)
    events = [e for e in hist.strip().splitlines() if e.strip()] + [f"- {line}"]
    head = head.rstrip()
    while True:
        out = (head + "\n\n" if head else "") + _DESC_HISTORY + "\n\n" + "\n".join(events)
        if len(out) <= limit or len(events) == 1:
            return out[:limit]
        events.pop(0)


def _describe(client: "MlflowClient", name: str, version: str, line: str) -> None:
    """Append ``line`` to the version's description. Best effort: the move it describes has happened."""
    try:
        desc = client.get_model_version(name, version).description or ""
        client.update_model_version(name, version, description=_with_event(desc, line))
    except Exception as e:  # noqa: BLE001
        log.warning("could not update the description of %s v%s: %s", name, version, e)


def _gate_line(res: GateResult) -> str:
    return f"protocol `{res.protocol_hash}`, data version `{res.data_version}`"


# --------------------------------------------------------------------------- audit log


def _audit_run_id(cfg: Config, client: "MlflowClient", create: bool) -> str | None:
    exp_id = tracking.configure(cfg, cfg.registry.audit_experiment)
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{tracking.TAG_KIND}` = 'audit'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    if runs:
        if runs[0].info.status == "RUNNING" and create:  # made by an older version of this code
            client.set_terminated(runs[0].info.run_id, "FINISHED")
        return runs[0].info.run_id
    if not create:
        return None
    run = client.create_run(exp_id, run_name=AUDIT_RUN, tags={tracking.TAG_KIND: "audit"})
    # a log, not a job: FINISHED at once (artifacts can still be added), so no UI shows it running forever
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def record(cfg: Config, event: dict[str, Any], client: "MlflowClient | None" = None) -> dict[str, Any]:
    """Append one event to the audit log (a new artifact file: nothing existing is rewritten)."""
    client = client or _client(cfg)
    event = {"ts": _now(), "model": cfg.registry.model_name, **event}
    run_id = _audit_run_id(cfg, client, create=True)
    assert run_id is not None  # create=True finds or creates the audit run
    stamp = event["ts"].replace(":", "").replace("+0000", "Z")
    client.log_text(run_id, json.dumps(event, sort_keys=True) + "\n", f"audit/{stamp}-{uuid.uuid4().hex[:8]}.json")
    return event


def audit_log(cfg: Config) -> list[dict[str, Any]]:
    """Every recorded event, oldest first."""
    import mlflow

    client = _client(cfg)
    run_id = _audit_run_id(cfg, client, create=False)
    if run_id is None:
        return []
    files = sorted(a.path for a in client.list_artifacts(run_id, "audit") if not a.is_dir)
    if not files:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="audit", dst_path=tmp))
        events = [json.loads((local / Path(f).name).read_text()) for f in files]
    return sorted(events, key=lambda e: e.get("ts", ""))


def _move(
    cfg: Config,
    client: "MlflowClient",
    alias: str,
    version: str,
    *,
    actor: str,
    reason: str,
    action: str,
    previous: str | None,
    extra: dict | None = None,
) -> dict:
    """Point ``alias`` at ``version``; tag who/when/why/how (``action``) and from which version on the
    version (and on the one it left); audit."""
    name = cfg.registry.model_name
    now = _now()
    client.set_registered_model_alias(name, alias, version)
    faults.point("promote:alias-set")  # a crash here: alias moved, no tags, no audit record (see recover)
    for k, v in {
        "set_by": actor,
        "set_at": now,
        "reason": reason,
        "set_action": action,
        "set_from": previous or "",
    }.items():
        client.set_model_version_tag(name, version, f"alias.{alias}.{k}", v)
    if previous and previous != version:
        for k, v in {"removed_by": actor, "removed_at": now, "removed_reason": reason}.items():
            client.set_model_version_tag(name, previous, f"alias.{alias}.{k}", v)
    return record(
        cfg,
        {
            "action": action,
            "alias": alias,
            "version": version,
            "previous": previous,
            "actor": actor,
            "reason": reason,
            **(extra or {}),
        },
        client,
    )


def _unset(
    cfg: Config, client: "MlflowClient", alias: str, version: str, *, actor: str, reason: str, action: str
) -> dict:
    name = cfg.registry.model_name
    now = _now()
    client.delete_registered_model_alias(name, alias)
    for k, v in {"removed_by": actor, "removed_at": now, "removed_reason": reason}.items():
        client.set_model_version_tag(name, version, f"alias.{alias}.{k}", v)
    return record(
        cfg,
        {"action": action, "alias": alias, "version": None, "previous": version, "actor": actor, "reason": reason},
        client,
    )


# --------------------------------------------------------------------------- registration


def register_version(
    cfg: Config, run_id: str, source: str | None = None, tags: dict[str, Any] | None = None
) -> "ModelVersion":
    """Register ``source`` (default ``runs:/<run_id>/model``) as a new version of ``registry.model_name``.

    Copies the run's lineage (protocol hash, data version, model kind, git commit) onto the version
    so the gate and ``list`` need no run lookups for them; the run must carry a protocol hash and
    a data version, or the version could never be gated.
    """
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    name = cfg.registry.model_name
    run = client.get_run(run_id)
    rt = run.data.tags
    missing = [t for t in (tracking.TAG_PROTOCOL, tracking.TAG_DATA_VERSION) if not rt.get(t)]
    if missing:
        raise RegistryError(
            f"run {run_id} has no {missing} tag(s): log the config and dataset with "
            "hllm.ops.tracking before registering (nothing was registered)"
        )
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="HLLM sequential recommender: user history -> top-K items")
    vtags = {
        k: rt[k]
        for k in (
            tracking.TAG_PROTOCOL,
            tracking.TAG_DATA_VERSION,
            tracking.TAG_DVC_MD5,
            tracking.TAG_SEQ_MD5,
            tracking.TAG_MODEL_KIND,
            tracking.TAG_GIT_COMMIT,
            tracking.TAG_FLOW_RUN,
        )
        if rt.get(k)
    }
    vtags.update({k: str(v) for k, v in (tags or {}).items()})
    source = source or f"runs:/{run_id}/{MODEL_ARTIFACT}"
    mv = client.create_model_version(
        name, source, run_id=run_id, tags=vtags, description=registration_description(cfg, run)
    )
    log.info("registered %s version %s from run %s", name, str(mv.version), run_id)
    return mv


def register_model(
    cfg: Config,
    run_id: str,
    export_dir: str | Path,
    checkpoint_dir: str | Path | None = None,
    tags: dict[str, Any] | None = None,
) -> "ModelVersion":
    """Log the serving pyfunc (see :mod:`hllm.serving.pyfunc`) into run ``run_id`` and register it.

    Idempotent (safe to retry): a run that already has a registered version gets that version back,
    and its model artifacts are not rewritten.
    """
    from hllm.serving import pyfunc as serving

    client = _client(cfg)
    existing = [mv for mv in _versions(client, cfg.registry.model_name) if mv.run_id == run_id]
    if existing:
        mv = max(existing, key=lambda m: int(m.version))
        log.info("run %s is already registered as %s version %s", run_id, cfg.registry.model_name, mv.version)
        return mv
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / MODEL_ARTIFACT
        serving.save_pyfunc(model_dir, export_dir, checkpoint_dir)
        client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
    faults.point("register:artifacts-logged")  # a crash here: artifacts in the run, no version (a FAILED run)
    return register_version(cfg, run_id, tags=tags)


# --------------------------------------------------------------------------- the gate


def reevaluate(cfg: Config, version: str | int | None = None, progress: bool = False) -> str:
    """Evaluate a registered version (default: the champion) on the data under ``paths.built_dir``
    with today's protocol, and attach the result to its run under that data version.

    The nightly flow calls it when the data moved on, so that the gate can compare the new
    candidate with the champion on the same users. Uses the weights and tower configs bundled in
    the registered model, so it needs nothing from the machine that trained it. Returns the
    artifact directory the evaluation was attached under.
    """
    import mlflow

    from hllm.evaluation.evaluate import evaluate_checkpoint
    from hllm.serving import pyfunc as serving

    client = _client(cfg)
    name = cfg.registry.model_name
    if version is None:
        mv = _alias(client, name, CHAMPION)
        if mv is None:
            raise RegistryError(f"model {name!r} has no champion to re-evaluate")
    else:
        mv = _get_version(client, name, version)
    dv = versioning.data_version(cfg).version
    with tempfile.TemporaryDirectory(prefix="hllm-reeval-") as tmp:
        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}", dst_path=str(Path(tmp) / "m"))
        arts = serving.model_artifacts(local)
        if "checkpoint" not in arts:
            raise RegistryError(f"version {mv.version} was registered without a checkpoint; cannot re-evaluate it")
        ckpt = serving.runtime_checkpoint(arts, Path(tmp) / "rt", built_dir=Path(cfg.paths.built_dir).resolve())
        try:
            res = evaluate_checkpoint(ckpt, cfg, ("test",), progress=progress)["test"]
        except ValueError as e:  # e.g. the catalogue changed size under an ID model
            raise RegistryError(f"version {mv.version} cannot be evaluated on {cfg.paths.built_dir}: {e}") from e
    art = tracking.attach(mv.run_id, cfg).log_eval_result(res, dv, log_as_metrics=False)
    log.info("version %s re-evaluated on data %s: %s", mv.version, dv, {k: round(v, 5) for k, v in res.metrics.items()})
    return art


# --------------------------------------------------------------------------- alias moves


def promote(
    cfg: Config,
    version: str | int | None,
    to: str = CHALLENGER,
    reason: str = "",
    actor: str | None = None,
    share: float | None = None,
) -> MoveResult:
    """Move an alias to ``version`` after the checks; raises :class:`PromotionRefused` /
    :class:`RegistryError` with the reason (and moves nothing) otherwise.

    - no champion yet: ``version`` becomes champion, whatever ``to`` says;
    - ``to="challenger"``: gate against the champion, then set ``challenger`` + the A/B tags;
    - ``to="champion"``: ``version`` (default: the current challenger) must be the challenger;
      it becomes champion, ``challenger`` is removed, the A/B test is closed.
    Repeating a promotion that already holds is a no-op.
    """
    if to not in (CHALLENGER, CHAMPION):
        raise RegistryError(f"--to must be {CHALLENGER!r} or {CHAMPION!r}, got {to!r}")
    client = _client(cfg)
    name = cfg.registry.model_name
    actor = actor or default_actor()
    champion = _alias(client, name, CHAMPION)
    challenger = _alias(client, name, CHALLENGER)
    if version is None:
        if to != CHAMPION or challenger is None:
            raise RegistryError("no version given" + ("" if to != CHAMPION else " and there is no challenger"))
        version = str(challenger.version)
    mv = _get_version(client, name, version)
    v = str(mv.version)
    if champion is not None and str(champion.version) == v:
        return MoveResult("noop", v, f"version {v} is already the champion; nothing moved")
    if champion is None:
        why = reason or "first champion: there was no champion to compare with"
        ev = _move(cfg, client, CHAMPION, v, actor=actor, reason=why, action="promote", previous=None)
        _set_history(client, name, [*_history(client, name), v])
        _describe(client, name, v, f"{_today()}: **first champion** of {name} (no champion to gate against; {actor})")
        return MoveResult(
            CHAMPION, v, f"version {v} is the first champion of {name} (no champion to gate against)", events=[ev]
        )
    if to == CHALLENGER:
        return _to_challenger(cfg, client, mv, champion, challenger, reason=reason, actor=actor, share=share)
    return _to_champion(cfg, client, mv, champion, challenger, reason=reason, actor=actor)


def _refuse(cfg: Config, client: MlflowClient, alias: str, v: str, actor: str, res: GateResult, **extra: Any) -> None:
    """Record a refused move in the audit log (the caller raises :class:`PromotionRefused`)."""
    event = {"action": "refused", "alias": alias, "version": v, "actor": actor, "reason": res.reason, **extra}
    record(cfg, event, client)
    name = cfg.registry.model_name
    try:
        client.set_model_version_tag(name, v, TAG_REFUSED, f"{alias}: {res.reason}"[:5000])
        client.set_model_version_tag(name, v, TAG_REFUSED_AT, _now())
    except Exception as e:  # noqa: BLE001
        log.warning("could not tag %s v%s as refused: %s", name, v, e)
    _describe(client, name, v, f"{_today()}: **refused as {alias}** ({actor}): {res.reason}; {_gate_line(res)}")


def _ab_tags(cfg: Config, res: GateResult, champion: ModelVersion, share: float) -> dict[str, Any]:
    """The ``ab.*`` tags a challenger carries: the test's state and the gate's numbers that let it in."""
    return {
        "ab.status": "running",
        "ab.share": share,
        "ab.start": _now(),
        "ab.champion_version": str(champion.version),
        "ab.gate_metric": res.metric,
        "ab.min_rel_gain": cfg.registry.min_rel_gain,
        "ab.candidate_value": res.candidate,
        "ab.champion_value": res.champion,
        "ab.rel_gain": res.rel_gain,
        "ab.ci_low": res.ci_low,
        "ab.ci_high": res.ci_high,
        "ab.confidence": res.confidence,
        "ab.bootstrap_samples": res.samples,
        "ab.n_users": res.n_users,
        "ab.protocol_hash": res.protocol_hash,
        "ab.data_version": res.data_version,
    }


def _to_challenger(
    cfg: Config,
    client: MlflowClient,
    mv: ModelVersion,
    champion: ModelVersion,
    challenger: ModelVersion | None,
    *,
    reason: str,
    actor: str,
    share: float | None,
) -> MoveResult:
    """Gate ``mv`` against the champion; passed: it becomes the challenger of a new A/B test."""
    name, v = cfg.registry.model_name, str(mv.version)
    if challenger is not None and str(challenger.version) == v:
        return MoveResult("noop", v, f"version {v} is already the challenger; nothing moved")
    res = gate(cfg, mv, champion, client)
    if not res.ok:
        _refuse(cfg, client, CHALLENGER, v, actor, res, previous=None, champion=str(champion.version))
        raise PromotionRefused(f"version {v} not promoted to challenger: {res.reason}", res)
    share = cfg.registry.challenger_share if share is None else share
    if not 0.0 < share < 1.0:
        raise RegistryError(f"challenger share must be in (0, 1), got {share}")
    previous = str(challenger.version) if challenger else None
    if challenger is not None:
        client.set_model_version_tag(name, str(challenger.version), "ab.status", f"replaced by v{v}")
        client.set_model_version_tag(name, str(challenger.version), "ab.end", _now())
    for k, val in _ab_tags(cfg, res, champion, share).items():
        client.set_model_version_tag(name, v, k, str(val))
    why = reason or f"gate passed ({res.metric} {res.candidate:.5f} vs {res.champion:.5f})"
    extra = {"share": share, "gate": _gate_dict(res)}
    ev = _move(cfg, client, CHALLENGER, v, actor=actor, reason=why, action="promote", previous=previous, extra=extra)
    _describe(
        client,
        name,
        v,
        f"{_today()}: **challenger** with {share:.0%} of the traffic against champion v{champion.version} "
        f"({actor}): gate {res.reason}; {_gate_line(res)}",
    )
    if previous:
        _describe(client, name, previous, f"{_today()}: challenger replaced by v{v}")
    message = (
        f"version {v} is the challenger with {share:.0%} of the traffic against champion "
        f"v{str(champion.version)}; {res.reason}"
    )
    return MoveResult(CHALLENGER, v, message, previous=previous, gate=res, events=[ev])


def _to_champion(
    cfg: Config,
    client: MlflowClient,
    mv: ModelVersion,
    champion: ModelVersion,
    challenger: ModelVersion | None,
    *,
    reason: str,
    actor: str,
) -> MoveResult:
    """End the A/B test in favour of the challenger ``mv`` (re-gated if the champion moved since)."""
    name, v, champ = cfg.registry.model_name, str(mv.version), str(champion.version)
    if challenger is None or str(challenger.version) != v:
        raise PromotionRefused(
            f"version {v} is not the challenger (challenger: {str(challenger.version) if challenger else 'none'}); "
            f"only the challenger of a running A/B test can become champion: run `hllm registry promote {v}` first"
        )
    res = None
    if mv.tags.get("ab.champion_version") != champ:  # champion moved (e.g. rollback) since the challenger was gated
        res = gate(cfg, mv, champion, client)
        if not res.ok:
            _refuse(cfg, client, CHAMPION, v, actor, res, previous=champ)
            raise PromotionRefused(
                f"version {v} not promoted to champion: the champion changed to v{champ} since the A/B test "
                f"started and {res.reason}",
                res,
            )
    why = reason or "A/B test ended in favour of the challenger"
    events = [_move(cfg, client, CHAMPION, v, actor=actor, reason=why, action="promote", previous=champ)]
    client.delete_registered_model_alias(name, CHALLENGER)
    for k, val in {"ab.status": "won", "ab.end": _now()}.items():
        client.set_model_version_tag(name, v, k, val)
    for k, val in {"removed_by": actor, "removed_at": _now(), "removed_reason": "became champion"}.items():
        client.set_model_version_tag(name, v, f"alias.{CHALLENGER}.{k}", val)
    _set_history(client, name, [*_history(client, name), v])
    _describe(client, name, v, f"{_today()}: **champion** (was v{champ}; {actor}): {why}")
    _describe(client, name, champ, f"{_today()}: champion replaced by v{v}: {why}")
    message = f"version {v} is the champion (was v{champ}); A/B test closed"
    return MoveResult(CHAMPION, v, message, previous=champ, gate=res, events=events)


def end_ab(cfg: Config, reason: str = "", actor: str | None = None) -> MoveResult:
    """End the A/B test in favour of the champion: remove ``challenger`` (no-op without one)."""
    client = _client(cfg)
    name = cfg.registry.model_name
    challenger = _alias(client, name, CHALLENGER)
    if challenger is None:
        return MoveResult("noop", None, "there is no challenger; nothing moved")
    why = reason or "A/B test ended in favour of the champion"
    ev = _unset(
        cfg, client, CHALLENGER, str(challenger.version), actor=actor or default_actor(), reason=why, action="end_ab"
    )
    for k, val in {"ab.status": "lost", "ab.end": _now()}.items():
        client.set_model_version_tag(name, str(challenger.version), k, val)
    _describe(client, name, str(challenger.version), f"{_today()}: A/B test lost, challenger removed: {why}")
    return MoveResult(
        "end_ab",
        str(challenger.version),
        f"challenger v{str(challenger.version)} removed; A/B test closed",
        events=[ev],
    )


def rollback(
    cfg: Config,
    reason: str = "",
    actor: str | None = None,
    expect_current: str | int | None = None,
    force: bool = False,
) -> MoveResult:
    """Put the previous champion back. Safe to repeat:

    - with ``expect_current`` it only rolls back while that version is still the champion;
    - without it, a champion that a rollback put in place (its ``alias.champion.set_action`` tag)
      is not rolled back again: a repeated or retried rollback is a no-op that says so, and the
      audit log gets nothing. ``force`` (or ``expect_current`` naming that champion) goes one
      further step back on purpose.
    """
    client = _client(cfg)
    name = cfg.registry.model_name
    champion = _alias(client, name, CHAMPION)
    if champion is None:
        raise RegistryError(f"model {name!r} has no champion; nothing to roll back")
    cur = str(champion.version)
    if expect_current is not None and str(expect_current) != cur:
        return MoveResult("noop", cur, f"champion is v{cur}, not v{expect_current}: already rolled back; nothing moved")
    t = champion.tags or {}
    if expect_current is None and not force and t.get(f"alias.{CHAMPION}.set_action") == "rollback":
        frm = t.get(f"alias.{CHAMPION}.set_from") or "?"
        return MoveResult(
            "noop",
            cur,
            f"champion v{cur} is already the result of a rollback from v{frm} "
            f"({t.get(f'alias.{CHAMPION}.set_at', '?')} by {t.get(f'alias.{CHAMPION}.set_by', '?')})"
            f"; nothing moved. To roll v{cur} back as well: --from {cur} (or --force)",
            previous=frm,
        )
    history = _history(client, name)
    while history and history[-1] == str(champion.version):
        history.pop()
    if not history:
        raise RegistryError(f"champion v{str(champion.version)} has no previous champion to roll back to")
    prev = history[-1]
    why = reason or f"rollback of v{str(champion.version)}"
    actor = actor or default_actor()
    ev = _move(cfg, client, CHAMPION, prev, actor=actor, reason=why, action="rollback", previous=str(champion.version))
    client.set_model_version_tag(name, str(champion.version), "hllm.rolled_back_at", _now())
    _describe(client, name, str(champion.version), f"{_today()}: rolled back to v{prev}: {why}")
    _describe(client, name, prev, f"{_today()}: **champion again** (rollback of v{champion.version}): {why}")
    _set_history(client, name, history)
    return MoveResult(
        "rollback",
        prev,
        f"champion rolled back from v{str(champion.version)} to v{prev}",
        previous=str(champion.version),
        events=[ev],
    )


# --------------------------------------------------------------------------- crash recovery


def _audited_aliases(cfg: Config, events: list[dict[str, Any]]) -> dict[str, str | None]:
    """Where the audit log says each alias points: the last event that moved or removed it."""
    state: dict[str, str | None] = {}
    for e in events:
        if e.get("model", cfg.registry.model_name) != cfg.registry.model_name or not e.get("alias"):
            continue
        if e.get("action") == "refused":  # a refusal moves nothing
            continue
        state[e["alias"]] = str(e["version"]) if e.get("version") else None
    return state


def _promotion_ran(mv: "ModelVersion", aliases: dict[str, str]) -> bool:
    t = mv.tags or {}
    return (
        str(mv.version) in aliases.values()
        or TAG_REFUSED in t
        or any(k.startswith("alias.") and k.endswith(".set_at") for k in t)
    )


def recover(cfg: Config) -> list[str]:
    """Make the registry consistent after a crash of a flow run (or of a hand-run ``hllm registry``
    command); returns what was done. Called by the nightly flow at its start, while it holds the slot
    and after the dead runs were closed FAILED (:func:`flows.slot.fail_orphans`).

    - An alias that points elsewhere than the audit log says (a crash in :func:`_move` between the
      alias and its record) gets its tags completed and a ``recovered`` audit event with actor
      :data:`RECOVERY_ACTOR`; a champion missing from the champion history is appended to it; a
      challenger left on the champion (a crash while the A/B test ended) is removed.
    - A version registered by a flow run that then died (its MLflow parent run ended, not
      FINISHED) before the promotion gate ran is tagged :data:`TAG_INCOMPLETE`, so that users see
      it was never gated; it keeps no alias and the rerun gates its own version. Why not promote it
      in the rerun: the rerun trains a version of its own on the night's data and gates that one;
      gating two candidates in one night would make the A/B state depend on the order of crashes.

    Registration itself needs no repair: artifacts are logged before the version is created and
    :func:`register_model` never registers a run twice; a crash between the two leaves a FAILED
    run with artifacts and no version.
    """
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    name = cfg.registry.model_name
    try:
        aliases = {a: str(v) for a, v in (client.get_registered_model(name).aliases or {}).items()}
    except MlflowException:
        return []  # nothing registered yet
    done: list[str] = []
    audited = _audited_aliases(cfg, audit_log(cfg))
    for alias in sorted(set(aliases) | {a for a, v in audited.items() if v}):
        have, logged = aliases.get(alias), audited.get(alias)
        if have == logged:
            continue
        now = _now()
        if have is not None:
            t = client.get_model_version(name, have).tags or {}
            if not t.get(f"alias.{alias}.set_at"):
                tags = {"set_by": RECOVERY_ACTOR, "set_at": now, "set_action": "recovered", "set_from": logged or "",
                        "reason": "alias found moved without its audit record (crash during the move)"}  # fmt: skip
                for k, v in tags.items():
                    client.set_model_version_tag(name, have, f"alias.{alias}.{k}", v)
            if alias == CHAMPION:
                history = _history(client, name)
                if not history or history[-1] != have:
                    _set_history(client, name, [*history, have])
        reason = (
            f"alias {alias!r} points at {f'v{have}' if have else 'no version'} but the audit log's last "
            f"move of it says {f'v{logged}' if logged else 'nothing'}: the move's record was lost in a crash; "
            "recorded now"
        )
        record(cfg, {"action": "recovered", "alias": alias, "version": have, "previous": logged,
                     "actor": RECOVERY_ACTOR, "reason": reason}, client)  # fmt: skip
        done.append(reason)
    if aliases.get(CHALLENGER) and aliases.get(CHALLENGER) == aliases.get(CHAMPION):
        v = aliases[CHALLENGER]
        _unset(cfg, client, CHALLENGER, v, actor=RECOVERY_ACTOR, action="recovered",
               reason=f"v{v} became champion; a crash left it challenger too")  # fmt: skip
        aliases.pop(CHALLENGER)
        done.append(f"removed alias challenger from champion v{v} (a crash ended the A/B test half-way)")
    for mv in _versions(client, name):
        t = mv.tags or {}
        flow_run = t.get(tracking.TAG_FLOW_RUN)
        if not flow_run or not mv.run_id or t.get(TAG_INCOMPLETE) or _promotion_ran(mv, aliases):
            continue
        try:
            parent_id = client.get_run(mv.run_id).data.tags.get("mlflow.parentRunId")
            status = client.get_run(parent_id).info.status if parent_id else None
        except MlflowException:
            continue
        if status in (None, "FINISHED", "RUNNING"):  # a clean run (promote=false), or a live one
            continue
        why = f"flow run {flow_run} ended {status} after registering v{mv.version}, before its promotion gate ran"
        client.set_model_version_tag(name, str(mv.version), TAG_INCOMPLETE, f"{why}: never gated; no alias")
        if t.get("ab.status") == "running":  # the gate had started writing the A/B tags
            client.set_model_version_tag(name, str(mv.version), "ab.status", "never started (crash)")
        _describe(client, name, str(mv.version), f"{_today()}: **incomplete**: {why}")
        done.append(f"v{mv.version} tagged {TAG_INCOMPLETE}: {why}")
    for line in done:
        log.warning("crash recovery: %s", line)
    return done


# --------------------------------------------------------------------------- listing


def list_versions(cfg: Config) -> list[dict[str, Any]]:
    """One row per version, newest first: aliases, lineage, test metrics of its own run, A/B tags."""
    client = _client(cfg)
    name = cfg.registry.model_name
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except Exception:  # no such model yet
        return []
    by_version: dict[str, list[str]] = {}
    for alias, ver in aliases.items():
        by_version.setdefault(str(ver), []).append(alias)
    rows = []
    for mv in sorted(_versions(client, name), key=lambda m: int(m.version), reverse=True):
        try:
            metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
        except Exception:  # the run was deleted: still list the version
            metrics = {}
        t = mv.tags
        rows.append(
            {
                "version": str(mv.version),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
                "model_kind": t.get(tracking.TAG_MODEL_KIND, ""),
                "data_version": t.get(tracking.TAG_DATA_VERSION, ""),
                "protocol_hash": t.get(tracking.TAG_PROTOCOL, ""),
                "metrics": {
                    k.split("/", 1)[1].replace("_at_", "@"): v for k, v in metrics.items() if k.startswith("test/")
                },
                "ab": {k[3:]: v for k, v in t.items() if k.startswith("ab.")},
                "incomplete": t.get(TAG_INCOMPLETE, ""),  # why its flow run never gated it (crash recovery)
                "run_id": mv.run_id,
            }
        )
    return rows
