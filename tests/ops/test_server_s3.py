"""The registry end to end against a real `mlflow server` whose artifacts live on a real HTTP S3
endpoint (moto's server), both on 127.0.0.1: log, register, promote, refuse a worse model, roll back,
load by alias in a fresh process. The client holds no S3 credentials: artifacts go through the
server's proxy (``--artifacts-destination``), as in production."""

from __future__ import annotations

import os
import subprocess

import pytest
from typer.testing import CliRunner

from hllm.cli import app
from hllm.ops import registry, tracking
from tests.helpers.reghelpers import log_trained
from tests.helpers.servers import BIN, S3_ENV, free_port, stop, wait_healthy


@pytest.fixture
def server(tmp_path):
    procs = []
    try:
        s3_port, ml_port = free_port(), free_port()
        s3_log = tmp_path / "moto.log"
        moto = subprocess.Popen(
            [str(BIN / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
            stdout=s3_log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(moto)
        endpoint = f"http://127.0.0.1:{s3_port}"
        wait_healthy(f"{endpoint}/moto-api/", moto, s3_log, 60)
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket="mlflow-art")

        ml_log = tmp_path / "mlflow.log"
        # no job runner: it forks ~5 huey consumers (GenAI features) that only cost CPU and memory here
        env = {
            **os.environ,
            **S3_ENV,
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        ml = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{tmp_path / 'server.db'}",
                "--artifacts-destination",
                "s3://mlflow-art/mlruns",
                "--host",
                "127.0.0.1",
                "--port",
                str(ml_port),
                "--workers",
                "1",
            ],
            stdout=ml_log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        procs.append(ml)
        uri = f"http://127.0.0.1:{ml_port}"
        wait_healthy(f"{uri}/health", ml, ml_log, 120)
        yield {"uri": uri, "s3": s3}
    finally:
        for p in reversed(procs):
            stop(p)


@pytest.mark.slow
def test_registry_on_mlflow_server_with_s3_artifacts(cfg, tiny, server, monkeypatch):
    for k in (*S3_ENV, "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)  # the client never talks to S3 itself
    cfg.tracking.tracking_uri = server["uri"]
    ev = {k: tiny[k]["eval"].metrics["ndcg@10"] for k in ("hllm", "pop")}
    assert ev["hllm"] != ev["pop"], f"the two tiny models tie on ndcg@10 ({ev}); the test needs an order"
    better, worse = sorted(ev, key=ev.get, reverse=True)

    _, v1 = log_trained(cfg, tiny, better)
    assert registry.promote(cfg, v1, reason="first").action == "champion"
    _, v2 = log_trained(cfg, tiny, worse)

    sets = []
    for s in (
        f"tracking.tracking_uri={server['uri']}",
        f"tracking.experiment={cfg.tracking.experiment}",
        f"registry.model_name={cfg.registry.model_name}",
        f"registry.audit_experiment={cfg.registry.audit_experiment}",
    ):
        sets += ["--set", s]
    r = CliRunner().invoke(app, ["registry", "promote", v2, *sets])
    assert r.exit_code == 1 and "refused" in r.output and "worse" in r.output, r.output

    _, v3 = log_trained(cfg, tiny, better)  # a retrain that came out the same: "at least as good"
    assert registry.promote(cfg, v3).action == "challenger"
    assert registry.promote(cfg, None, to="champion").version == v3
    r = CliRunner().invoke(app, ["registry", "rollback", "--reason", "canary errors", *sets])
    assert r.exit_code == 0 and f"from v{v3} to v{v1}" in r.output, r.output

    c = tracking.client(cfg)
    name = cfg.registry.model_name
    assert {k: str(v) for k, v in c.get_registered_model(name).aliases.items()} == {"champion": v1}
    assert [e["action"] for e in registry.audit_log(cfg)] == ["promote", "refused", "promote", "promote", "rollback"]
    r = CliRunner().invoke(app, ["registry", "list", *sets])
    assert r.exit_code == 0 and "champion" in r.output

    # the artifacts are on S3, not on the server's disk
    keys = [o["Key"] for o in server["s3"].list_objects_v2(Bucket="mlflow-art").get("Contents", [])]
    assert any(k.endswith("artifacts/checkpoint/model.safetensors") for k in keys)
    assert any("/audit/" in k for k in keys) and any(k.endswith("per_user.npz") for k in keys)

    # load by alias in a fresh process: the champion's recommendations
    from hllm.serving.recommend import Recommender
    from tests.serving.test_pyfunc import predict_in_fresh_process

    exp = tiny[better]["export"]
    rec = Recommender.from_export(exp)
    user = str(rec.user_ids[3])
    got = predict_in_fresh_process(
        f"models:/{name}@champion", 5, [{"user_id": user, "history": None}], env={"MLFLOW_TRACKING_URI": server["uri"]}
    )
    want = rec.for_user(user, 5)
    assert got[0]["item_ids"] == [x.item_id for x in want] and len(want) == 5
    assert got[0]["scores"] == pytest.approx([x.score for x in want], abs=1e-6)
