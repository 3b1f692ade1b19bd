"""The A/B recommendation service: champion and challenger from the MLflow registry behind one HTTP API.

``create_app(cfg, options)`` builds a FastAPI app (``hllm serve`` runs it under uvicorn):

- ``POST /recommend`` ``{"user_id"?, "history"?, "k"?}``: a known user gets their recommendations (their
  exported vector), an unknown user with a ``history`` of item ids is scored from the history (the user
  tower); the user is assigned deterministically (:func:`hllm.abtest.assignment.assign`) to the champion
  or the challenger of the running experiment. Response: ``items``, ``scores``, ``arm`` (the assigned
  arm; null when the user is not in the experiment), ``served_arm``, ``model_version``,
  ``experiment_id``, ``exposure_id``, ``fallback``. Every answered request is one exposure record.
- ``POST /feedback`` ``{"exposure_id", "event": "click"|"consume", "item_id", "user_id"?}`` -> 202 and one
  outcome record. An ``exposure_id`` this process does not know (served before a restart, by another
  replica, or older than the in-memory window) is still accepted and logged with
  ``known_exposure=false``: the analysis joins outcomes to the exposure log by ``exposure_id`` and drops
  what does not join, so the service never loses an outcome it cannot check. The response says
  ``known_exposure``.
- ``GET /healthz`` (the process is alive, plus the versions it serves), ``GET /readyz`` (200 once the
  champion is loaded, 503 before), ``GET /metrics`` (Prometheus text format: requests per endpoint, arm
  and status, a latency histogram per served arm, errors, fallbacks, swaps, log records).

Bad requests are 4xx, never 5xx: malformed JSON, wrong types, unknown fields (``extra="forbid"``), ``k``
outside 1..100 and oversized histories are 422 from the request model (FastAPI's error list: each entry
names the field in ``loc``); an unknown user without a history is 404 and unknown item ids are 422, in
the same ``{"detail": [{"loc", "msg", "type"}]}`` shape. Validation uses the champion's catalogue.

The models: :class:`ModelPool` resolves ``models:/<registry.model_name>@champion`` and ``@challenger``
to versions through the MLflow client, downloads each version's registered pyfunc folder and builds its
:class:`hllm.serving.recommend.Recommender` from the bundled export + checkpoint (the same artifacts
``HLLMRecommenderModel.load_context`` uses, without the pyfunc wrapper). A poller re-resolves the
aliases every ``poll_s`` seconds; on a change it loads the new versions fully, then swaps one reference
(:class:`PoolState`). A request reads that reference once, so it is answered entirely by one state:
no request fails or mixes versions during a swap.

The experiment is built from the registry: bound to the two concrete versions, with the id
``<model>-v<champion>-v<challenger>-<8 hex of sha256(ab.start)>`` (or the ``ab.experiment_id`` tag), so
moving either alias starts a new experiment with new salts. ``ab.share`` (the challenger's share of all
traffic, set by ``hllm registry promote``) becomes balanced arms: exposure ``min(1, 2 * share)``, split
``share / exposure``, so the champion arm is as large as the challenger arm and the rest of the traffic
gets the champion outside the experiment. Explicit ``ab.exposure`` / ``ab.split`` / ``ab.layer`` tags
win. Raising the share keeps the experiment (a ramp: nobody moves arm); lowering it without a new
``ab.start`` is refused and the old experiment keeps running. No challenger: everyone gets the champion.

A challenger that raises or takes longer than ``challenger_timeout_s`` falls back to the champion: the
exposure records ``intended_arm=challenger, served_arm=champion, fallback=true`` and the error.

Modes: ``ab`` (default) and ``shadow`` (everyone gets the champion; on a ``shadow_sample`` of requests
the challenger is scored off the request path and the exposure records its slate, overlap@K and
latency), and team-draft ``interleave`` (Radlinski et al. 2008: a user in the experiment gets one slate
merged from both arms: each round a coin seeded by the exposure decides which team picks first, each
picks its best item not yet in the slate; the exposure records each position's team in ``teams`` and a
click's outcome the team it credits in ``credit``; a challenger that fails leaves the champion's slate).

Speed (``benchmarks/serve_load.py``; docs/results.md, "Serving"): the handlers are coroutines that return
a ready ``Response`` (no worker-thread hop, no second validation of the response model). A known user's
slate is cached per loaded version (``(user_id, k)``; an export never changes) and assignments per pool
state (a pure function of experiment and user; a new experiment is a new state), both bounded by
``ServeOptions.user_cache``. Histories run through the user model in a thread pool and the challenger in
its own pool under its timeout, so the event loop keeps answering; the log append that fills a part
file (a Parquet write, a PUT on S3) is handed to a log thread.

Test/chaos hook: ``app.state.service.faults`` maps an arm to ``"raise"`` or a delay in seconds applied
before that arm scores.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hllm.abtest import logs as ablogs
from hllm.abtest.assignment import CHALLENGER, CHAMPION, Arm, Assignment, Experiment, assign
from hllm.config import Config
from hllm.ops import tracking

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from hllm.serving.recommend import Recommender

log = logging.getLogger(__name__)

MODES = ("ab", "shadow", "interleave")
INTERLEAVED: Literal["interleaved"] = "interleaved"  # the served_arm of a team-draft slate
ServedArm = Literal["champion", "challenger", "interleaved"]
DEFAULT_LAYER = "hllm-recommend"
K_MAX = 100
HISTORY_HARD_MAX = 10_000  # parse-time bound; ServeOptions.max_history is the served limit
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class ServeOptions:
    """How ``hllm serve`` runs (none of it changes which user gets which arm)."""

    log_dir: str = "reports/ab/logs"  # local folder or URI (s3://bucket/prefix)
    mode: str = "ab"  # ab | shadow | interleave
    poll_s: float = 5.0  # registry poll period
    flush_every: int = 1000  # log records per part file
    flush_s: float = 5.0  # at most this many seconds between flushes
    challenger_timeout_s: float = 0.5  # a slower challenger falls back to the champion
    max_history: int = 200  # longer histories are refused (422)
    shadow_sample: float = 1.0  # shadow mode: share of requests the challenger scores
    layer: str = DEFAULT_LAYER  # assignment layer unless the challenger has an ab.layer tag
    exposure_cache: int = 100_000  # exposures kept in memory to check /feedback
    user_cache: int = 200_000  # per state: known-user slates per version ((user, k)) and assignments; 0: off
    log_filesystem: Any = None  # a pyarrow or fsspec filesystem for log_dir (default: from the URI)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.poll_s <= 0 or self.challenger_timeout_s <= 0:
            raise ValueError("poll_s and challenger_timeout_s must be > 0")
        if not 1 <= self.max_history <= HISTORY_HARD_MAX:
            raise ValueError(f"max_history must be in 1..{HISTORY_HARD_MAX}, got {self.max_history}")
        if not 0.0 <= self.shadow_sample <= 1.0:
            raise ValueError(f"shadow_sample must be in [0, 1], got {self.shadow_sample}")


# --------------------------------------------------------------------------- models and experiment


@dataclass(frozen=True)
class LoadedModel:
    """One registered version, loaded and ready to score."""

    version: str
    uri: str  # models:/<name>/<version>
    data_version: str | None
    recommender: Recommender
    users: frozenset[str]
    items: frozenset[str]
    # (user_id, k) -> (items, scores) of a known user: a version's export never changes, so its slates
    # don't either; the cache lives and dies with this version's state (filled up to ServeOptions.user_cache)
    slates: dict[tuple[str, int], tuple[tuple[str, ...], tuple[float, ...]]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def scores_histories(self) -> bool:
        return self.recommender.model is not None


@dataclass(frozen=True)
class PoolState:
    """What the service serves right now; replaced whole, never mutated."""

    champion: LoadedModel
    challenger: LoadedModel | None
    experiment: Experiment | None
    loaded_at: float = field(default_factory=time.time)
    # user_id -> assign(experiment, user_id): a pure function of the two, so cached for this state's
    # experiment only (a ramp or a new experiment is a new state, with an empty cache)
    assignments: dict[str, Assignment] = field(default_factory=dict, compare=False, repr=False)

    def model(self, arm: str) -> LoadedModel:
        if arm == CHALLENGER and self.challenger is not None:
            return self.challenger
        return self.champion


def team_draft(a: Sequence[str], b: Sequence[str], k: int, seed: str) -> tuple[list[str], list[str]]:
    """Team-draft interleaving of two rankings into one slate of ``k``: returns (items, teams) with
    teams[i] = "champion" (list ``a``) or "challenger" (``b``). Each round both teams pick once, the
    first pick decided by a coin flip from ``sha256(seed, round)``; a team picks its best item not in the
    slate yet. Deterministic in ``seed`` (the exposure), so a replay gives the same slate."""
    import hashlib

    items: list[str] = []
    teams: list[str] = []
    taken: set[str] = set()
    lists: dict[str, list[str]] = {CHAMPION: list(a), CHALLENGER: list(b)}
    pos: dict[str, int] = {CHAMPION: 0, CHALLENGER: 0}

    def pick(team: str) -> bool:
        src = lists[team]
        while pos[team] < len(src) and src[pos[team]] in taken:
            pos[team] += 1
        if pos[team] >= len(src):
            return False
        item = src[pos[team]]
        items.append(item)
        teams.append(team)
        taken.add(item)
        return True

    rnd = 0
    while len(items) < k:
        coin = hashlib.sha256(f"{seed}\x1f{rnd}".encode()).digest()[0] & 1
        order = (CHAMPION, CHALLENGER) if coin == 0 else (CHALLENGER, CHAMPION)
        progressed = False
        for team in order:
            if len(items) < k and pick(team):
                progressed = True
        if not progressed:
            break
        rnd += 1
    return items, teams


def _round_share(x: float) -> float:
    return round(float(x), 4)


def experiment_from_tags(
    model_name: str,
    champion_version: str,
    challenger_version: str,
    tags: dict[str, str],
    *,
    default_share: float,
    layer: str = DEFAULT_LAYER,
) -> Experiment:
    """The experiment of a champion/challenger pair from the challenger version's ``ab.*`` tags (see
    the module docstring for the rule); raises ValueError on malformed tags."""
    start = tags.get("ab.start", "")
    exp_id = tags.get("ab.experiment_id") or (
        f"{model_name}-v{champion_version}-v{challenger_version}-{hashlib.sha256(start.encode()).hexdigest()[:8]}"
    )
    if "ab.exposure" in tags or "ab.split" in tags:
        exposure = _round_share(float(tags.get("ab.exposure", "1.0")))
        split = _round_share(float(tags.get("ab.split", "0.5")))
    else:
        share = _round_share(float(tags.get("ab.share", default_share)))
        if not 0.0 < share < 1.0:
            raise ValueError(f"ab.share must be in (0, 1), got {share}")
        exposure = min(1.0, _round_share(2 * share))
        split = _round_share(share / exposure)
    created = None
    if start:
        try:
            datetime.fromisoformat(start)
            created = start
        except ValueError:
            pass
    return Experiment(
        experiment_id=exp_id,
        layer=tags.get("ab.layer", layer),
        champion_version=str(champion_version),
        challenger_version=str(challenger_version),
        exposure=exposure,
        split=split,
        created_at=created,
    )


def load_version(cfg: Config, version: str, work_dir: Path, client: MlflowClient | None = None) -> LoadedModel:
    """Download version ``version`` of ``registry.model_name`` and build its recommender from the pyfunc
    artifacts (export + checkpoint)."""
    import mlflow

    from hllm.serving import pyfunc
    from hllm.serving.recommend import Recommender

    client = client or tracking.client(cfg)
    name = cfg.registry.model_name
    mv = client.get_model_version(name, str(version))
    uri = f"models:/{name}/{mv.version}"
    dst = work_dir / f"v{mv.version}-{uuid.uuid4().hex[:8]}"
    dst.mkdir(parents=True)
    t0 = time.perf_counter()
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=uri, dst_path=str(dst / "model"), tracking_uri=tracking.resolve_tracking_uri(cfg)
    )
    arts = pyfunc.model_artifacts(local)
    if "checkpoint" in arts:
        ckpt = pyfunc.runtime_checkpoint(arts, dst / "runtime")
        rec = Recommender.from_export(arts["export"], checkpoint=ckpt)
    else:
        rec = Recommender.from_export(arts["export"])
    loaded = LoadedModel(
        version=str(mv.version),
        uri=uri,
        data_version=(mv.tags or {}).get(tracking.TAG_DATA_VERSION),
        recommender=rec,
        users=frozenset(str(u) for u in rec.user_ids),
        items=frozenset(str(i) for i in rec.item_ids),
    )
    log.info(
        "loaded %s (%d users, %d items) in %.2f s", uri, len(loaded.users), len(loaded.items), time.perf_counter() - t0
    )
    return loaded


class ModelPool:
    """The champion and challenger of ``registry.model_name``, kept in step with the registry aliases.

    ``state`` is None until the champion is loaded. :meth:`refresh` is the whole update: resolve,
    load what is new, build the experiment, then one reference assignment."""

    def __init__(self, cfg: Config, work_dir: Path, *, layer: str = DEFAULT_LAYER) -> None:
        self.cfg = cfg
        self.name = cfg.registry.model_name
        self.work_dir = work_dir
        self.layer = layer
        self.state: PoolState | None = None
        self.swaps = 0
        self.poll_errors = 0
        self.last_error: str | None = None
        self._loaded: dict[str, LoadedModel] = {}
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = tracking.client(self.cfg)
        return self._client

    def resolve(self) -> tuple[str | None, str | None, dict[str, str]]:
        """(champion version, challenger version, challenger tags) from the registry; None for a missing
        alias (or model). Store errors propagate."""
        from mlflow.exceptions import MlflowException

        try:
            aliases = dict(self.client.get_registered_model(self.name).aliases or {})
        except MlflowException as e:
            if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return None, None, {}
            raise
        champ = aliases.get("champion")
        chall = aliases.get("challenger")
        champ = str(champ) if champ is not None else None
        chall = str(chall) if chall is not None else None
        if chall is None or chall == champ:
            return champ, None, {}
        tags = dict(self.client.get_model_version(self.name, chall).tags or {})
        return champ, chall, tags

    def _experiment(self, champ: str, chall: str | None, tags: dict[str, str]) -> Experiment | None:
        if chall is None:
            return None
        try:
            new = experiment_from_tags(
                self.name, champ, chall, tags, default_share=self.cfg.registry.challenger_share, layer=self.layer
            )
        except ValueError as e:
            self.last_error = f"challenger v{chall}: bad ab.* tags ({e}); serving the champion only"
            log.error("%s", self.last_error)
            return None
        old = self.state.experiment if self.state is not None else None
        same_pair = old is not None and (old.champion_version, old.challenger_version) == (champ, chall)
        if old is not None and same_pair and old.experiment_id == new.experiment_id and old != new:
            try:  # the same experiment with a new exposure: only a ramp up is allowed
                ramped = old.ramp(new.exposure)
            except ValueError as e:
                self.last_error = f"{e}; keeping exposure {old.exposure}"
                log.error("%s", self.last_error)
                return old
            return ramped if ramped == new else old
        return new

    def _get(self, version: str) -> LoadedModel:
        if version not in self._loaded:
            self._loaded[version] = load_version(self.cfg, version, self.work_dir, self.client)
        return self._loaded[version]

    def refresh(self) -> bool:
        """Bring the state in line with the registry; True when it changed."""
        with self._refresh_lock:
            champ_v, chall_v, tags = self.resolve()
            if champ_v is None:
                if self.state is None:
                    self.last_error = f"model {self.name!r} has no champion yet"
                else:  # keep serving what we have: removing the champion is not a way to stop traffic
                    self.last_error = (
                        f"model {self.name!r} lost its champion alias; still serving v{self.state.champion.version}"
                    )
                log.warning("%s", self.last_error)
                return False
            experiment = self._experiment(champ_v, chall_v, tags)
            cur = self.state
            if (
                cur is not None
                and cur.champion.version == champ_v
                and (cur.challenger.version if cur.challenger else None) == chall_v
                and cur.experiment == experiment
            ):
                return False
            champion = self._get(champ_v)  # load fully before the swap
            challenger = self._get(chall_v) if chall_v is not None else None
            self.state = PoolState(champion, challenger, experiment)  # the swap: one reference assignment
            self.swaps += 1
            keep = {champ_v, chall_v}
            for v in [v for v in self._loaded if v not in keep]:
                del self._loaded[v]  # in-flight requests still hold their state's models
            log.info(
                "serving champion v%s, challenger %s, experiment %s",
                champ_v,
                f"v{chall_v}" if chall_v else "none",
                experiment.experiment_id if experiment else "none",
            )
            return True

    def _poll(self, poll_s: float) -> None:
        while True:
            try:
                self.refresh()
            except Exception as e:  # the store is down, a download failed: keep serving, retry
                self.poll_errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("registry poll failed (still serving the current models): %s", self.last_error)
            if self._stop.wait(poll_s):
                return

    def start(self, poll_s: float) -> None:
        """Load now and re-resolve every ``poll_s`` seconds, in a background thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, args=(poll_s,), name="hllm-registry-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


