"""Decide an A/B test from its exposure and outcome logs, and write the decision back to the registry.

``analyze(cfg, log_dir)`` reads the Parquet logs of ``hllm serve`` (:mod:`hllm.abtest.logs`), analyses one
experiment and logs the analysis as an MLflow run attached to the challenger version; with
``decide_and_apply=True`` the decision goes through :mod:`hllm.ops.registry`. The statistics live in
:func:`analyze_frames` (pure: DataFrames in, :class:`AnalysisResult` out, no MLflow), and the sequential
test of the primary metric in :func:`primary_looks` (plain arrays), which the simulator's many-seed
studies call directly (:mod:`hllm.abtest.simulate`).

Definitions (the unit of analysis is the user, ``unit_id``, the unit of assignment; intention to treat):

- **Users in the test**: exposures of the experiment with ``mode == "ab"``, ``in_experiment``, a
  ``unit_id`` and an ``intended_arm``. A user's arm is their *intended* arm (ITT: a challenger user
  served by the champion after a fallback stays in the challenger arm). A user logged with two intended
  arms breaks stickiness: the test is invalid.
- **Primary metric, hit@K of the next interaction** (the online analogue of offline Recall@K on the test
  split, where the held-out next item is a hit when it is in the top K): for one exposure e,
  ``hit(e) = 1`` when an outcome with ``event == "consume"`` joined to e by ``exposure_id`` has an
  ``item_id`` among the first K items of e's slate (``items[:K]``), else 0 (no consume, or a consume of
  an item outside the top K). A user's value is the mean of hit(e) over their exposures in the window
  (one exposure per user: exactly the online Recall@K). Users who never consume count as 0 (ITT).
- **Covariate for CUPED**: the user's pre-experiment activity, the number of interactions in their
  history before the test. Taken from ``covariates`` when given, else ``<log_dir>/covariates.parquet``
  (columns ``unit_id``, ``pre_activity``; the replay simulator writes it), else the built dataset
  (``cfg.paths.built_dir``: the length of the user's sequence, keyed by the original user id); users
  without pre-period data get 0 (a new user has no activity). Theta is fitted on both arms pooled at each
  look (:func:`hllm.abtest.stats.cuped_arms`); any function of pre-period data keeps the estimate unbiased.
- **Looks**: look d (d = 0, 1, ...) holds every exposure with ``ts < t0 + (d + 1) * look_every``, t0 the
  experiment's first exposure (daily by default). At each look the per-user values are recomputed from the
  exposures up to it, CUPED-adjusted, and tested with the always-valid mSPRT; the p-value is the running
  minimum and the interval the running intersection over the looks (:func:`hllm.abtest.stats.sequential_looks`),
  so looking every day keeps the false-positive rate at alpha. The mixture scale tau = ``mde`` times the
  pooled (both arms) primary mean at the last look: the relative effect the test is tuned to detect.
- **SRM** (chi-square against the designed split, threshold 0.001): on assignment, the users per intended
  arm; on exposure, the users per *served* arm (the arm that served most of a user's exposures; ties: the
  intended arm). Either mismatch makes the test invalid: users are lost or moved between arms.
- **Guardrails** (one-sided non-inferiority, challenger vs champion, by intended arm): p99 latency of the
  exposures (relative margin, bootstrap over users), the error/fallback rate (exposures with
  ``fallback`` or an ``error``, a per-user ratio with the delta method, absolute margin), and catalogue
  coverage (distinct items in the top-K slates of ``n = min(n_control, n_treatment)`` users drawn with
  replacement from each arm, so that unequal arms compare at the same size; relative margin, bootstrap).
- **Decision**: :func:`hllm.abtest.stats.decide` (ship / stop / keep_running / invalid); invalid also when
  a user has two intended arms or an arm has fewer than two users.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from hllm.abtest import logs as ablogs
from hllm.abtest import stats
from hllm.abtest.assignment import BUCKETS, CHALLENGER, CHAMPION
from hllm.config import Config

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "hllm-ab-analysis"
TAG_ANALYSIS_RUN = "ab.analysis_run_id"
TAG_ANALYSIS_DECISION = "ab.analysis_decision"
ACTOR = "ab-analysis"
COVARIATES_FILE = "covariates.parquet"


@dataclass(frozen=True)
class Guardrails:
    """Non-inferiority margins (the worst acceptable challenger-minus-champion degradation)."""

    p99_latency_rel: float = 0.25  # challenger p99 latency at most 25 % above the champion's
    latency_q: float = 0.99  # the latency quantile (a p99 needs a few thousand requests per arm to be stable)
    fallback_rate_abs: float = 0.01  # at most +1 point of exposures with a fallback or an error
    coverage_rel: float = 0.10  # catalogue coverage at most 10 % below the champion's
    n_boot: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class ArmSummary:
    """Per-arm numbers of the report (by intended arm)."""

    users: int
    exposures: int
    consumes: int
    hit_rate: float  # mean over users of their hit@K
    fallback_rate: float  # share of exposures with a fallback or an error
    p99_latency_ms: float
    coverage: float  # distinct top-K items / catalogue size, all of the arm's users
    model_versions: tuple[str, ...]  # versions that served this arm's exposures


@dataclass(frozen=True)
class Look:
    """The cumulative always-valid result at the end of one look."""

    look: int
    end: str  # ISO timestamp of the look's end
    n_control: int
    n_treatment: int
    control_mean: float
    treatment_mean: float
    diff: float  # CUPED-adjusted treatment - control
    ci_low: float
    ci_high: float
    p_value: float


@dataclass(frozen=True)
class PrimaryLooks:
    """:func:`primary_looks`: the looks, the last sequential result and the CUPED numbers at the last look."""

    looks: list[Look]
    result: stats.SequentialResult | None
    theta: float
    variance_reduction: float
    tau: float


@dataclass
class AnalysisResult:
    """Everything the analysis found; ``decision`` is what to do. ``run_id`` / ``applied`` are set by
    :func:`analyze` (the MLflow run and what the registry did)."""

    experiment_id: str
    champion_version: str | None
    challenger_version: str | None
    k: int
    alpha: float
    split: float
    split_source: str  # registry | buckets | given
    srm_assignment: stats.SRMResult | None
    srm_exposure: stats.SRMResult | None
    arms: dict[str, ArmSummary]
    primary: PrimaryLooks
    guardrails: list[stats.GuardrailResult]
    decision: stats.Decision
    sticky_violations: int = 0
    days: float = 0.0
    window: tuple[str, str] | None = None
    run_id: str | None = None
    applied: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return self.decision.decision

    def metrics(self) -> dict[str, float]:
        """Flat numeric summary (MLflow metric names: no ``@``)."""
        out: dict[str, float] = {"days": self.days, "sticky_violations": float(self.sticky_violations)}
        for name, srm in (("srm_assignment", self.srm_assignment), ("srm_exposure", self.srm_exposure)):
            if srm is not None:
                out[f"{name}/chi2"], out[f"{name}/p"] = srm.statistic, srm.p_value
        for arm, s in self.arms.items():
            for key in ("users", "exposures", "consumes", "hit_rate", "fallback_rate", "p99_latency_ms", "coverage"):
                out[f"{arm}/{key}"] = float(getattr(s, key))
        r = self.primary.result
        if r is not None:
            out.update(
                {
                    "primary/diff": r.diff,
                    "primary/relative": r.relative,
                    "primary/ci_low": r.ci_low,
                    "primary/ci_high": r.ci_high,
                    "primary/rel_ci_low": r.rel_ci_low,
                    "primary/rel_ci_high": r.rel_ci_high,
                    "primary/p_value": r.p_value,
                    "primary/tau": r.tau,
                    "primary/cuped_theta": self.primary.theta,
                    "primary/cuped_variance_reduction": self.primary.variance_reduction,
                    "primary/looks": float(len(self.primary.looks)),
                }
            )
        for g in self.guardrails:
            out[f"guardrail/{g.name}/estimate"] = g.estimate
            out[f"guardrail/{g.name}/bound"] = g.bound
            out[f"guardrail/{g.name}/pass"] = float(g.status == "pass")
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}

    def to_dict(self) -> dict[str, Any]:
        d = {
            "experiment_id": self.experiment_id,
            "champion_version": self.champion_version,
            "challenger_version": self.challenger_version,
            "k": self.k,
            "alpha": self.alpha,
            "split": self.split,
            "split_source": self.split_source,
            "decision": self.decision.decision,
            "reasons": list(self.decision.reasons),
            "srm_assignment": asdict(self.srm_assignment) if self.srm_assignment else None,
            "srm_exposure": asdict(self.srm_exposure) if self.srm_exposure else None,
            "arms": {a: asdict(s) for a, s in self.arms.items()},
            "looks": [asdict(x) for x in self.primary.looks],
            "guardrails": [asdict(g) for g in self.guardrails],
            "sticky_violations": self.sticky_violations,
            "days": self.days,
            "window": list(self.window) if self.window else None,
            "run_id": self.run_id,
            "applied": self.applied,
            "notes": self.notes,
        }
        return json.loads(json.dumps(d, default=_json_default))

    def report_markdown(self) -> str:
        return _report(self)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# --------------------------------------------------------------------------- the primary metric


def primary_looks(
    user_arm: ArrayLike,
    exposure_user: ArrayLike,
    exposure_look: ArrayLike,
    exposure_hit: ArrayLike,
    covariate: ArrayLike | None = None,
    *,
    alpha: float = 0.05,
    mde: float = 0.1,
    tau: float | None = None,
    look_ends: Sequence[str] | None = None,
) -> PrimaryLooks:
    """The always-valid sequential test of per-user hit@K over cumulative looks, from plain arrays.

    ``user_arm``: per user, 1 = challenger (treatment), 0 = champion; ``exposure_user`` (index into the
    users), ``exposure_look`` (look index, >= 0) and ``exposure_hit`` (0/1) per exposure; ``covariate``:
    per user pre-period value for CUPED (None: no adjustment). At look d a user is in the test once they
    have an exposure at a look <= d, and their value is the mean hit over those exposures."""
    arm = np.asarray(user_arm, dtype=np.int64)
    eu = np.asarray(exposure_user, dtype=np.int64)
    el = np.asarray(exposure_look, dtype=np.int64)
    eh = np.asarray(exposure_hit, dtype=np.float64)
    x = None if covariate is None else np.asarray(covariate, dtype=np.float64)
    n_users = arm.size
    n_looks = int(el.max()) + 1 if el.size else 0
    per_look: list[tuple[NDArray[np.float64], NDArray[np.float64]]] = []
    kept: list[int] = []
    theta = reduction = 0.0
    for d in range(n_looks):
        m = el <= d
        cnt = np.bincount(eu[m], minlength=n_users)
        hits = np.bincount(eu[m], weights=eh[m], minlength=n_users)
        seen = cnt > 0
        y = np.divide(hits, cnt, out=np.zeros(n_users), where=seen)
        c, t = seen & (arm == 0), seen & (arm == 1)
        if c.sum() < 2 or t.sum() < 2:
            continue
        yc, yt = y[c], y[t]
        if x is not None and np.var(np.concatenate([x[c], x[t]])) > 0:
            yc, yt, theta = stats.cuped_arms(yc, x[c], yt, x[t])
            raw = np.concatenate([y[c], y[t]])
            adj = np.concatenate([yc, yt])
            reduction = 1.0 - float(np.var(adj, ddof=1)) / float(np.var(raw, ddof=1)) if np.var(raw) > 0 else 0.0
        else:
            theta = reduction = 0.0
        per_look.append((yc, yt))
        kept.append(d)
    if not per_look:
        return PrimaryLooks([], None, 0.0, 0.0, math.nan)
    if tau is None:
        last_c, last_t = per_look[-1]
        pooled = float(np.concatenate([last_c, last_t]).mean())
        tau = mde * max(pooled, 1e-4)
    results = stats.sequential_looks(per_look, tau, alpha)
    looks = [
        Look(
            d,
            look_ends[d] if look_ends is not None else str(d),
            r.n_control,
            r.n_treatment,
            r.estimate.control_mean,
            r.estimate.treatment_mean,
            r.diff,
            r.ci_low,
            r.ci_high,
            r.p_value,
        )
        for d, r in zip(kept, results, strict=True)
    ]
    return PrimaryLooks(looks, results[-1], theta, reduction, tau)


# --------------------------------------------------------------------------- the analysis on frames


def _empty_decision(reason: str, verdict: stats.Verdict = "keep_running") -> stats.Decision:
    return stats.Decision(verdict, (reason,))


def infer_split(exposures: pd.DataFrame) -> float | None:
    """The designed challenger share from the logged arm buckets (arm = challenger iff arm_bucket <
    split * 10000): the midpoint between the largest challenger bucket + 1 and the smallest champion
    bucket, in 1/10000. None when the buckets are missing."""
    b = exposures.dropna(subset=["arm_bucket"])
    ch = b.loc[b["intended_arm"] == CHALLENGER, "arm_bucket"]
    cm = b.loc[b["intended_arm"] == CHAMPION, "arm_bucket"]
    if ch.empty or cm.empty:
        return None
    low, high = int(ch.max()) + 1, int(cm.min())
    return round((low + high) / 2) / BUCKETS


def _majority_served(ex: pd.DataFrame) -> pd.Series:
    """Per user: the arm that served most of their exposures (ties: the intended arm)."""
    served_ch = (ex["served_arm"] == CHALLENGER).groupby(ex["unit_id"]).mean()
    intended = ex.groupby("unit_id")["intended_arm"].first()
    out = pd.Series(np.where(served_ch > 0.5, CHALLENGER, CHAMPION), index=served_ch.index)
    tie = served_ch == 0.5
    out[tie] = intended[tie]
    return out


def _coverage_guardrail(
    slates_c: list[NDArray[np.int64]],
    slates_t: list[NDArray[np.int64]],
    n_items: int,
    margin: float,
    alpha: float,
    n_boot: int,
    seed: int,
) -> stats.GuardrailResult:
    """Relative catalogue coverage at equal size n = min(n_c, n_t): bootstrap draws of n users per arm,
    coverage = distinct items of their slates / n_items; non-inferiority on the bootstrap mean and spread."""
    from scipy import sparse

    rng = np.random.default_rng(seed)
    n = min(len(slates_c), len(slates_t))

    def incidence(slates: list[NDArray[np.int64]]) -> Any:
        rows = np.repeat(np.arange(len(slates)), [len(s) for s in slates])
        cols = np.concatenate(slates) if slates else np.zeros(0, np.int64)
        return sparse.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(len(slates), n_items))

    def draws(slates: list[NDArray[np.int64]]) -> NDArray[np.float64]:
        m = incidence(slates)
        out = np.empty(n_boot)
        batch = max(1, min(n_boot, 2_000_000 // max(1, n_items)))
        for s in range(0, n_boot, batch):
            size = min(batch, n_boot - s)
            w = rng.multinomial(n, np.full(m.shape[0], 1.0 / m.shape[0]), size=size)
            covered = sparse.csr_matrix(w) @ m
            out[s : s + size] = np.asarray((covered > 0).sum(axis=1)).ravel() / n_items
        return out

    dc, dt = draws(slates_c), draws(slates_t)
    mc, mt = float(dc.mean()), float(dt.mean())
    rel = dt / np.where(dc > 0, dc, np.nan) - 1.0
    rel_se = float(np.nanstd(rel, ddof=1)) if np.isfinite(rel).sum() > 1 else math.inf
    diff = stats.MeanDiff(
        mc,
        mt,
        mt - mc,
        float(np.std(dt - dc, ddof=1)),
        mt / mc - 1.0 if mc > 0 else math.nan,
        rel_se,
        len(slates_c),
        len(slates_t),
        math.inf,
    )
    return stats.non_inferiority_from_diff(
        diff, margin, relative=True, lower_is_better=False, alpha=alpha, name="coverage"
    )


def analyze_frames(
    exposures: pd.DataFrame,
    outcomes: pd.DataFrame,
    experiment_id: str,
    *,
    split: float | None = None,
    k: int = 10,
    alpha: float = 0.05,
    mde: float = 0.1,
    tau: float | None = None,
    min_units: int = 200,
    max_units: int | None = None,
    max_days: float | None = 28.0,
    look_every: timedelta = timedelta(days=1),
    now: datetime | None = None,
    covariates: Mapping[str, float] | None = None,
    guardrails: Guardrails | None = Guardrails(),
    n_items: int | None = None,
    champion_version: str | None = None,
    challenger_version: str | None = None,
) -> AnalysisResult:
    """The analysis of one experiment on the exposure and outcome logs as DataFrames (the schemas of
    :mod:`hllm.abtest.logs`); pure, no MLflow. ``guardrails=None`` skips the guardrails (the many-seed
    power studies); ``split`` defaults to the one inferred from the arm buckets (:func:`infer_split`);
    ``n_items`` (catalogue size, for the coverage level only) defaults to the distinct items served."""
    notes: list[str] = []
    ex = exposures[
        (exposures["experiment_id"] == experiment_id)
        & exposures["in_experiment"].astype(bool)
        & (exposures["mode"] == "ab")
        & exposures["intended_arm"].notna()
        & exposures["unit_id"].notna()
    ].copy()
    if now is not None:
        ex = ex[ex["ts"] <= pd.Timestamp(now)]
    split_source = "given"
    if split is None:
        split = infer_split(ex)
        split_source = "buckets"
    if split is None:
        split, split_source = 0.5, "default"
        notes.append("no arm buckets in the logs: SRM tested against a 50/50 split")
    empty_primary = PrimaryLooks([], None, 0.0, 0.0, math.nan)
    if ex.empty:
        return AnalysisResult(
            experiment_id, champion_version, challenger_version, k, alpha, split, split_source,
            None, None, {}, empty_primary, [], _empty_decision(f"no exposures of experiment {experiment_id!r} yet"),
            notes=notes,
        )  # fmt: skip
    ex = ex.sort_values("ts", kind="stable").reset_index(drop=True)
    t0 = ex["ts"].iloc[0]
    t_last = ex["ts"].iloc[-1]
    days = float((t_last - t0) / pd.Timedelta(days=1))
    ex["look"] = ((ex["ts"] - t0) // pd.Timedelta(look_every)).astype(np.int64)

    # stickiness: one intended arm per user
    arms_per_user = ex.groupby("unit_id")["intended_arm"].nunique()
    sticky = int((arms_per_user > 1).sum())

    # hits: a consume joined by exposure_id whose item is in the exposure's top K
    out = outcomes[outcomes["event"] == "consume"]
    if now is not None:
        out = out[out["ts"] <= pd.Timestamp(now)]
    topk = dict(zip(ex["exposure_id"], (set(list(s)[:k]) for s in ex["items"]), strict=True))
    hit_ids = {e for e, item in zip(out["exposure_id"], out["item_id"], strict=True) if item in topk.get(e, ())}
    ex["hit"] = ex["exposure_id"].isin(hit_ids).astype(np.float64)
    consumes = out[out["exposure_id"].isin(topk.keys())].groupby("exposure_id").size()
    ex["consumes"] = ex["exposure_id"].map(consumes).fillna(0).astype(np.int64)

    users = ex.groupby("unit_id", sort=True)["intended_arm"].first()
    user_index = pd.Index(users.index)
    user_arm = (users.to_numpy() == CHALLENGER).astype(np.int64)
    eu = user_index.get_indexer(ex["unit_id"])
    x = None
    if covariates is not None:
        x = np.array([float(covariates.get(str(u), 0.0)) for u in user_index])

    # SRM on assignment (intended) and exposure (served, by majority)
    shares = [1.0 - split, split]
    n_c, n_t = int((user_arm == 0).sum()), int((user_arm == 1).sum())
    srm_a = stats.srm_test([n_c, n_t], shares)
    served = _majority_served(ex).reindex(user_index)
    srm_e = stats.srm_test([int((served == CHAMPION).sum()), int((served == CHALLENGER).sum())], shares)

    look_ends = [(t0 + (d + 1) * pd.Timedelta(look_every)).isoformat() for d in range(int(ex["look"].max()) + 1)]
    primary = primary_looks(
        user_arm, eu, ex["look"].to_numpy(), ex["hit"].to_numpy(), x, alpha=alpha, mde=mde, tau=tau,
        look_ends=look_ends,
    )  # fmt: skip

    # per-arm summaries
    bad = ex["fallback"].astype(bool) | ex["error"].notna()
    item_codes, item_uniques = pd.factorize(pd.Series([i for s in ex["items"] for i in list(s)[:k]], dtype=object))
    n_cat = max(n_items or 0, len(item_uniques))  # the catalogue holds at least what was served
    lens = np.array([min(len(s), k) for s in ex["items"]])
    offsets = np.concatenate([[0], np.cumsum(lens)])
    ex_arm = user_arm[eu]
    y_user = np.bincount(eu, weights=ex["hit"].to_numpy(), minlength=user_arm.size) / np.bincount(
        eu, minlength=user_arm.size
    )

    def user_slates(mask: NDArray[np.bool_]) -> list[NDArray[np.int64]]:
        per_user: dict[int, list[NDArray[np.int64]]] = {}
        for i in np.nonzero(mask)[0]:
            per_user.setdefault(int(eu[i]), []).append(item_codes[offsets[i] : offsets[i + 1]])
        return [np.unique(np.concatenate(v)) for v in per_user.values()]

    arms: dict[str, ArmSummary] = {}
    slates: dict[str, list[NDArray[np.int64]]] = {}
    for name, code in ((CHAMPION, 0), (CHALLENGER, 1)):
        m = ex_arm == code
        slates[name] = user_slates(m)
        covered = len(np.unique(np.concatenate(slates[name]))) if slates[name] else 0
        arms[name] = ArmSummary(
            users=int((user_arm == code).sum()),
            exposures=int(m.sum()),
            consumes=int(ex.loc[m, "consumes"].sum()),
            hit_rate=float(y_user[user_arm == code].mean()) if (user_arm == code).any() else math.nan,
            fallback_rate=float(bad[m].mean()) if m.any() else math.nan,
            p99_latency_ms=float(np.quantile(ex.loc[m, "latency_ms"], 0.99, method="inverted_cdf"))
            if m.any()
            else math.nan,
            coverage=covered / n_cat if n_cat else math.nan,
            model_versions=tuple(sorted(str(v) for v in ex.loc[m, "model_version"].unique())),
        )

    # guardrails
    results: list[stats.GuardrailResult] = []
    if guardrails is not None and n_c >= 2 and n_t >= 2:
        mc, mt = ex_arm == 0, ex_arm == 1
        lat = ex["latency_ms"].to_numpy(dtype=np.float64)
        if np.quantile(lat[mc], guardrails.latency_q) > 0:
            results.append(
                stats.quantile_non_inferiority(
                    lat[mc], lat[mt], guardrails.p99_latency_rel, q=guardrails.latency_q, relative=True,
                    alpha=alpha, n_boot=guardrails.n_boot, seed=guardrails.seed, control_units=eu[mc],
                    treatment_units=eu[mt], name=f"p{100 * guardrails.latency_q:g}_latency",
                )
            )  # fmt: skip
        bad_user = np.bincount(eu, weights=bad.to_numpy(dtype=np.float64), minlength=user_arm.size)
        cnt_user = np.bincount(eu, minlength=user_arm.size).astype(np.float64)
        c_users, t_users = user_arm == 0, user_arm == 1
        fb = stats.ratio_diff(bad_user[c_users], cnt_user[c_users], bad_user[t_users], cnt_user[t_users])
        results.append(
            stats.non_inferiority_from_diff(
                fb, guardrails.fallback_rate_abs, relative=False, lower_is_better=True, alpha=alpha,
                name="fallback_rate",
            )
        )  # fmt: skip
        results.append(
            _coverage_guardrail(
                slates[CHAMPION], slates[CHALLENGER], max(n_cat, 1), guardrails.coverage_rel, alpha,
                max(100, guardrails.n_boot // 4), guardrails.seed,
            )
        )  # fmt: skip

    # the decision
    if sticky:
        decision = stats.Decision(
            "invalid", (f"{sticky} users were logged in both arms: assignment is not sticky, nothing can be trusted",)
        )
    elif srm_e.mismatch and not srm_a.mismatch:
        decision = stats.Decision(
            "invalid",
            (
                f"sample ratio mismatch on exposure (served arm): p {srm_e.p_value:.3g} < {srm_e.threshold} "
                f"(chi2 {srm_e.statistic:.3g}, observed {[int((served == a).sum()) for a in (CHAMPION, CHALLENGER)]}, "
                f"expected {[round(e) for e in srm_e.expected]})",
            ),
        )
    elif primary.result is None:
        if srm_a.mismatch:
            decision = stats.Decision("invalid", (f"sample ratio mismatch on assignment: p {srm_a.p_value:.3g}",))
        else:
            decision = _empty_decision(f"fewer than 2 users in an arm ({n_c} champion, {n_t} challenger)")
    else:
        decision = stats.decide(
            srm_a, primary.result, results, min_units=min_units, max_units=max_units, days=days, max_days=max_days
        )
        if srm_a.mismatch:
            decision = stats.Decision("invalid", tuple(f"on assignment: {r}" for r in decision.reasons))
    return AnalysisResult(
        experiment_id=experiment_id,
        champion_version=champion_version,
        challenger_version=challenger_version,
        k=k,
        alpha=alpha,
        split=split,
        split_source=split_source,
        srm_assignment=srm_a,
        srm_exposure=srm_e,
        arms=arms,
        primary=primary,
        guardrails=results,
        decision=decision,
        sticky_violations=sticky,
        days=days,
        window=(t0.isoformat(), t_last.isoformat()),
        notes=notes,
    )


# --------------------------------------------------------------------------- the report


def _fmt(v: float, spec: str = ".4g") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def _report(r: AnalysisResult) -> str:
    lines = [
        f"# A/B analysis: {r.experiment_id}",
        "",
        f"**Decision: {r.decision.decision}**",
        "",
        *[f"- {x}" for x in r.decision.reasons],
        "",
        f"Champion v{r.champion_version} vs challenger v{r.challenger_version}; primary metric hit@{r.k} of the "
        f"next interaction (per user, intention to treat); alpha {r.alpha}; designed split {r.split} "
        f"(challenger share, from {r.split_source}); {r.days:.2f} days"
        + (f" ({r.window[0]} .. {r.window[1]})" if r.window else "")
        + ".",
        "",
        "## Arms",
        "",
        "| arm | users | exposures | consumes | hit@K | fallback/error rate | p99 latency ms | coverage | versions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in r.arms.items():
        lines.append(
            f"| {arm} | {s.users} | {s.exposures} | {s.consumes} | {_fmt(s.hit_rate)} | {_fmt(s.fallback_rate)} | "
            f"{_fmt(s.p99_latency_ms)} | {_fmt(s.coverage)} | {', '.join(s.model_versions)} |"
        )
    lines += ["", "## Sample ratio", ""]
    for name, srm in (("assignment (intended arm)", r.srm_assignment), ("exposure (served arm)", r.srm_exposure)):
        if srm is not None:
            lines.append(
                f"- {name}: chi2 {srm.statistic:.4g}, p {srm.p_value:.4g}, "
                f"expected {[round(e, 1) for e in srm.expected]}"
                f" -> {'MISMATCH' if srm.mismatch else 'ok'} (threshold {srm.threshold})"
            )
    if r.sticky_violations:
        lines.append(f"- users in both arms: {r.sticky_violations}")
    p = r.primary
    lines += ["", "## Primary: always-valid mSPRT over cumulative looks", ""]
    if p.result is not None:
        res = p.result
        lines += [
            f"- difference {res.diff:+.4g} (relative {_fmt(res.relative, '+.2%')}), always-valid "
            f"{1 - r.alpha:.0%} CI [{res.ci_low:.4g}, {res.ci_high:.4g}], p {res.p_value:.4g}; tau {p.tau:.4g}",
            f"- CUPED on pre-experiment activity: theta {p.theta:.4g}, variance reduction {p.variance_reduction:.1%}",
            "",
            "| look | end | n champion | n challenger | champion | challenger | diff | CI low | CI high | p |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in p.looks:
            lines.append(
                f"| {x.look} | {x.end} | {x.n_control} | {x.n_treatment} | {x.control_mean:.4g} | "
                f"{x.treatment_mean:.4g} | {x.diff:+.4g} | {x.ci_low:.4g} | {x.ci_high:.4g} | {x.p_value:.4g} |"
            )
        lines += ["", "![cumulative effect](effect.png)"]
    else:
        lines.append("- not enough users yet")
    lines += ["", "## Guardrails (one-sided non-inferiority)", ""]
    if r.guardrails:
        lines += ["| guardrail | status | estimate | bound | threshold | p |", "|---|---|---|---|---|---|"]
        for g in r.guardrails:
            kind = "relative" if g.relative else "absolute"
            lines.append(
                f"| {g.name} ({kind}) | {g.status} | {g.estimate:+.4g} | {g.bound:+.4g} | {g.threshold:+.4g} | "
                f"{g.p_value:.3g} |"
            )
    else:
        lines.append("- not computed")
    if r.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in r.notes]]
    if r.applied:
        lines += ["", "## Registry", "", f"- {r.applied.get('message', r.applied)}"]
    return "\n".join(lines) + "\n"


def plot_effect(result: AnalysisResult, path: str | Path) -> Path:
    """PNG of the cumulative CUPED-adjusted effect per look and its always-valid interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    looks = result.primary.looks
    fig, ax = plt.subplots(figsize=(7, 4))
    if looks:
        xs = [x.look + 1 for x in looks]
        ax.fill_between(xs, [x.ci_low for x in looks], [x.ci_high for x in looks], alpha=0.25, label="always-valid CI")
        ax.plot(xs, [x.diff for x in looks], marker="o", label="challenger - champion")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("look (cumulative)")
    ax.set_ylabel(f"hit@{result.k} difference (CUPED)")
    ax.set_title(f"{result.experiment_id}: {result.decision.decision}")
    if looks:
        ax.legend(loc="best")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- registry and MLflow


