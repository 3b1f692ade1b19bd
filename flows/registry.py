"""``promote`` and ``rollback``: the registry commands as flows, for users who work from the Prefect UI.

They call the same functions as ``hllm registry promote`` / ``hllm registry rollback`` (see
:mod:`hllm.ops.registry`): the same gate, the same audit log. A refused promotion fails the flow run
with the gate's reason, so the UI shows it in red; nothing is moved.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.nightly import _code_version


def _actor() -> str:
    from prefect.runtime import flow_run

    return f"prefect:{flow_run.name or flow_run.id or 'local'}"


def _load(params: str, overrides: list[str] | None):
    from hllm.config import load_config

    return load_config(params, list(overrides or []))


# Alias moves are not retried: `promote`/`rollback` are idempotent only with the guards below,
# and a refusal is final. MLflow's client already retries its HTTP requests.
@task(name="registry-promote", cache_policy=NO_CACHE)
def _promote(cfg, version: str | None, to: str, reason: str, share: float | None) -> dict[str, Any]:
    from hllm.ops import registry

    res = registry.promote(cfg, version, to=to, reason=reason, actor=_actor(), share=share)
    return {"action": res.action, "version": res.version, "previous": res.previous, "message": res.message}


@task(name="registry-rollback", cache_policy=NO_CACHE)
def _rollback(cfg, reason: str, expect_current: str | None) -> dict[str, Any]:
    from hllm.ops import registry

    res = registry.rollback(cfg, reason=reason, actor=_actor(), expect_current=expect_current)
    return {"action": res.action, "version": res.version, "previous": res.previous, "message": res.message}


@flow(
    name="promote",
    version=_code_version(),
    description="Promote a model version (gate -> challenger, or challenger -> champion).",
)
def promote(
    version: str | None = None,
    to: str = "challenger",
    reason: str = "",
    share: float | None = None,
    params: str = "params.yaml",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """``hllm registry promote VERSION [--to champion]`` from the Prefect UI.

    Args:
        version: the model version; with ``to="champion"`` the default is the current challenger.
        to: ``challenger`` (run the gate, start the A/B test) or ``champion`` (end it for the challenger).
        reason: recorded on the version and in the audit log.
        share: challenger traffic share (default ``registry.challenger_share``).
    """
    cfg = _load(params, overrides)
    res = _promote(cfg, version, to, reason, share)
    create_markdown_artifact(
        key="registry-promote", markdown=f"# promote\n\n{res['message']}\n", description=res["message"][:200]
    )
    return res


@flow(name="rollback", version=_code_version(), description="Put the previous champion back.")
def rollback(
    reason: str = "", expect_current: str | None = None, params: str = "params.yaml", overrides: list[str] | None = None
) -> dict[str, Any]:
    """``hllm registry rollback`` from the Prefect UI.

    Args:
        reason: recorded on the versions and in the audit log.
        expect_current: only roll back while this version is the champion (safe to re-run).
    """
    cfg = _load(params, overrides)
    res = _rollback(cfg, reason, expect_current)
    create_markdown_artifact(
        key="registry-rollback", markdown=f"# rollback\n\n{res['message']}\n", description=res["message"][:200]
    )
    return res
