"""Scheduling and triggering against a real `prefect server start` on 127.0.0.1.

The two ways to deploy the nightly flow, each triggered with `prefect deployment run` and watched
to Completed: `hllm flows serve` (a long-lived serve process) and `prefect.yaml` (`prefect deploy`
onto a process work pool, run by `prefect worker start`). The serve process and the worker are
stopped before the server (on SIGINT they call the API on the way out and hang without it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers.flowkit import make_project, registered_versions

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read() or b"null")


def _stop(proc: subprocess.Popen, sig=signal.SIGINT, timeout: float = 30) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _start(args: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    # own session: _stop signals the process group (the server's uvicorn, the runner's flow runs)
    return subprocess.Popen(
        args, cwd=cwd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` (SQLite in tmp) -> the environment that points clients at it."""
    tmp = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update(
        {
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "true",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    senv = {
        **base,
        "PREFECT_HOME": str(tmp / "server-home"),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'server.db'}",
    }
    proc = _start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        senv,
        tmp,
        tmp / "server.log",
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while True:
        try:
            if _get(f"{api}/health") is True:
                break
        except OSError:
            pass
        assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "prefect server not healthy after 120 s"
        time.sleep(0.5)
    env = {
        **base,
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(tmp / "client-home"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    yield env
    _stop(proc, signal.SIGTERM)


def _deployment(api: str, name: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _get(f"{api}/deployments/name/{name}")
        except OSError:
            assert time.monotonic() < deadline, f"deployment {name} never appeared"
            time.sleep(1)


def _run_deployment(env: dict, cwd: Path, name: str, *params: str) -> str:
    args = [
        str(BIN / "prefect"),
        "deployment",
        "run",
        name,
        "--watch",
        "--watch-interval",
        "2",
        "--watch-timeout",
        "300",
    ]
    for p in params:
        args += ["-p", p]
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=360)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


# A Prefect server plus a nightly run under a deployment and a worker (over two minutes): part of the stack suite
# (`make test-integration`, in CI), not of `make test`.
@pytest.mark.integration
def test_serve_and_prefect_yaml_deployments_run_on_trigger(server, tmp_path, bert, raw_snapshot):
    """1. `hllm flows serve`: the nightly deployment carries the cron and the concurrency limit;
    `prefect deployment run` executes the real flow to Completed (it registers v1).
    2. `prefect deploy --all` from prefect.yaml onto a process pool: same schedule and limit; a
    worker executes a triggered run in the checkout (the `promote` flow on v1, which is cheap: the
    nightly flow's execution under a deployment was just shown by 1.)."""
    api = server["PREFECT_API_URL"]
    root = make_project(
        tmp_path / "proj", bert, **{"flow.snapshot": str(raw_snapshot), "flow.cron": "0 3 * * *", "train.max_steps": 2}
    )
    serve = _start([str(BIN / "hllm"), "flows", "serve"], server, root, tmp_path / "serve.log")
    try:
        dep = _deployment(api, "nightly-retrain/nightly")
        (sched,) = dep["schedules"]
        assert sched["schedule"]["cron"] == "0 3 * * *" and sched["schedule"]["timezone"] == "UTC"
        assert sched["active"] is True
        assert dep["global_concurrency_limit"]["limit"] == 1
        assert dep["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        assert dep["parameters"] == {"params": "params.yaml"}
        for other in ("promote/manual", "rollback/manual"):
            assert _deployment(api, other)["schedules"] == []
        inspect = subprocess.run(
            [str(BIN / "prefect"), "deployment", "inspect", "nightly-retrain/nightly"],
            env=server,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "0 3 * * *" in inspect.stdout  # the schedule as a user sees it

        out = _run_deployment(server, root, "nightly-retrain/nightly", "baselines=false")
        assert "Completed" in out
    finally:
        _stop(serve)  # before the server
    assert [str(v.version) for v in registered_versions(root)] == ["1"]
    assert len(list((root / "reports" / "nightly").glob("*.md"))) == 1

    # ---- 2. prefect.yaml + process work pool + worker
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (root / "flows").symlink_to(REPO / "flows")  # what a checkout has
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    pool = spec["definitions"]["work_pool"]["name"]
    env = {**server, "PWD": str(root)}  # what the shell sets in the checkout
    prefect = str(BIN / "prefect")
    subprocess.run(
        [prefect, "--no-prompt", "work-pool", "create", pool, "--type", "process", "--overwrite"],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    dep = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all"], cwd=root, env=env, capture_output=True, text=True, timeout=180
    )
    assert dep.returncode == 0, dep.stdout + dep.stderr
    d = _deployment(api, "nightly-retrain/nightly")
    assert d["work_pool_name"] == pool
    assert [s["schedule"]["cron"] for s in d["schedules"]] == ["0 2 * * *"]
    assert d["global_concurrency_limit"]["limit"] == 1
    assert d["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(root)
    assert _deployment(api, "promote/manual")["work_pool_name"] == pool
    worker = _start(
        [prefect, "worker", "start", "--pool", pool, "--type", "process"], env, root, tmp_path / "worker.log"
    )
    try:
        out = _run_deployment(env, root, "promote/manual", 'version="1"', 'reason="from the worker"')
        assert "Completed" in out
    finally:
        _stop(worker)  # before the server


def test_prefect_yaml_matches_params_yaml():
    """prefect.yaml repeats the flow section's defaults; they must not drift apart."""
    from hllm.config import load_config

    fc = load_config(REPO / "params.yaml").flow
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    nightly = next(d for d in spec["deployments"] if d["entrypoint"].endswith(":nightly_retrain"))
    assert nightly["name"] == fc.deployment
    assert nightly["schedules"] == [{"cron": fc.cron, "timezone": fc.timezone}]
    assert {d["work_pool"]["name"] for d in spec["deployments"]} == {fc.work_pool}
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    from prefect.flows import load_flow_from_entrypoint

    names = {load_flow_from_entrypoint(str(REPO / d["entrypoint"])).name for d in spec["deployments"]}
    assert names == {"nightly-retrain", "promote", "rollback", "ab-analysis"}
    from flows.deploy import AB_CRON

    ab = next(d for d in spec["deployments"] if d["entrypoint"].endswith(":ab_analysis"))
    assert ab["schedules"] == [{"cron": AB_CRON, "timezone": fc.timezone}]  # the same schedule as `hllm flows serve`