@dataclass(frozen=True)
class _Current:
    experiment_id: str | None
    champion: str | None
    challenger: str | None
    split: float | None


def _current(cfg: Config, client: MlflowClient) -> _Current:
    """The running experiment as the service builds it from the registry (aliases + challenger tags)."""
    from mlflow.exceptions import MlflowException

    from hllm.abtest.service import experiment_from_tags

    name = cfg.registry.model_name
    try:
        aliases = dict(client.get_registered_model(name).aliases or {})
    except MlflowException:
        return _Current(None, None, None, None)
    champ, chall = aliases.get("champion"), aliases.get("challenger")
    if champ is None or chall is None or str(champ) == str(chall):
        return _Current(None, str(champ) if champ is not None else None, None, None)
    tags = dict(client.get_model_version(name, str(chall)).tags or {})
    try:
        e = experiment_from_tags(name, str(champ), str(chall), tags, default_share=cfg.registry.challenger_share)
    except ValueError:
        return _Current(None, str(champ), str(chall), None)
    return _Current(e.experiment_id, str(champ), str(chall), e.split)


def _versions_from_logs(ex: pd.DataFrame) -> tuple[str | None, str | None]:
    """(champion, challenger) versions: the commonest version that served each arm as intended."""
    out: list[str | None] = []
    for arm in (CHAMPION, CHALLENGER):
        v = ex.loc[(ex["intended_arm"] == arm) & (ex["served_arm"] == arm), "model_version"]
        out.append(str(v.mode().iloc[0]) if not v.empty else None)
    return out[0], out[1]


