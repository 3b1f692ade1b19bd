"""``ab-analysis``: decide the running A/B test from the service logs, on a schedule.

A thin wrapper over :func:`hllm.abtest.analysis.analyze` with ``decide_and_apply=True``: the analysis run
lands in MLflow (experiment ``hllm-ab-analysis``, linked from the challenger version) and the decision
goes through the registry with the actor ``ab-analysis`` (ship: the challenger becomes champion; stop:
the test ends; keep_running / invalid: nothing moves, the audit log records the analysis).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.nightly import _code_version


# Not retried: a decision that moved an alias must not be applied twice (a re-run re-reads the registry
# and applies nothing when the experiment is no longer running).
@task(name="ab-analyze", cache_policy=NO_CACHE)
def _analyze(
    params: str, overrides: list[str] | None, log_dir: str, experiment_id: str | None, alpha: float, k: int
) -> dict[str, Any]:
    from hllm.abtest.analysis import analyze
    from hllm.config import load_config

    cfg = load_config(params, list(overrides or []))
    res = analyze(cfg, log_dir, experiment_id, alpha=alpha, k=k, decide_and_apply=True)
    create_markdown_artifact(
        key="ab-analysis", markdown=res.report_markdown(), description=f"{res.experiment_id}: {res.verdict}"
    )
    return res.to_dict()


@flow(name="ab-analysis", version=_code_version(), description="Decide the running A/B test from its logs.")
def ab_analysis(
    log_dir: str = "reports/ab/logs",
    experiment_id: str | None = None,
    alpha: float = 0.05,
    k: int = 10,
    params: str = "params.yaml",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """``hllm ab analyze --apply`` from Prefect.

    Args:
        log_dir: the service's exposure/outcome logs (folder or s3:// URI).
        experiment_id: default: the registry's running experiment.
        alpha: false-positive rate of the always-valid test.
        k: hit@K.
    """
    result: dict[str, Any] = _analyze(params, overrides, log_dir, experiment_id, alpha, k)
    return result
