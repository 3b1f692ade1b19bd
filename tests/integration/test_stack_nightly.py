"""`nightly-retrain` on the tiny fixture, deployed to the local production stack and run by its worker.

A throw-away project (git + DVC with the repository's committed `.dvc/config`, a tiny params.yaml with
no tracking URI and no `flow.dvc_remote`, so the stack's MLFLOW_TRACKING_URI and HLLM_DVC_REMOTE_URL
decide where runs and data versions go: configuration only, as on a team's clone) is deployed with `flow.from_source(...).deploy()` to the
process pool; the worker runs it. Then everything the run left must be on the shared services: the
run and the registered version in PostgreSQL-backed MLflow, the model's files in the bucket, the
dataset version in the S3 DVC remote (and back with `dvc pull` in a fresh clone), the flow run
completed through the worker.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _tree_md5(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def project(stack, tmp_path) -> Path:
    """A clone-like project: git + DVC with the repo's committed .dvc/config (default remote `local`,
    remote `s3`); nothing in params.yaml or the DVC config points at the stack."""
    from hllm.testing import tiny_bert
    from tests.helpers.flowkit import tiny_params  # the flow tests' tiny run (tiny BERT/Llama, 3 steps)

    root = tmp_path / "project"
    root.mkdir()
    bert = tiny_bert(root / "models" / "bert")
    params = tiny_params(root, bert)
    params["tracking"] = {"tracking_uri": ""}  # "" = $MLFLOW_TRACKING_URI: the stack's server
    assert not params["flow"].get("dvc_remote")  # "" = $HLLM_DVC_REMOTE_URL: the stack's bucket
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # The flow code as a worker's checkout would have it (flows/ is not an installed package).
    (root / "flows").symlink_to(REPO / "flows")
    (root / ".gitignore").write_text("/models/\n/flows\n/runs/\n/reports/\n/exports/\n/data/built/\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        stack.run(*cmd, cwd=root)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    return root


def test_nightly_retrain_runs_through_the_worker_against_the_stack(stack_env, project, tmp_path):
    stack = stack_env  # the MLflow client below reads the credentials from the environment
    env = stack.env
    script = textwrap.dedent(
        f"""
        import json
        from prefect import flow
        from prefect.deployments import run_deployment

        flow.from_source(source={str(project)!r}, entrypoint="flows/nightly.py:nightly_retrain").deploy(
            name="it-nightly", work_pool_name={env["HLLM_WORK_POOL"]!r}, print_next_steps=False,
            ignore_warnings=True, parameters={{"params": "params.yaml", "baselines": False}},
        )
        run = run_deployment("nightly-retrain/it-nightly", timeout=900)
        print("RESULT" + json.dumps({{"state": run.state.type.value, "message": run.state.message,
                                     "pool": run.work_pool_name, "id": str(run.id)}}))
        """
    )
    proc = stack.run(sys.executable, "-c", script, cwd=project, timeout=960)
    result = json.loads(next(line[6:] for line in proc.stdout.splitlines() if line.startswith("RESULT")))
    worker_log = (stack.state / "logs" / "prefect-worker.log").read_text()
    assert result["state"] == "COMPLETED", f"{result}\n{worker_log[-6000:]}"
    assert result["pool"] == env["HLLM_WORK_POOL"]
    # the worker picked it up (its "Submitting flow run" line comes first: the whole log, not its tail)
    assert f"'{result['id']}'" in worker_log or result["id"] in worker_log, worker_log[-6000:]

    # ---- MLflow: parent run tagged with the flow run, a registered version, files in the bucket
    import psycopg2
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    [summary] = (project / "reports" / "nightly").glob("*.json")
    res = json.loads(summary.read_text())
    assert res["status"] == "COMPLETED" and res["registered_version"] == "1" and res["alias"] == "champion"
    parent = client.get_run(res["parent_run_id"])
    assert parent.data.tags["prefect.flow_run_id"] == result["id"]
    mv = client.get_model_version("hllm-recommender", "1")
    assert mv.run_id == res["run_ids"]["HLLM"]
    with psycopg2.connect(f"{env['HLLM_STACK_PG_URL']}/mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT run_id FROM model_versions WHERE name = 'hllm-recommender' AND version = 1")
        assert cur.fetchall() == [(mv.run_id,)]
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (parent.info.run_id,))
        assert cur.fetchall() == [("FINISHED",)]

    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    bucket, _, prefix = env["HLLM_MLFLOW_ARTIFACTS"].removeprefix("s3://").partition("/")
    # The registered model (source runs:/<run>/<path>) went through the server's proxy into the bucket.
    run_id, _, model_path = mv.source.removeprefix("runs:/").partition("/")
    assert run_id == mv.run_id and model_path, mv.source
    exp_id = client.get_run(run_id).info.experiment_id
    key = f"{prefix}/{exp_id}/{run_id}/artifacts/{model_path}/MLmodel"
    assert "python_function" in s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()

    # ---- DVC: the dataset version is in the S3 remote and comes back in a fresh clone
    md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert res["data"]["dvc_md5"] == md5 and res["data"]["pushed_to"] == "s3"
    dvc_bucket, _, dvc_prefix = env["HLLM_DVC_REMOTE_URL"].removeprefix("s3://").partition("/")
    s3.head_object(Bucket=dvc_bucket, Key=f"{dvc_prefix}/files/md5/{md5[:2]}/{md5[2:]}")
    stack.run("git", "add", "-A", cwd=project)
    stack.run(
        "git", "-c", "user.name=it", "-c", "user.email=it@example.com", "commit", "-q", "-m", "night 1", cwd=project
    )
    clone = tmp_path / "clone"
    stack.run("git", "clone", "-q", str(project), str(clone))
    assert not (clone / "data" / "raw").exists()
    stack.run("dvc", "pull", "--remote", "s3", cwd=clone)  # the committed default is the local remote
    assert _tree_md5(clone / "data" / "raw") == _tree_md5(project / "data" / "raw")
