"""Replay: the whole A/B loop without real users.

Two simulators share one click model:

- :func:`simulate` drives the **real running service** over HTTP on the loopback interface. Simulated users
  are built from held-out data (:func:`held_out_users`): user i takes the test split of a user of the built
  dataset (their history without the last item, and that last item as the true next item), under a fresh
  id ``sim<seed>-<i>`` the service does not know, so the service scores them from the history (the same
  input the offline Recall@K uses). Each request posts ``/recommend {user_id, history, k}``; if the true
  next item is in the slate at 0-based rank r the user consumes it with the click model's probability and
  the simulator posts ``/feedback {exposure_id, event: "consume", item_id}``. Traffic runs in ``days``
  phases: a user enters on a random day and requests once a day from then on, ``requests_per_user`` times
  at most (until the last day). The loop is bounded by ``max_requests`` and ``time_limit_s`` and stops by
  itself.
- :func:`simulate_arrays` / :func:`simulate_logs` are the **pure, no-HTTP** variant for the many-seed
  studies (:func:`power_study`): the same assignment function (:func:`hllm.abtest.assignment.assign`)
  puts each simulated user in an arm, and a latent-quality model replaces the recommender (below).

Click model (:class:`ClickModel`, position-biased examination): the user examines rank r (0-based) with
probability ``1 / (1 + r) ** decay`` and consumes the examined true next item with probability ``p_top``,
so ``P(consume | true item at rank r) = p_top / (1 + r) ** decay`` and 0 when it is not in the top K.
``planted_lift`` plants a better challenger: when a slate was *served by the challenger* the probability is
multiplied by ``1 + planted_lift`` (capped at 1), i.e. a relative lift of the hit rate by ``planted_lift``
(slightly less where the cap binds).

Pure variant's user model: user u has a latent engagement z_u ~ N(0, 1); their pre-experiment activity
(history length, the CUPED covariate) is ``round(exp(2 + 0.6 z_u + 0.4 e_u))`` with independent noise e_u,
and on each request their true next item is in the top-K slate with probability
``sigmoid(logit(in_slate) + 0.8 z_u)`` at a uniform rank in 0..K-1; both arms share this (an A/A unless a
lift is planted). Every request is a fresh draw (a new slate, a new next item).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from hllm.abtest import stats
from hllm.abtest.analysis import COVARIATES_FILE, primary_looks
from hllm.abtest.assignment import BUCKETS, CHALLENGER, CHAMPION, Experiment, assign, bucket
from hllm.config import Config

log = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class ClickModel:
    """Position-biased consumption: P(consume | true next item at 0-based rank r < K) = p_top / (1 + r)**decay."""

    p_top: float = 0.8
    decay: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 < self.p_top <= 1.0 or self.decay < 0:
            raise ValueError(f"need 0 < p_top <= 1 and decay >= 0 (p_top={self.p_top}, decay={self.decay})")

    def prob(self, rank: Any, lift: Any = 0.0) -> NDArray[np.float64]:
        """Consume probability at ``rank`` (array; -1 or >= K means not shown: 0), times ``1 + lift``, capped."""
        r = np.asarray(rank, dtype=np.float64)
        p = np.where(r >= 0, self.p_top / (1.0 + np.maximum(r, 0.0)) ** self.decay, 0.0)
        return np.minimum(1.0, p * (1.0 + np.asarray(lift, dtype=np.float64)))


# --------------------------------------------------------------------------- held-out users


@dataclass(frozen=True)
class HeldOutUser:
    """One user of the built dataset's test split: the history before the held-out item, and that item."""

    user_id: str
    history: tuple[str, ...]
    next_item: str


