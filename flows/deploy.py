"""Deployments of the flows, served by a long-lived process (``hllm flows serve``).

``nightly-retrain/<flow.deployment>`` runs on ``flow.cron`` (``flow.timezone``) with a deployment
concurrency limit of 1 (collision strategy ENQUEUE: a run due while another one runs waits in
``AwaitingConcurrencySlot`` and starts after it); ``promote/manual`` and ``rollback/manual`` have
no schedule and are triggered from the UI or ``prefect deployment run``; ``ab-analysis/daily`` decides the
running A/B test from the service logs every morning (:data:`AB_CRON`).

The same deployments, for a process work pool and worker instead of a serve process, are declared
in ``prefect.yaml`` (``prefect deploy --all``).
"""

from __future__ import annotations

import os
from typing import Any

from hllm.config import Config

TAGS = ["hllm"]
AB_CRON = "0 6 * * *"  # the A/B analysis looks once a day: its sequential test stays valid under daily peeking


def _env_defaults() -> None:
    # hllm's own log lines (training progress, validation results) go to the Prefect UI too.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "hllm")


def nightly_parameters(params: str, overrides: list[str] | None = None) -> dict[str, Any]:
    return {"params": params, **({"overrides": list(overrides)} if overrides else {})}


def deployments(
    cfg: Config,
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    cron: str | None = None,
    paused: bool = False,
) -> list:
    """The runner deployments ``hllm flows serve`` serves."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    from flows.ab_analysis import ab_analysis
    from flows.nightly import nightly_retrain
    from flows.registry import promote, rollback

    schedule = Cron(cron or cfg.flow.cron, timezone=cfg.flow.timezone or None)
    nightly = nightly_retrain.to_deployment(
        name=cfg.flow.deployment,
        schedules=[schedule],
        paused=paused,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        parameters=nightly_parameters(params, overrides),
        tags=TAGS + ["nightly"],
        description=f"Nightly retraining at '{cron or cfg.flow.cron}' ({cfg.flow.timezone}); one run at a time.",
    )
    registry_params = {"params": params, **({"overrides": list(overrides)} if overrides else {})}
    registry_tags = TAGS + ["registry"]
    return [
        nightly,
        promote.to_deployment(name="manual", parameters=registry_params, tags=registry_tags),
        rollback.to_deployment(name="manual", parameters=registry_params, tags=registry_tags),
        ab_analysis.to_deployment(
            name="daily",
            schedules=[Cron(AB_CRON, timezone=cfg.flow.timezone or None)],
            paused=paused,
            parameters=registry_params,
            tags=TAGS + ["ab"],
        ),
    ]


def serve(
    cfg: Config,
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    cron: str | None = None,
    paused: bool = False,
    limit: int | None = None,
) -> None:
    """Register the deployments and run them here until interrupted (blocks)."""
    _env_defaults()
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(cfg, params, overrides, cron, paused), limit=limit)