def _load_covariates(cfg: Config, log_dir: str | Path) -> tuple[dict[str, float], str]:
    """Pre-experiment activity per user id (see the module docstring)."""
    path = Path(str(log_dir)) / COVARIATES_FILE
    if "://" not in str(log_dir) and path.exists():
        df = pd.read_parquet(path)
        return dict(zip(df["unit_id"].astype(str), df["pre_activity"].astype(float), strict=True)), str(path)
    try:
        from hllm.data.dataset import load_built

        built = load_built(cfg.paths.built_dir)
    except (FileNotFoundError, ValueError, OSError):
        return {}, "none (no covariates file, no built dataset)"
    lengths = built.sequences.lengths
    return {str(u): float(n) for u, n in zip(built.user_ids, lengths, strict=True)}, str(built.dir)


def _log_run(cfg: Config, result: AnalysisResult, mlflow_experiment: str, actor: str) -> str:
    from hllm.ops import tracking

    client = tracking.client(cfg)
    exp_id = tracking.configure(cfg, mlflow_experiment)
    tags = {
        tracking.TAG_KIND: "ab-analysis",
        "mlflow.runName": f"ab-{result.experiment_id}",
        "ab.experiment_id": result.experiment_id,
        "ab.model": cfg.registry.model_name,
        "ab.champion_version": result.champion_version or "",
        "ab.challenger_version": result.challenger_version or "",
        "ab.decision": result.decision.decision,
        "ab.actor": actor,
    }
    run = client.create_run(exp_id, run_name=tags["mlflow.runName"], tags=tags)
    run_id = run.info.run_id
    result.run_id = run_id
    try:
        from mlflow.entities import Metric, Param

        ts = int(datetime.now(UTC).timestamp() * 1000)
        metrics = [Metric(k, v, ts, 0) for k, v in result.metrics().items()]
        for x in result.primary.looks:
            for key, val in (("look/diff", x.diff), ("look/ci_low", x.ci_low), ("look/ci_high", x.ci_high)):
                if math.isfinite(val):
                    metrics.append(Metric(key, val, ts, x.look))
            metrics.append(Metric("look/p_value", x.p_value, ts, x.look))
        params = [
            Param("k", str(result.k)),
            Param("alpha", str(result.alpha)),
            Param("split", str(result.split)),
            Param("split_source", result.split_source),
        ]
        for i in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[i : i + 500], params=params if i == 0 else [])
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "report.md").write_text(result.report_markdown())
            (d / "analysis.json").write_text(json.dumps(result.to_dict(), indent=2))
            plot_effect(result, d / "effect.png")
            client.log_artifacts(run_id, str(d), "ab")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    if result.challenger_version:
        name = cfg.registry.model_name
        try:
            client.set_model_version_tag(name, result.challenger_version, TAG_ANALYSIS_RUN, run_id)
            client.set_model_version_tag(name, result.challenger_version, TAG_ANALYSIS_DECISION, result.verdict)
        except Exception as e:  # the version was deleted, or another store: the run still exists
            result.notes.append(f"could not tag challenger v{result.challenger_version}: {e}")
    return run_id