def held_out_users(built_dir: str | Path, novel_only: bool = True) -> list[HeldOutUser]:
    """Every user with at least two interactions: (history = all but the last, next item = the last).

    ``novel_only`` skips users whose next item is already in their history: the service never
    recommends an item the history holds, so such a user could never hit (offline Recall@K counts them
    as misses; replaying them only dilutes both arms alike)."""
    from hllm.data.dataset import load_built

    built = load_built(built_dir)
    seqs = built.sequences
    out = []
    for u in range(built.n_users):
        items = seqs.of(u)
        if len(items) < 2:
            continue
        ids = [str(built.item_ids[i]) for i in items]
        if novel_only and ids[-1] in ids[:-1]:
            continue
        out.append(HeldOutUser(str(built.user_ids[u]), tuple(ids[:-1]), ids[-1]))
    if not out:
        raise ValueError(f"{built_dir}: no user with two interactions (and a novel next item) to replay")
    return out


# --------------------------------------------------------------------------- the HTTP replay


@dataclass
class ReplayReport:
    """What :func:`simulate` did."""

    requests: int = 0
    errors: int = 0
    feedback: int = 0
    hits: dict[str, int] = field(default_factory=lambda: {CHAMPION: 0, CHALLENGER: 0})
    served: dict[str, int] = field(default_factory=lambda: {CHAMPION: 0, CHALLENGER: 0})
    users: int = 0
    days: int = 0
    elapsed_s: float = 0.0
    stopped: str = "done"  # done | max_requests | time_limit
    experiment_ids: list[str] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"the replay only drives a service on the loopback interface, not {url!r}")


def _schedule(rng: np.random.Generator, n_users: int, days: int, requests_per_user: int) -> list[list[int]]:
    """Users requesting on each day: user u enters on a uniform day and requests daily from then on."""
    entry = rng.integers(0, days, size=n_users)
    return [
        [u for u in range(n_users) if entry[u] <= d < entry[u] + requests_per_user]
        for d in range(days)
    ]  # fmt: skip


def simulate(
    cfg: Config,
    *,
    url: str,
    users_from: str | Path | None = None,
    n_users: int = 200,
    days: int = 1,
    requests_per_user: int = 1,
    seed: int = 0,
    k: int = 10,
    click_model: ClickModel = ClickModel(),
    planted_lift: float | None = None,
    max_requests: int = 20_000,
    time_limit_s: float = 600.0,
    max_history: int = 50,
    covariates_out: str | Path | None = None,
    request_timeout_s: float = 30.0,
    novel_only: bool = True,
) -> ReplayReport:
    """Replay held-out users against the service at ``url`` (loopback only; see the module docstring).

    ``users_from``: a built dataset (default ``cfg.paths.built_dir``); ``novel_only``: see
    :func:`held_out_users`. ``covariates_out``: a folder (the
    service's log dir) to write ``covariates.parquet`` (unit_id, pre_activity = history length) into, the
    CUPED covariate the analysis reads. Returns counts; the service logs are the real output."""
    import httpx

    _check_loopback(url)
    if n_users < 1 or days < 1 or requests_per_user < 1 or max_requests < 1:
        raise ValueError("n_users, days, requests_per_user and max_requests must be >= 1")
    pool = held_out_users(users_from or cfg.paths.built_dir, novel_only=novel_only)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    sim = [(f"sim{seed}-{i}", pool[order[i % len(pool)]]) for i in range(n_users)]
    if covariates_out is not None:
        out = Path(covariates_out)
        out.mkdir(parents=True, exist_ok=True)
        cov = pd.DataFrame({"unit_id": [s[0] for s in sim], "pre_activity": [float(len(s[1].history)) for s in sim]})
        path = out / COVARIATES_FILE
        if path.exists():  # several replays into one log dir: keep the earlier users
            cov = pd.concat([pd.read_parquet(path), cov]).drop_duplicates("unit_id", keep="last")
        cov.to_parquet(path, index=False)
    lift = float(planted_lift or 0.0)
    report = ReplayReport(users=n_users, days=days)
    t0 = time.monotonic()
    seen_exp: set[str] = set()
    with httpx.Client(base_url=url, timeout=request_timeout_s) as client:
        for todays in _schedule(rng, n_users, days, requests_per_user):
            for u in todays:
                if report.requests >= max_requests:
                    report.stopped = "max_requests"
                    break
                if time.monotonic() - t0 > time_limit_s:
                    report.stopped = "time_limit"
                    break
                uid, user = sim[u]
                body = {"user_id": uid, "history": list(user.history[-max_history:]), "k": k}
                report.requests += 1
                try:
                    r = client.post("/recommend", json=body)
                except httpx.HTTPError as e:
                    report.errors += 1
                    report.error_samples = [*report.error_samples[-4:], f"{type(e).__name__}: {e}"]
                    continue
                if r.status_code != 200:
                    report.errors += 1
                    report.error_samples = [*report.error_samples[-4:], f"{r.status_code}: {r.text[:200]}"]
                    continue
                rec = r.json()
                served = rec["served_arm"]
                report.served[served] = report.served.get(served, 0) + 1
                if rec.get("experiment_id") and rec["experiment_id"] not in seen_exp:
                    seen_exp.add(rec["experiment_id"])
                    report.experiment_ids.append(rec["experiment_id"])
                items = rec["items"][:k]
                rank = items.index(user.next_item) if user.next_item in items else -1
                p = float(click_model.prob(rank, lift if served == CHALLENGER else 0.0))
                if rank >= 0 and rng.random() < p:
                    fb = {"exposure_id": rec["exposure_id"], "event": "consume", "item_id": user.next_item}
                    try:
                        fr = client.post("/feedback", json={**fb, "user_id": uid})
                        ok = fr.status_code == 202
                    except httpx.HTTPError:
                        ok = False
                    report.feedback += int(ok)
                    report.errors += int(not ok)
                    report.hits[served] = report.hits.get(served, 0) + int(ok)
            else:
                continue
            break
    report.elapsed_s = time.monotonic() - t0
    log.info(
        "replay: %d requests (%d errors), %d consumes, served %s, %.1f s, %s",
        report.requests,
        report.errors,
        report.feedback,
        report.served,
        report.elapsed_s,
        report.stopped,
    )
    return report