# --------------------------------------------------------------------------- metrics


class Metrics:
    """Counters and histograms, rendered by hand in the Prometheus text format (version 0.0.4)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.fallbacks: dict[str, int] = {}
        self.feedback: dict[tuple[str, str], int] = {}
        self._hist: dict[str, list[int]] = {}
        self._sum: dict[str, float] = {}

    def request(self, endpoint: str, arm: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            key = (endpoint, arm, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            if seconds is not None:
                counts = self._hist.setdefault(arm, [0] * (len(LATENCY_BUCKETS_S) + 1))
                i = next((j for j, b in enumerate(LATENCY_BUCKETS_S) if seconds <= b), len(LATENCY_BUCKETS_S))
                counts[i] += 1
                self._sum[arm] = self._sum.get(arm, 0.0) + seconds

    def error(self, arm: str, kind: str) -> None:
        with self._lock:
            self.errors[(arm, kind)] = self.errors.get((arm, kind), 0) + 1

    def fallback(self, reason: str) -> None:
        with self._lock:
            self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    def outcome(self, event: str, known: bool) -> None:
        with self._lock:
            key = (event, str(known).lower())
            self.feedback[key] = self.feedback.get(key, 0) + 1

    def render(self, extra: Sequence[str] = ()) -> str:
        def esc(v: str) -> str:
            return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

        out: list[str] = []
        with self._lock:
            out += [
                "# HELP hllm_requests_total HTTP requests by endpoint, arm and status.",
                "# TYPE hllm_requests_total counter",
            ]
            for (ep, arm, st), n in sorted(self.requests.items()):
                out.append(f'hllm_requests_total{{endpoint="{esc(ep)}",arm="{esc(arm)}",status="{st}"}} {n}')
            out += [
                "# HELP hllm_request_latency_seconds Latency of answered /recommend requests by served arm.",
                "# TYPE hllm_request_latency_seconds histogram",
            ]
            for arm, counts in sorted(self._hist.items()):
                cum = 0
                for b, c in zip([*LATENCY_BUCKETS_S, float("inf")], counts, strict=True):
                    cum += c
                    le = "+Inf" if b == float("inf") else repr(b)
                    out.append(f'hllm_request_latency_seconds_bucket{{arm="{esc(arm)}",le="{le}"}} {cum}')
                out.append(f'hllm_request_latency_seconds_sum{{arm="{esc(arm)}"}} {self._sum[arm]:.6f}')
                out.append(f'hllm_request_latency_seconds_count{{arm="{esc(arm)}"}} {cum}')
            out += ["# HELP hllm_errors_total Model errors by arm and kind.", "# TYPE hllm_errors_total counter"]
            for (arm, kind), n in sorted(self.errors.items()):
                out.append(f'hllm_errors_total{{arm="{esc(arm)}",kind="{esc(kind)}"}} {n}')
            out += [
                "# HELP hllm_fallbacks_total Challenger requests served by the champion.",
                "# TYPE hllm_fallbacks_total counter",
            ]
            for reason, n in sorted(self.fallbacks.items()):
                out.append(f'hllm_fallbacks_total{{arm="challenger",reason="{esc(reason)}"}} {n}')
            out += ["# HELP hllm_feedback_total Outcomes received.", "# TYPE hllm_feedback_total counter"]
            for (event, known), n in sorted(self.feedback.items()):
                out.append(f'hllm_feedback_total{{event="{esc(event)}",known_exposure="{known}"}} {n}')
        out.extend(extra)
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- request and response bodies

ItemId = Annotated[str, Field(min_length=1, max_length=256)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: ItemId | None = None
    history: Annotated[list[ItemId], Field(max_length=HISTORY_HARD_MAX)] | None = None
    k: Annotated[int, Field(ge=1, le=K_MAX, strict=True)] = 10

    @model_validator(mode="after")
    def _needs_someone(self) -> RecommendRequest:
        if self.user_id is None and not self.history:
            raise ValueError("give a user_id, a non-empty history of item ids, or both")
        return self


class RecommendResponse(BaseModel):
    items: list[str]
    scores: list[float]
    arm: Literal["champion", "challenger"] | None  # the assigned arm; null = not in the experiment
    served_arm: Literal["champion", "challenger", "interleaved"]
    model_version: str
    teams: list[str] | None = None  # interleave mode: the arm that placed each position
    experiment_id: str | None
    exposure_id: str
    fallback: bool


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exposure_id: Annotated[str, Field(min_length=1, max_length=64)]
    event: Literal["click", "consume"]
    item_id: ItemId
    user_id: ItemId | None = None


class FeedbackResponse(BaseModel):
    exposure_id: str
    known_exposure: bool
    position: int | None


class RequestError(Exception):
    """A request the service refuses (4xx) or cannot answer (503), with the field it is about."""

    def __init__(self, status: int, loc: Sequence[str], msg: str, kind: str) -> None:
        super().__init__(msg)
        self.status, self.loc, self.msg, self.kind = status, list(loc), msg, kind

    def response(self) -> JSONResponse:
        return JSONResponse(
            status_code=self.status, content={"detail": [{"loc": self.loc, "msg": self.msg, "type": self.kind}]}
        )


class ArmFailure(Exception):
    pass


@dataclass(frozen=True)
class _Route:
    """Where a validated request goes: the state that answers it, its kind, assignment and arms."""

    state: PoolState
    kind: str  # user | history
    assignment: Assignment | None
    intended: Arm | None
    served: str  # an Arm, or INTERLEAVED


# --------------------------------------------------------------------------- the service


class Service:
    """Everything behind the endpoints; the FastAPI layer only translates."""

    def __init__(self, cfg: Config, options: ServeOptions | None = None) -> None:
        self.cfg = cfg
        self.opts = options or ServeOptions()
        self.work_dir = Path(tempfile.mkdtemp(prefix="hllm-serve-"))
        self.pool = ModelPool(cfg, self.work_dir, layer=self.opts.layer)
        self.metrics = Metrics()
        self.logs: ablogs.LogWriter | None = None
        self.faults: dict[str, Any] = {}  # test/chaos hook: arm -> "raise" | delay seconds
        # exposure id -> (user, slate, teams of an interleaved slate): what /feedback joins an outcome to
        self._exposures: OrderedDict[str, tuple[str | None, tuple[str, ...], tuple[str, ...]]] = OrderedDict()
        self._exp_lock = threading.Lock()
        self._challenger_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="hllm-challenger")
        self._score_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hllm-score")  # off the event loop
        self._log_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hllm-log-append")
        self._shadow_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hllm-shadow")
        self._rng = random.Random()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.logs = ablogs.LogWriter(
            self.opts.log_dir,
            filesystem=self.opts.log_filesystem,
            flush_every=self.opts.flush_every,
            flush_s=self.opts.flush_s,
        )
        self.pool.start(self.opts.poll_s)
        log.info(
            "serving %s in %s mode; logs under %s", self.cfg.registry.model_name, self.opts.mode, self.opts.log_dir
        )

    def close(self) -> None:
        """Stop polling, let shadow scoring finish, write every buffered record."""
        self.pool.stop()
        self._shadow_pool.shutdown(wait=True)
        self._challenger_pool.shutdown(wait=False, cancel_futures=True)
        self._score_pool.shutdown(wait=False, cancel_futures=True)
        self._log_pool.shutdown(wait=True)  # appends handed off by _append are in the buffers before the close
        if self.logs is not None:
            self.logs.close()
            log.info("logs closed: %d exposures, %d outcomes", self.logs.exposures.written, self.logs.outcomes.written)
        shutil.rmtree(self.work_dir, ignore_errors=True)

    @property
    def ready(self) -> bool:
        return self.pool.state is not None and self.logs is not None

    def status(self) -> dict[str, Any]:
        st = self.pool.state
        return {
            "ready": self.ready,
            "model": self.cfg.registry.model_name,
            "mode": self.opts.mode,
            "champion": st.champion.version if st else None,
            "challenger": st.challenger.version if st and st.challenger else None,
            "experiment": st.experiment.to_dict() if st and st.experiment else None,
            "swaps": self.pool.swaps,
            "last_error": self.pool.last_error,
        }

    # ------------------------------------------------------------------ scoring

    def _score(self, model: LoadedModel, arm: str, kind: str, req: RecommendRequest) -> tuple[list[str], list[float]]:
        fault = self.faults.get(arm)
        if fault == "raise":
            raise ArmFailure(f"injected failure of the {arm}")
        if isinstance(fault, (int, float)) and not isinstance(fault, bool):
            time.sleep(float(fault))
        if kind == "user":
            key = (str(req.user_id), req.k)
            slate = model.slates.get(key)
            if slate is None:
                recs = model.recommender.for_user(key[0], req.k)
                slate = (tuple(r.item_id for r in recs), tuple(float(r.score) for r in recs))
                if len(model.slates) < self.opts.user_cache:
                    model.slates[key] = slate
            return list(slate[0]), list(slate[1])
        recs = model.recommender.for_history(list(req.history or []), req.k)
        return [r.item_id for r in recs], [float(r.score) for r in recs]

    async def _score_async(
        self, model: LoadedModel, arm: str, kind: str, req: RecommendRequest, timeout: float | None
    ) -> tuple[list[str], list[float]]:
        """:meth:`_score` from the event loop: a cached known-user slate (no fault injected) is returned
        inline, an uncached champion one is computed inline (a FAISS search, well under a millisecond);
        everything else (histories through the user model, the challenger under its timeout) runs in a
        thread pool, so the loop keeps serving while the user tower runs."""
        if kind == "user" and not self.faults:
            slate = model.slates.get((str(req.user_id), req.k))
            if slate is not None:
                return list(slate[0]), list(slate[1])
            if timeout is None:
                return self._score(model, arm, kind, req)
        pool = self._challenger_pool if arm == CHALLENGER else self._score_pool
        fut = asyncio.wrap_future(pool.submit(self._score, model, arm, kind, req))
        if timeout is None:
            return await fut
        return await asyncio.wait_for(fut, timeout)  # cancels the pool's future on timeout

    def _validate(self, st: PoolState, req: RecommendRequest) -> str:
        """'user' or 'history', or a RequestError naming the field."""
        champ = st.champion
        if req.user_id is not None and req.user_id in champ.users:
            return "user"
        if req.history:
            if len(req.history) > self.opts.max_history:
                raise RequestError(
                    422,
                    ["body", "history"],
                    f"history has {len(req.history)} items; at most {self.opts.max_history} are accepted",
                    "history_too_long",
                )
            unknown = sorted({x for x in req.history if x not in champ.items})
            if unknown:
                more = f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""
                raise RequestError(
                    422, ["body", "history"], f"unknown item ids in history: {unknown[:10]}{more}", "unknown_item"
                )
            if not champ.scores_histories:
                raise RequestError(
                    422,
                    ["body", "history"],
                    f"model version {champ.version} was registered without a checkpoint and cannot score histories",
                    "history_unsupported",
                )
            return "history"
        raise RequestError(
            404,
            ["body", "user_id"],
            f"unknown user_id {req.user_id!r} and no history: send a history of item ids to get "
            "recommendations for a new user",
            "unknown_user",
        )

    def _route(self, req: RecommendRequest) -> _Route:
        st = self.pool.state  # read once: this request is answered by this state only
        if st is None or self.logs is None:
            raise RequestError(503, ["service"], "not ready: the champion is not loaded yet", "not_ready")
        kind = self._validate(st, req)
        exp = st.experiment
        a: Assignment | None = None
        if exp is not None and req.user_id is not None:
            a = st.assignments.get(req.user_id)
            if a is None:
                a = assign(exp, req.user_id)
                if len(st.assignments) < self.opts.user_cache:
                    st.assignments[req.user_id] = a
        intended = a.arm if a is not None and self.opts.mode == "ab" else None
        served: str = CHALLENGER if intended == CHALLENGER and st.challenger is not None else CHAMPION
        if self.opts.mode == "interleave" and a is not None and a.in_experiment and st.challenger is not None:
            served = INTERLEAVED
        return _Route(st, kind, a, intended, served)

    def _challenger_failed(self, st: PoolState, error: str, reason: str) -> None:
        assert st.challenger is not None
        log.warning("challenger v%s failed (%s); serving the champion", st.challenger.version, error)
        self.metrics.error(CHALLENGER, reason)
        self.metrics.fallback(reason)

    def recommend(self, req: RecommendRequest) -> RecommendResponse:
        """One request, answered in the calling thread (the app uses :meth:`recommend_async`)."""
        if self.opts.mode == "interleave":
            import asyncio

            return asyncio.run(self.recommend_async(req))  # both arms score: the async path runs them
        t0 = time.perf_counter()
        r = self._route(req)
        st = r.state
        error: str | None = None
        items: list[str] = []
        scores: list[float] = []
        served = r.served
        if served == CHALLENGER:
            assert st.challenger is not None
            fut = self._challenger_pool.submit(self._score, st.challenger, CHALLENGER, r.kind, req)
            try:
                items, scores = fut.result(timeout=self.opts.challenger_timeout_s)
            except FutureTimeout:
                fut.cancel()
                error, reason = f"timeout after {self.opts.challenger_timeout_s * 1000:.0f} ms", "timeout"
            except Exception as e:
                error, reason = f"{type(e).__name__}: {e}", "error"
            if error is not None:
                self._challenger_failed(st, error, reason)
                served = CHAMPION
        if served == CHAMPION:
            try:
                items, scores = self._score(st.champion, CHAMPION, r.kind, req)
            except Exception:
                self.metrics.error(CHAMPION, "error")
                raise
        return self._answer(t0, req, r, served, items, scores, error)

    async def _challenger_async(
        self, st: PoolState, kind: str, req: RecommendRequest
    ) -> tuple[list[str], list[float], str | None]:
        """The challenger's slate under its timeout, or an error (recorded as a fallback to the champion)."""
        assert st.challenger is not None
        try:
            items, scores = await self._score_async(
                st.challenger, CHALLENGER, kind, req, self.opts.challenger_timeout_s
            )
            return items, scores, None
        except TimeoutError:
            error, reason = f"timeout after {self.opts.challenger_timeout_s * 1000:.0f} ms", "timeout"
        except Exception as e:
            error, reason = f"{type(e).__name__}: {e}", "error"
        self._challenger_failed(st, error, reason)
        return [], [], error

    async def recommend_async(self, req: RecommendRequest) -> RecommendResponse:
        """:meth:`recommend` on the event loop: the same route, fallback and record."""
        t0 = time.perf_counter()
        r = self._route(req)
        st = r.state
        error: str | None = None
        items: list[str] = []
        scores: list[float] = []
        served = r.served
        teams: list[str] | None = None
        if served == INTERLEAVED:
            assert st.challenger is not None
            champ_items, champ_scores = await self._score_async(st.champion, CHAMPION, r.kind, req, None)
            chall_items, _, error = await self._challenger_async(st, r.kind, req)
            if error is not None:
                served, items, scores = CHAMPION, champ_items, champ_scores
            else:
                exposure_seed = uuid.uuid4().hex
                items, teams = team_draft(champ_items, chall_items, req.k, exposure_seed)
                scores = [0.0] * len(items)  # scores of two models are not comparable: the order is the draft's
            return self._answer(t0, req, r, served, items, scores, error, teams)
        if served == CHALLENGER:
            items, scores, error = await self._challenger_async(st, r.kind, req)
            if error is not None:
                served = CHAMPION
        if served == CHAMPION:
            try:
                items, scores = await self._score_async(st.champion, CHAMPION, r.kind, req, None)
            except Exception:
                self.metrics.error(CHAMPION, "error")
                raise
        return self._answer(t0, req, r, served, items, scores, error)

    def _append(self, writer: ablogs.PartWriter, record: dict[str, Any]) -> None:
        """Append a log record; the append that fills a part (a synchronous Parquet write, a PUT on S3)
        is handed to a log thread, so no request waits for a flush."""
        if writer.buffered + 1 >= writer.flush_every:
            self._log_pool.submit(writer.append, record)
        else:
            writer.append(record)

    def _answer(
        self,
        t0: float,
        req: RecommendRequest,
        r: _Route,
        served: str,
        items: list[str],
        scores: list[float],
        error: str | None,
        teams: list[str] | None = None,
    ) -> RecommendResponse:
        """The exposure record, the metrics and the response of an answered request."""
        st, kind, a, intended = r.state, r.kind, r.assignment, r.intended
        exp = st.experiment
        fallback = error is not None
        model = st.model(CHAMPION if served == INTERLEAVED else served)
        latency = time.perf_counter() - t0
        exposure_id = uuid.uuid4().hex
        record: dict[str, Any] = {
            "exposure_id": exposure_id,
            "ts": ablogs.now(),
            "experiment_id": exp.experiment_id if exp is not None else None,
            "layer": exp.layer if exp is not None else None,
            "unit_id": req.user_id,
            "unit_hash": a.unit_hash if a is not None else None,
            "layer_bucket": a.layer_bucket if a is not None else None,
            "exposure_bucket": a.exposure_bucket if a is not None else None,
            "arm_bucket": a.arm_bucket if a is not None else None,
            "in_experiment": bool(a is not None and a.in_experiment and self.opts.mode in ("ab", "interleave")),
            "intended_arm": intended,
            "served_arm": served,
            "model_name": self.cfg.registry.model_name,
            "model_version": model.version,
            "model_uri": model.uri,
            "data_version": model.data_version,
            "request_kind": kind,
            "k": req.k,
            "items": items,
            "scores": scores,
            "latency_ms": latency * 1000.0,
            "fallback": fallback,
            "error": error,
            "mode": self.opts.mode,
            "teams": teams,
            "interleave_version": st.challenger.version if teams is not None and st.challenger else None,
        }
        assert self.logs is not None
        with self._exp_lock:
            self._exposures[exposure_id] = (req.user_id, tuple(items), tuple(teams or ()))
            while len(self._exposures) > self.opts.exposure_cache:
                self._exposures.popitem(last=False)
        if self.opts.mode == "shadow" and st.challenger is not None and self._rng.random() < self.opts.shadow_sample:
            self._shadow_pool.submit(self._shadow, st.challenger, kind, req, record)
        else:
            self._append(self.logs.exposures, record)
        self.metrics.request("/recommend", served, 200, latency)
        return RecommendResponse(
            items=items,
            scores=scores,
            arm=intended,
            served_arm=cast(ServedArm, served),
            model_version=model.version,
            experiment_id=record["experiment_id"],
            exposure_id=exposure_id,
            fallback=fallback,
            teams=teams,
        )

    def _shadow(self, challenger: LoadedModel, kind: str, req: RecommendRequest, record: dict[str, Any]) -> None:
        """Score the challenger off the request path and log the exposure with its slate."""
        t0 = time.perf_counter()
        try:
            items, _ = self._score(challenger, CHALLENGER, kind, req)
            record["shadow_items"] = items
            served = record["items"]
            record["shadow_overlap"] = len(set(items) & set(served)) / max(1, req.k)
        except Exception as e:
            record["error"] = f"shadow: {type(e).__name__}: {e}"
            self.metrics.error(CHALLENGER, "shadow")
        record["shadow_version"] = challenger.version
        record["shadow_latency_ms"] = (time.perf_counter() - t0) * 1000.0
        assert self.logs is not None
        self.logs.exposures.append(record)

    def feedback(self, req: FeedbackRequest) -> FeedbackResponse:
        if self.logs is None:
            raise RequestError(503, ["service"], "not ready", "not_ready")
        with self._exp_lock:
            known = self._exposures.get(req.exposure_id)
        position = None
        credit = None
        unit_id = req.user_id
        if known is not None:
            unit_id = known[0] if known[0] is not None else unit_id
            if req.item_id in known[1]:
                position = known[1].index(req.item_id)
                credit = known[2][position] if len(known) > 2 and known[2] else None  # interleave: the team
        self._append(
            self.logs.outcomes,
            {
                "exposure_id": req.exposure_id,
                "ts": ablogs.now(),
                "unit_id": unit_id,
                "event": req.event,
                "item_id": req.item_id,
                "position": position,
                "known_exposure": known is not None,
                "credit": credit,
            },
        )
        self.metrics.outcome(req.event, known is not None)
        return FeedbackResponse(exposure_id=req.exposure_id, known_exposure=known is not None, position=position)

    def metrics_text(self) -> str:
        st = self.pool.state
        extra = [
            "# HELP hllm_ready 1 when the champion is loaded.",
            "# TYPE hllm_ready gauge",
            f"hllm_ready {int(self.ready)}",
            "# HELP hllm_model_swaps_total Model state swaps (first load included).",
            "# TYPE hllm_model_swaps_total counter",
            f"hllm_model_swaps_total {self.pool.swaps}",
            "# HELP hllm_registry_poll_errors_total Failed registry polls.",
            "# TYPE hllm_registry_poll_errors_total counter",
            f"hllm_registry_poll_errors_total {self.pool.poll_errors}",
            "# HELP hllm_model_info The versions served (value 1).",
            "# TYPE hllm_model_info gauge",
        ]
        if st is not None:
            extra.append(f'hllm_model_info{{arm="champion",version="{st.champion.version}"}} 1')
            if st.challenger is not None:
                extra.append(f'hllm_model_info{{arm="challenger",version="{st.challenger.version}"}} 1')
        if self.logs is not None:
            extra += [
                "# HELP hllm_log_records_total Log records written to part files.",
                "# TYPE hllm_log_records_total counter",
            ]
            for w in (self.logs.exposures, self.logs.outcomes):
                extra.append(f'hllm_log_records_total{{log="{w.kind}"}} {w.written}')
            extra += ["# HELP hllm_log_buffered Log records not yet flushed.", "# TYPE hllm_log_buffered gauge"]
            for w in (self.logs.exposures, self.logs.outcomes):
                extra.append(f'hllm_log_buffered{{log="{w.kind}"}} {w.buffered}')
        return self.metrics.render(extra)