def _apply(cfg: Config, result: AnalysisResult, actor: str) -> dict[str, Any]:
    """The decision through the registry; only when the registry still runs this experiment's challenger."""
    from hllm.ops import registry, tracking

    client = tracking.client(cfg)
    cur = _current(cfg, client)
    verdict = result.verdict
    reason = (
        f"ab-analysis: {verdict}: {result.decision.reasons[0]} (experiment {result.experiment_id}, run {result.run_id})"
    )
    base = {
        "action": "ab-analysis",
        "decision": verdict,
        "version": result.challenger_version,
        "champion": result.champion_version,
        "experiment_id": result.experiment_id,
        "run_id": result.run_id,
        "actor": actor,
        "reason": reason,
    }
    if verdict in ("ship", "stop") and (
        cur.challenger is None or cur.challenger != result.challenger_version or cur.champion != result.champion_version
    ):
        msg = (
            f"{verdict} not applied: the registry no longer runs this experiment "
            f"(champion {cur.champion}, challenger {cur.challenger})"
        )
        registry.record(cfg, {**base, "moved": False, "message": msg})
        return {"moved": False, "message": msg}
    try:
        if verdict == "ship":
            res = registry.promote(cfg, result.challenger_version, to="champion", reason=reason, actor=actor)
            return {"moved": res.action != "noop", "action": res.action, "message": res.message}
        if verdict == "stop":
            res = registry.end_ab(cfg, reason=reason, actor=actor)
            return {"moved": res.action != "noop", "action": res.action, "message": res.message}
    except registry.RegistryError as e:
        msg = f"{verdict} refused by the registry: {e}"
        registry.record(cfg, {**base, "moved": False, "message": msg})
        return {"moved": False, "message": msg}
    msg = f"{verdict}: nothing moved"
    registry.record(cfg, {**base, "moved": False, "message": msg})
    return {"moved": False, "message": msg}