# --------------------------------------------------------------------------- the pure simulator


@dataclass(frozen=True)
class SimArrays:
    """One simulated test as arrays (what :func:`hllm.abtest.analysis.primary_looks` takes)."""

    experiment: Experiment
    unit_ids: list[str]
    user_arm: NDArray[np.int64]  # 1 = challenger
    covariate: NDArray[np.float64]  # pre-experiment activity
    exposure_user: NDArray[np.int64]
    exposure_day: NDArray[np.int64]
    exposure_rank: NDArray[np.int64]  # rank of the true next item in the slate, -1 = not in it
    exposure_hit: NDArray[np.float64]


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)


def _arms(exp: Experiment, unit_ids: Sequence[str]) -> NDArray[np.int64]:
    """1 = challenger per user, by the assignment spec. With the whole layer and exposure 1.0 every user is
    in the experiment, so only the arm hash is needed: ``arm_bucket < challenger_buckets`` (the rule of
    :func:`~hllm.abtest.assignment.arm_for_buckets`) gives what :func:`~hllm.abtest.assignment.assign`
    gives (checked in the tests), at a third of the hashing."""
    if exp.layer_range is not None or exp.exposure_buckets != BUCKETS:
        return np.fromiter((assign(exp, u).arm == CHALLENGER for u in unit_ids), dtype=np.int64, count=len(unit_ids))
    salt = exp.arm_salt
    arm_buckets = np.fromiter((bucket(salt, u) for u in unit_ids), dtype=np.int64, count=len(unit_ids))
    return (arm_buckets < exp.challenger_buckets).astype(np.int64)  # arm_for_buckets' rule, vectorised