# --------------------------------------------------------------------------- the app


def create_app(cfg: Config, options: ServeOptions | None = None, service: Service | None = None) -> FastAPI:
    """The FastAPI app; models load and logs open in the lifespan, logs are flushed on shutdown."""
    svc = service or Service(cfg, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.start()
        try:
            yield
        finally:
            svc.close()

    app = FastAPI(title="hllm A/B recommendation service", lifespan=lifespan)
    app.state.service = svc

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        svc.metrics.request(request.url.path, "none", 422)
        return await request_validation_exception_handler(request, exc)

    # The handlers are coroutines and return a ready Response: no worker-thread hop per request and no
    # second validation of the response model (it still documents the body in the OpenAPI schema).
    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(req: RecommendRequest) -> Any:
        try:
            out = await svc.recommend_async(req)
        except RequestError as e:
            svc.metrics.request("/recommend", "none", e.status)
            return e.response()
        except Exception:
            svc.metrics.request("/recommend", "champion", 500)
            log.exception("recommend failed")
            return JSONResponse(status_code=500, content={"detail": "internal error (logged)"})
        return Response(out.model_dump_json(), media_type="application/json")

    @app.post("/feedback", status_code=202, response_model=FeedbackResponse)
    async def feedback(req: FeedbackRequest) -> Any:
        try:
            out = svc.feedback(req)
        except RequestError as e:
            svc.metrics.request("/feedback", "none", e.status)
            return e.response()
        svc.metrics.request("/feedback", "none", 202)
        return Response(out.model_dump_json(), status_code=202, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", **svc.status()}

    @app.get("/readyz")
    async def readyz() -> Response:
        body = svc.status()
        return JSONResponse(status_code=200 if body["ready"] else 503, content=body)

    @app.get("/metrics")
    def metrics() -> Response:
        return PlainTextResponse(svc.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