def analyze(
    cfg: Config,
    log_dir: str | Path,
    experiment_id: str | None = None,
    *,
    alpha: float = 0.05,
    k: int = 10,
    now: datetime | None = None,
    decide_and_apply: bool = False,
    actor: str = ACTOR,
    mde: float = 0.1,
    min_units: int = 200,
    max_units: int | None = None,
    max_days: float | None = 28.0,
    look_every: timedelta = timedelta(days=1),
    guardrails: Guardrails | None = Guardrails(),
    covariates: Mapping[str, float] | None = None,
    split: float | None = None,
    log_run: bool = True,
    mlflow_experiment: str = MLFLOW_EXPERIMENT,
    filesystem: Any = None,
) -> AnalysisResult:
    """Analyse one experiment from the logs under ``log_dir`` (see the module docstring), log it as an MLflow
    run in ``mlflow_experiment`` attached to the challenger version (tag ``ab.analysis_run_id``), and with
    ``decide_and_apply`` act on the decision: ship -> ``registry.promote(challenger, to="champion")``,
    stop -> ``registry.end_ab``, keep_running / invalid -> nothing moves; the audit log records it with
    ``actor``. ``experiment_id`` defaults to the registry's running experiment when the logs hold it,
    else the one with the newest exposure. ``now`` analyses the logs as they were at that time."""
    from hllm.ops import tracking

    exposures = ablogs.read_exposures(log_dir, filesystem)
    outcomes = ablogs.read_outcomes(log_dir, filesystem)
    client = tracking.client(cfg)
    cur = _current(cfg, client)
    logged = exposures.dropna(subset=["experiment_id"])
    if experiment_id is None:
        if cur.experiment_id is not None and (logged["experiment_id"] == cur.experiment_id).any():
            experiment_id = cur.experiment_id
        elif not logged.empty:
            experiment_id = str(logged.sort_values("ts")["experiment_id"].iloc[-1])
        elif cur.experiment_id is not None:
            experiment_id = cur.experiment_id
        else:
            raise ValueError(
                f"no experiment to analyse: no exposures under {log_dir} and no challenger in the registry"
            )
    ex = logged[logged["experiment_id"] == experiment_id]
    champ, chall = _versions_from_logs(ex) if not ex.empty else (None, None)
    split_source = None
    if cur.experiment_id == experiment_id:
        champ, chall = cur.champion, cur.challenger
        if split is None and cur.split is not None:
            split, split_source = cur.split, "registry"
    if covariates is None:
        covariates, source = _load_covariates(cfg, log_dir)
    else:
        source = "given"
    n_items = None
    try:
        from hllm.data.dataset import load_built

        n_items = load_built(cfg.paths.built_dir).n_items - 1  # without the padding row
    except (FileNotFoundError, ValueError, OSError):
        pass
    result = analyze_frames(
        exposures,
        outcomes,
        experiment_id,
        split=split,
        k=k,
        alpha=alpha,
        mde=mde,
        min_units=min_units,
        max_units=max_units,
        max_days=max_days,
        look_every=look_every,
        now=now,
        covariates=covariates,
        guardrails=guardrails,
        n_items=n_items,
        champion_version=champ,
        challenger_version=chall,
    )
    if split_source:
        result.split_source = split_source
    result.notes.append(f"CUPED covariate (pre-experiment activity) from {source}")
    log.info("experiment %s: %s (%s)", experiment_id, result.verdict, "; ".join(result.decision.reasons))
    if log_run:
        _log_run(cfg, result, mlflow_experiment, actor)
    if decide_and_apply:
        result.applied = _apply(cfg, result, actor)
        log.info("registry: %s", result.applied["message"])
        if log_run and result.run_id:
            tracking.client(cfg).log_text(result.run_id, result.report_markdown(), "ab/report.md")
    return result