def simulate_arrays(
    *,
    n_users: int = 10_000,
    days: int = 7,
    requests_per_user: int = 7,
    seed: int = 0,
    k: int = 10,
    click_model: ClickModel = ClickModel(),
    planted_lift: float | None = None,
    in_slate: float = 0.5,
    split: float = 0.5,
    experiment_id: str | None = None,
) -> SimArrays:
    """One simulated test (pure, vectorised; see the module docstring for the user model)."""
    rng = np.random.default_rng(seed)
    exp = Experiment(experiment_id or f"sim-{seed}", "sim-layer", "1", "2", exposure=1.0, split=split, created_at=None)
    unit_ids = [f"u{seed}-{i}" for i in range(n_users)]
    user_arm = _arms(exp, unit_ids)
    z = rng.standard_normal(n_users)
    covariate = np.round(np.exp(2.0 + 0.6 * z + 0.4 * rng.standard_normal(n_users))).astype(np.float64)
    q = _sigmoid(math.log(in_slate / (1.0 - in_slate)) + 0.8 * z)
    entry = rng.integers(0, days, size=n_users)
    eu = np.repeat(np.arange(n_users), requests_per_user)
    day = entry[eu] + np.tile(np.arange(requests_per_user), n_users)
    keep = day < days
    eu, day = eu[keep], day[keep]
    shown = rng.random(eu.size) < q[eu]
    rank = np.where(shown, rng.integers(0, k, size=eu.size), -1)
    lift = np.where(user_arm[eu] == 1, float(planted_lift or 0.0), 0.0)
    hit = (rng.random(eu.size) < click_model.prob(rank, lift)).astype(np.float64)
    return SimArrays(exp, unit_ids, user_arm, covariate, eu, day.astype(np.int64), rank.astype(np.int64), hit)


def simulate_logs(
    *,
    start: datetime | None = None,
    n_items: int = 500,
    k: int = 10,
    **kwargs: Any,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float], Experiment]:
    """:func:`simulate_arrays` materialised as exposure and outcome logs (the service's schemas) plus the
    covariates: each exposure a top-K slate of catalogue items ``i0..i<n_items-1`` with the user's true
    next item at its rank, each hit a ``consume`` outcome of it."""
    sim = simulate_arrays(k=k, **kwargs)
    rng = np.random.default_rng(int(kwargs.get("seed", 0)) + 1_000_003)
    start = start or datetime(2026, 1, 1, tzinfo=UTC)
    n = sim.exposure_user.size
    target = rng.integers(0, n_items, size=n)
    slates = rng.integers(0, n_items - 1, size=(n, k))
    slates = np.where(slates >= target[:, None], slates + 1, slates)  # fillers differ from the target
    rows = np.nonzero(sim.exposure_rank >= 0)[0]
    slates[rows, sim.exposure_rank[rows]] = target[rows]
    seconds = rng.uniform(0, 86_400 - 1, size=n)
    seconds[np.argmin(sim.exposure_day * 86_400 + seconds)] = 0.0  # t0 = start: look d == day d
    ts = [start + timedelta(days=int(d), seconds=float(s)) for d, s in zip(sim.exposure_day, seconds, strict=True)]
    arm = np.where(sim.user_arm[sim.exposure_user] == 1, CHALLENGER, CHAMPION)
    version = np.where(arm == CHALLENGER, sim.experiment.challenger_version, sim.experiment.champion_version)
    exposure_ids = [f"x{i}" for i in range(n)]
    units = np.asarray(sim.unit_ids, dtype=object)[sim.exposure_user]
    a_cache = {u: assign(sim.experiment, u) for u in sim.unit_ids}
    exposures = pd.DataFrame(
        {
            "exposure_id": exposure_ids,
            "ts": pd.to_datetime(ts, utc=True),
            "experiment_id": sim.experiment.experiment_id,
            "layer": sim.experiment.layer,
            "unit_id": units,
            "unit_hash": [a_cache[u].unit_hash for u in units],
            "arm_bucket": [a_cache[u].arm_bucket for u in units],
            "exposure_bucket": [a_cache[u].exposure_bucket for u in units],
            "in_experiment": True,
            "intended_arm": arm,
            "served_arm": arm,
            "model_version": version,
            "items": [[f"i{j}" for j in s] for s in slates],
            "latency_ms": rng.gamma(4.0, 1.0, size=n),
            "fallback": False,
            "error": None,
            "mode": "ab",
            "k": k,
        }
    )
    hits = np.nonzero(sim.exposure_hit > 0)[0]
    outcomes = pd.DataFrame(
        {
            "exposure_id": [exposure_ids[i] for i in hits],
            "ts": pd.to_datetime([ts[i] + timedelta(seconds=30) for i in hits], utc=True),
            "unit_id": units[hits],
            "event": "consume",
            "item_id": [f"i{target[i]}" for i in hits],
            "position": sim.exposure_rank[hits],
            "known_exposure": True,
        }
    )
    covariates = {u: float(x) for u, x in zip(sim.unit_ids, sim.covariate, strict=True)}
    return exposures, outcomes, covariates, sim.experiment


