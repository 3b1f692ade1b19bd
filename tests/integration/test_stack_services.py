"""Each service of the local production stack, used the way the project uses it.

MLflow on PostgreSQL with artifacts in S3 behind basic auth, a DVC remote on the same S3, and a
Prefect deployment run by the process worker. Real processes throughout (infra/local-stack.sh).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated"),  # mlflow.server import
]

HERE = Path(__file__).resolve().parent


def _http(url: str, body: dict | None = None, auth: tuple[str, str] | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _s3(env: dict[str, str]):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix


def test_status_reports_every_service_up(stack):
    proc = subprocess.run(
        ["bash", str(HERE.parents[1] / "infra" / "local-stack.sh"), "status"],
        env={**stack.environ(), "HLLM_STACK_DIR": str(stack.state)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines() if line.strip()}
    assert lines == {s: "up" for s in ("postgres", "s3", "mlflow", "prefect-server", "prefect-worker")}


def test_mlflow_run_and_model_version_land_in_postgres_and_bucket(stack_env):
    import psycopg2
    from mlflow import MlflowClient

    env = stack_env.env
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])  # credentials from MLFLOW_TRACKING_*
    tag = uuid.uuid4().hex[:8]
    exp_id = client.create_experiment(f"it-{tag}")
    run_id = client.create_run(exp_id).info.run_id
    client.log_param(run_id, "lr", "0.0001")
    client.log_metric(run_id, "valid/ndcg_at_10", 0.25, step=1)
    client.log_text(run_id, f"hello stack {tag}", "notes/hello.txt")
    client.set_terminated(run_id)
    name = f"it-model-{tag}"
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=f"{client.get_run(run_id).info.artifact_uri}/notes", run_id=run_id)
    client.set_registered_model_alias(name, "champion", mv.version)

    # The artifact went through the server's proxy into the stack's bucket.
    bucket, prefix = _split_s3(env["HLLM_MLFLOW_ARTIFACTS"])
    key = f"{prefix}/{exp_id}/{run_id}/artifacts/notes/hello.txt"
    body = _s3(env).get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body.decode() == f"hello stack {tag}"

    # The run, its param and the alias are rows in PostgreSQL (not a local SQLite file).
    with psycopg2.connect(f"{env['HLLM_STACK_PG_URL']}/mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        assert cur.fetchall() == [("FINISHED",)]
        cur.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'lr'", (run_id,))
        assert cur.fetchall() == [("0.0001",)]
        cur.execute("SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'champion'", (name,))
        assert cur.fetchall() == [(int(mv.version),)]
    assert client.get_model_version_by_alias(name, "champion").run_id == run_id


def test_mlflow_refuses_requests_without_valid_credentials(stack_env):
    env = stack_env.env
    search = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search"
    admin = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    assert _http(search, {"max_results": 1}) == 401
    assert _http(search, {"max_results": 1}, auth=(admin[0], admin[1] + "x")) == 401
    assert _http(search, {"max_results": 1}, auth=admin) == 200


def test_mlflow_new_users_read_but_cannot_write_others_experiments(stack_env):
    from mlflow import MlflowClient
    from mlflow.server import get_app_client

    env = stack_env.env
    uri = env["MLFLOW_TRACKING_URI"]
    exp_id = MlflowClient(tracking_uri=uri).create_experiment(f"it-owned-{uuid.uuid4().hex[:8]}")
    user, password = f"analyst{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    get_app_client("basic-auth", tracking_uri=uri).create_user(username=user, password=password)

    base = f"{uri}/api/2.0/mlflow"
    assert _http(f"{base}/experiments/search", {"max_results": 5}, auth=(user, password)) == 200
    assert _http(f"{base}/runs/create", {"experiment_id": exp_id}, auth=(user, password)) == 403


def test_dvc_remote_on_stack_s3_round_trips_in_a_fresh_clone(stack, tmp_path):
    origin, clone = tmp_path / "origin", tmp_path / "clone"
    origin.mkdir()
    (origin / "data").mkdir()
    payload = f"user_id,item_id\n{uuid.uuid4().hex},42\n"
    (origin / "data" / "raw.csv").write_text(payload)
    git_id = {
        "GIT_AUTHOR_NAME": "it",
        "GIT_AUTHOR_EMAIL": "it@example.com",
        "GIT_COMMITTER_NAME": "it",
        "GIT_COMMITTER_EMAIL": "it@example.com",
    }
    remote = stack.env["HLLM_DVC_REMOTE_URL"]
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "add", "-q", "data/raw.csv"],
        # As infra/README.md says: the URL is committed, the endpoint and keys come from the environment.
        ["dvc", "remote", "add", "-d", "stack", remote],
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "data"],
        ["dvc", "push"],
    ):
        stack.run(*cmd, cwd=origin, **git_id)

    bucket, prefix = _split_s3(remote)
    keys = [o["Key"] for o in _s3(stack.env).list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    md5 = next(
        line.split(":")[1].strip()
        for line in (origin / "data" / "raw.csv.dvc").read_text().splitlines()
        if "md5:" in line
    )
    assert f"{prefix}/files/md5/{md5[:2]}/{md5[2:]}" in keys

    stack.run("git", "clone", "-q", str(origin), str(clone))
    assert not (clone / "data" / "raw.csv").exists()
    stack.run("dvc", "pull", cwd=clone)
    assert (clone / "data" / "raw.csv").read_text() == payload


def test_prefect_deployment_runs_to_completed_through_the_process_worker(stack, tmp_path):
    out = tmp_path / "hello.json"
    script = textwrap.dedent(
        f"""
        import json
        from prefect import flow
        from prefect.deployments import run_deployment

        flow.from_source(source={str(HERE / "stack_flows")!r}, entrypoint="hello.py:hello").deploy(
            name="it-hello", work_pool_name={stack.env["HLLM_WORK_POOL"]!r}, print_next_steps=False,
            ignore_warnings=True,
        )
        run = run_deployment("stack-hello/it-hello", parameters={{"out": {str(out)!r}, "n": 4}}, timeout=240)
        print("RESULT" + json.dumps({{"state": run.state.type.value, "pool": run.work_pool_name,
                                     "deployment": str(run.deployment_id)}}))
        """
    )
    proc = stack.run(sys.executable, "-c", script, timeout=300)
    result = json.loads(next(line[6:] for line in proc.stdout.splitlines() if line.startswith("RESULT")))
    assert result["state"] == "COMPLETED", proc.stdout + proc.stderr
    assert result["pool"] == stack.env["HLLM_WORK_POOL"]

    ran = json.loads(out.read_text())
    assert ran["total"] == 0 + 1 + 4 + 9
    # The flow ran in a child of the stack's worker, not in the test's process.
    worker_pid = int((stack.state / "run" / "prefect-worker.pid").read_text())
    assert ran["ppid"] == worker_pid


def test_kubernetes_work_pool_template_is_accepted_and_enforced_by_the_server(stack):
    template = HERE.parents[1] / "infra" / "k8s" / "prefect-base-job-template.json"
    pool = f"hllm-k8s-{uuid.uuid4().hex[:6]}"
    # The CLI the README and the k8s worker use; the server validates the template's placeholders.
    stack.run(
        "prefect",
        "--no-prompt",
        "work-pool",
        "create",
        pool,
        "--type",
        "kubernetes",
        "--base-job-template",
        str(template),
    )
    script = textwrap.dedent(
        f"""
        import asyncio, json
        from prefect.client.orchestration import get_client

        async def main():
            out = {{}}
            async with get_client() as client:
                wp = await client.read_work_pool({pool!r})
                out["template"] = wp.base_job_template
                flow_id = await client.create_flow_from_name("k8s-template-check")
                for name, variables in [("ok", {{"image": "reg/hllm:cpu", "memory_limit": "32Gi"}}),
                                        ("bad", {{"image_pull_policy": "Sometimes"}})]:
                    try:
                        await client.create_deployment(flow_id=flow_id, name=name, work_pool_name={pool!r},
                                                       entrypoint="flows/nightly.py:x", job_variables=variables)
                        out[name] = "created"
                    except Exception as e:
                        out[name] = getattr(getattr(e, "response", None), "status_code", repr(e))
            print("RESULT" + json.dumps(out))

        asyncio.run(main())
        """
    )
    proc = stack.run(sys.executable, "-c", script, timeout=120)
    result = json.loads(next(line[6:] for line in proc.stdout.splitlines() if line.startswith("RESULT")))
    assert result["template"] == json.loads(template.read_text())
    assert result["ok"] == "created"
    assert result["bad"] == 422, result["bad"]
