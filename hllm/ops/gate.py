"""The promotion gate: a candidate version against the champion on the same protocol and data,
paired bootstrap over per-user metrics."""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hllm.config import Config
from hllm.evaluation.results import EvalResult, artifact_dir, parse_artifact_dir
from hllm.ops import tracking

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)


@dataclass
class GateResult:
    ok: bool
    reason: str
    metric: str
    candidate_version: str
    champion_version: str
    protocol_hash: str
    data_version: str
    candidate: float = float("nan")
    champion: float = float("nan")
    required: float = float("nan")
    rel_gain: float = float("nan")
    mean_diff: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    confidence: float = 0.95
    samples: int = 0
    n_users: int = 0

    def summary(self) -> str:
        return (
            f"{self.metric}: v{self.candidate_version}={self.candidate:.5f} vs champion "
            f"v{self.champion_version}={self.champion:.5f} (required >= {self.required:.5f}, "
            f"rel. gain {self.rel_gain:+.2%}); paired bootstrap {self.confidence:.0%} CI of the per-user "
            f"difference [{self.ci_low:+.5f}, {self.ci_high:+.5f}] over {self.n_users} users"
        )


def paired_bootstrap(
    candidate: np.ndarray, champion: np.ndarray, samples: int, confidence: float, seed: int = 0
) -> tuple[float, float, float]:
    """Mean per-user difference (candidate - champion) and its percentile bootstrap CI, resampling
    users (pairs) with replacement. Memory is bounded: resamples are drawn in blocks of ~4M indices."""
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(champion, dtype=np.float64)
    n = len(diff)
    if n == 0:
        raise ValueError("paired bootstrap over zero users")
    rng = np.random.default_rng(seed)
    means = np.empty(samples, dtype=np.float64)
    block = max(1, 4_000_000 // n)
    for s in range(0, samples, block):
        e = min(samples, s + block)
        means[s:e] = diff[rng.integers(0, n, size=(e - s, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(diff.mean()), float(lo), float(hi)


def _load_eval(
    client: MlflowClient, mv: ModelVersion, protocol: str, data_ver: str, split: str = "test"
) -> EvalResult | None:
    import mlflow

    art = artifact_dir(split, protocol, data_ver)
    if mv.run_id is None:  # a version registered without a source run has no evaluations
        return None
    names = {Path(a.path).name for a in client.list_artifacts(mv.run_id, art)}
    if "metrics.json" not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=art, dst_path=tmp))
        return EvalResult.load(local)


def _available_evals(client: "MlflowClient", mv: "ModelVersion", split: str = "test") -> list[str]:
    if mv.run_id is None:
        return []
    out = []
    for p in client.list_artifacts(mv.run_id, f"eval/{split}"):
        if p.is_dir:
            for d in client.list_artifacts(mv.run_id, p.path):
                parsed = parse_artifact_dir(d.path)
                if parsed is not None:
                    out.append(f"{parsed[1]}/{parsed[2]}")
    return out


def gate(
    cfg: Config, candidate: "ModelVersion", champion: "ModelVersion", client: "MlflowClient | None" = None
) -> GateResult:
    """Compare candidate and champion; ``ok`` False with a reason when the candidate may not go to A/B."""
    client = client or tracking.client(cfg)
    rc = cfg.registry
    metric = rc.gate_metric
    protocol = candidate.tags.get(tracking.TAG_PROTOCOL, "")
    data_ver = candidate.tags.get(tracking.TAG_DATA_VERSION, "")
    res = GateResult(
        False,
        "",
        metric,
        str(candidate.version),
        str(champion.version),
        protocol,
        data_ver,
        confidence=rc.confidence,
        samples=rc.bootstrap_samples,
    )

    def refuse(reason: str) -> GateResult:
        res.reason = reason
        return res

    if not protocol or not data_ver:
        return refuse(f"version {str(candidate.version)} has no protocol hash / data version tags")
    champ_protocol = champion.tags.get(tracking.TAG_PROTOCOL, "")
    champ_data = champion.tags.get(tracking.TAG_DATA_VERSION, "")
    cand_eval = _load_eval(client, candidate, protocol, data_ver)
    if cand_eval is None:
        return refuse(
            f"version {str(candidate.version)} has no test evaluation under protocol {protocol} on data "
            f"{data_ver} (expected artifacts {artifact_dir('test', protocol, data_ver)}/ in "
            f"run {candidate.run_id})"
        )
    champ_eval = _load_eval(client, champion, protocol, data_ver)
    if champ_eval is None:
        what = []
        if champ_protocol != protocol:
            what.append(f"protocol hash differs (champion {champ_protocol}, candidate {protocol})")
        if champ_data != data_ver:
            what.append(f"dataset version differs (champion {champ_data}, candidate {data_ver})")
        have = _available_evals(client, champion)
        return refuse(
            f"champion v{str(champion.version)} has no evaluation comparable with candidate "
            f"v{str(candidate.version)}: {'; '.join(what) or 'no matching evaluation'}. Results under "
            f"different protocols or data are never compared; evaluate the champion on the candidate's "
            f"data and protocol first (`hllm registry reevaluate`, or `hllm registry attach-eval "
            f"--run-id {champion.run_id}`) (evaluations it has: {have or 'none'})"
        )
    if metric not in cand_eval.metrics or metric not in champ_eval.metrics:
        return refuse(
            f"gate metric {metric!r} (registry.gate_metric) missing: candidate has "
            f"{sorted(cand_eval.metrics)}, champion has {sorted(champ_eval.metrics)}"
        )
    res.candidate = float(cand_eval.metrics[metric])
    res.champion = float(champ_eval.metrics[metric])
    res.required = res.champion * (1.0 + rc.min_rel_gain)
    res.rel_gain = (
        (res.candidate - res.champion) / res.champion
        if res.champion > 0
        else (0.0 if res.candidate == res.champion else math.inf)
    )

    if metric not in cand_eval.per_user or metric not in champ_eval.per_user:
        return refuse(
            f"per-user {metric!r} arrays missing (per_user.npz of candidate run {candidate.run_id} "
            f"or champion run {champion.run_id}): the paired bootstrap needs them"
        )
    common, ci, hi = np.intersect1d(cand_eval.users, champ_eval.users, return_indices=True)
    if len(common) == 0:
        return refuse("candidate and champion were evaluated on disjoint user sets")
    if len(common) < max(len(cand_eval.users), len(champ_eval.users)):
        log.warning(
            "paired bootstrap over %d common users (candidate %d, champion %d)",
            len(common),
            len(cand_eval.users),
            len(champ_eval.users),
        )
    res.n_users = len(common)
    res.mean_diff, res.ci_low, res.ci_high = paired_bootstrap(
        cand_eval.per_user[metric][ci],
        champ_eval.per_user[metric][hi],
        rc.bootstrap_samples,
        rc.confidence,
        seed=rc.bootstrap_seed,
    )

    # A relative tolerance keeps an identical model (equal up to float32 rounding) "at least as good".
    if res.candidate < res.required - 1e-9 * max(1.0, abs(res.required)):
        return refuse(f"candidate is worse on the gate: {res.summary()}")
    if res.ci_high < 0:
        return refuse(f"the paired bootstrap shows the candidate worse: {res.summary()}")
    res.ok = True
    res.reason = f"passed: {res.summary()}"
    return res


def _gate_dict(res: GateResult) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(res).items()}