@dataclass(frozen=True)
class StudyResult:
    """Many simulated tests: how often the primary was significant, SRM fired, and what was decided."""

    seeds: list[int]
    planted_lift: float
    alpha: float
    p_values: NDArray[np.float64]  # final always-valid p per seed (running minimum over the daily looks)
    significant_better: NDArray[np.bool_]
    srm: NDArray[np.bool_]
    decisions: list[str]
    relative_lifts: NDArray[np.float64]
    elapsed_s: float

    @property
    def rejection_rate(self) -> float:
        """Share of seeds where the always-valid test rejected H0 at alpha (either direction)."""
        return float(np.mean(self.p_values < self.alpha))

    @property
    def detection_rate(self) -> float:
        """Share of seeds where the challenger was significantly better."""
        return float(np.mean(self.significant_better))

    def standard_error(self, rate: float) -> float:
        return math.sqrt(max(rate * (1 - rate), 1e-12) / len(self.seeds))

    def summary(self) -> dict[str, Any]:
        return {
            "seeds": f"{self.seeds[0]}..{self.seeds[-1]} ({len(self.seeds)})",
            "planted_lift": self.planted_lift,
            "alpha": self.alpha,
            "rejection_rate": self.rejection_rate,
            "rejection_rate_se": self.standard_error(self.rejection_rate),
            "detection_rate": self.detection_rate,
            "detection_rate_se": self.standard_error(self.detection_rate),
            "srm_rate": float(np.mean(self.srm)),
            "decisions": {d: self.decisions.count(d) for d in sorted(set(self.decisions))},
            "relative_lift_mean": float(np.nanmean(self.relative_lifts)),
            "relative_lift_sd": float(np.nanstd(self.relative_lifts)),
            "elapsed_s": self.elapsed_s,
        }


def power_study(
    seeds: Sequence[int],
    *,
    planted_lift: float | None = None,
    alpha: float = 0.05,
    mde: float = 0.1,
    min_units: int = 200,
    cuped: bool = True,
    **sim_kwargs: Any,
) -> StudyResult:
    """Run :func:`simulate_arrays` for each seed and analyse it as the analysis does (daily cumulative
    looks, CUPED, always-valid mSPRT, SRM on assignment, :func:`hllm.abtest.stats.decide` without guardrails)."""
    t0 = time.perf_counter()
    ps, better, srm, decisions, lifts = [], [], [], [], []
    for s in seeds:
        sim = simulate_arrays(seed=int(s), planted_lift=planted_lift, **sim_kwargs)
        prim = primary_looks(
            sim.user_arm,
            sim.exposure_user,
            sim.exposure_day,
            sim.exposure_hit,
            sim.covariate if cuped else None,
            alpha=alpha,
            mde=mde,
        )
        split = sim.experiment.split
        test = stats.srm_test([int((sim.user_arm == 0).sum()), int((sim.user_arm == 1).sum())], [1 - split, split])
        srm.append(test.mismatch)
        r = prim.result
        if r is None:
            ps.append(1.0)
            better.append(False)
            decisions.append("keep_running")
            lifts.append(math.nan)
            continue
        ps.append(r.p_value)
        better.append(bool(r.p_value < alpha and r.ci_low > 0))
        decisions.append(stats.decide(test, r, [], min_units=min_units).decision)
        lifts.append(r.relative)
    return StudyResult(
        [int(s) for s in seeds],
        float(planted_lift or 0.0),
        alpha,
        np.asarray(ps),
        np.asarray(better),
        np.asarray(srm),
        decisions,
        np.asarray(lifts),
        time.perf_counter() - t0,
    )
