"""Tracking server and object store outages in the middle of a nightly run, against the real things:
the flow (`hllm flows run nightly`, a subprocess) tracks to a real ``mlflow server`` on loopback whose
artifacts live on moto's S3 server (in this process, behind the fault injector of tests/conftest.py).

- The MLflow server is killed while HLLM trains and restarted 25 s later (same port, same store):
  training goes on (its metrics wait in the background buffer and arrive, in order, once the server is
  back), then S3 answers 503 and stalls for a while during evaluation and registration: the client's
  and the tasks' retries carry the run through; it completes and registers one champion.
- The MLflow server goes down for good while HLLM trains: training still finishes, the run then fails
  cleanly with the reason (the tracking server is unreachable) within its retries instead of hanging;
  with the server back, the next run closes the dead run's MLflow runs FAILED and completes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.flowkit import make_project
from tests.helpers.servers import MlflowServer

pytestmark = [pytest.mark.slow, pytest.mark.faults]  # make test-faults

START_S = 180  # Python, the temporary Prefect API, the data stages and the model load on 2 shared cores


@pytest.fixture
def mlflow_server(tmp_path, s3):
    import boto3

    boto3.client("s3").create_bucket(Bucket="mlflow-art")
    srv = MlflowServer(tmp_path, s3.endpoint)
    srv.start()
    yield srv
    srv.close()


def _project(tmp_path: Path, bert: Path, uri: str, **extra: object) -> Path:
    return make_project(
        tmp_path / "proj",
        bert,
        **{
            "tracking.tracking_uri": uri,
            # training long enough for an outage inside it: the budget ends it, not the steps
            "train.max_steps": 100_000,
            "train.epochs": 10_000,
            "train.time_budget_s": 45.0,
            "train.log_every": 5,
            "flow.io_retries": 2,
            "flow.io_retry_delay_s": 2.0,
            **extra,
        },
    )


def _env(project: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "AWS_", "MLFLOW_S3"))}
    env.update({"PREFECT_HOME": str(project.parent / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PYTHONUNBUFFERED": "1", **extra})  # fmt: skip
    return env  # no S3 credentials: artifacts go through the server's proxy, as in production


def _start(project: Path, name: str, **env: str):
    import subprocess

    log = project.parent / f"{name}.log"
    args = [str(Path(sys.executable).parent / "hllm"), "flows", "run", "nightly", "--no-baselines"]
    proc = subprocess.Popen(args, cwd=project, env=_env(project, **env), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return proc, log


def _wait_training(project: Path, proc, log: Path) -> Path:
    deadline = time.monotonic() + START_S
    while True:
        dirs = [d for d in (project / "runs").glob("nightly-*-hllm") if (d / "checkpoints").is_dir()]
        if dirs:
            return dirs[0]
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no training after {START_S} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


def _finish(proc, log: Path, timeout: float = 600) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    return rc, log.read_text(errors="replace")


def _outage_noticed(out: str) -> bool:
    return "tracking slow or unreachable" in out or "tracking unavailable" in out


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _versions(uri: str) -> list[tuple[str, list[str]]]:
    c = _client(uri)  # search results carry no aliases: read each version
    vs = c.search_model_versions("name='hllm-recommender'")
    return sorted((v.version, list(c.get_model_version(v.name, v.version).aliases)) for v in vs)


def _runs(uri: str) -> list:
    c = _client(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(exps, max_results=1000)


def test_mlflow_server_and_s3_outages_mid_run_are_ridden_out(tmp_path, bert, mlflow_server, s3):
    project = _project(tmp_path, bert, mlflow_server.uri)
    proc, log = _start(project, "night")
    try:
        _wait_training(project, proc, log)
        time.sleep(3)  # a few metric rows reach the server first
        mlflow_server.kill()
        t_down = time.monotonic()
        while not _outage_noticed(log.read_text(errors="replace")):
            assert proc.poll() is None, f"the run died with the tracking server:\n{log.read_text()[-4000:]}"
            assert time.monotonic() - t_down < 60, "training never noticed the outage"
            time.sleep(0.2)
        time.sleep(max(0.0, 25 - (time.monotonic() - t_down)))
        assert proc.poll() is None, f"the run died during the outage:\n{log.read_text()[-4000:]}"
        mlflow_server.start()
        s3.fail = 4  # then S3 throttles (503 SlowDown) the artifact uploads behind the server...
        while s3.failed < 4 and proc.poll() is None:
            time.sleep(0.2)
        s3.gate.clear()  # ... and stalls for 10 s
        time.sleep(10)
        s3.gate.set()
        rc, out = _finish(proc, log)
    finally:
        s3.gate.set()
    assert rc == 0, out[-6000:]
    assert "tracking reachable again" in out and "were not delivered" not in out
    assert s3.failed >= 4  # the S3 faults were really hit
    runs = _runs(mlflow_server.uri)
    assert runs and all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    hllm = next(r for r in runs if r.data.tags.get("hllm.kind") == "train")
    steps = [m.step for m in _client(mlflow_server.uri).get_metric_history(hllm.info.run_id, "train/loss")]
    assert steps == sorted(steps) and steps == list(range(steps[0], steps[-1] + 1, 5)), steps  # none lost
    assert _versions(mlflow_server.uri) == [("1", ["champion"])]
    arts = {a.path for a in _client(mlflow_server.uri).list_artifacts(hllm.info.run_id, "model")}
    assert "model/MLmodel" in arts  # the registered model's files made it to S3


def test_tracking_server_down_for_good_fails_cleanly_and_the_next_run_recovers(tmp_path, bert, mlflow_server):
    project = _project(tmp_path, bert, mlflow_server.uri, **{"tracking.metrics_flush_s": 10.0})
    # MLflow's client retries an unreachable server for ~2 min by default; a short client retry keeps the test
    # inside its budget while the flow's own retries (flow.io_retries) still run
    fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}  # fmt: skip
    proc, log = _start(project, "night1", **fast)
    _wait_training(project, proc, log)
    time.sleep(3)
    mlflow_server.kill()
    rc, out = _finish(proc, log, timeout=400)
    assert rc != 0, out[-4000:]
    assert _outage_noticed(out)  # training noticed and went on
    assert "Connection refused" in out or "ConnectionError" in out or "Max retries exceeded" in out, out[-4000:]
    hllm_dirs = list((project / "runs").glob("nightly-*-hllm"))
    assert hllm_dirs and (hllm_dirs[0] / "result.json").exists()  # training itself finished

    mlflow_server.start()
    dead = {r.info.run_id for r in _runs(mlflow_server.uri) if r.info.status == "RUNNING"}
    assert dead  # the runs it could not close
    proc, log = _start(project, "night2")
    rc, out = _finish(proc, log)
    assert rc == 0, out[-6000:]
    runs = {r.info.run_id: r for r in _runs(mlflow_server.uri)}
    assert all(runs[d].info.status == "FAILED" and runs[d].data.tags.get("hllm.failure_reason") for d in dead)
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    assert _versions(mlflow_server.uri) == [("1", ["champion"])]
