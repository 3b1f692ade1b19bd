"""The nightly-retrain flow end to end under the Prefect test API, on tiny models and data.

Everything is real: Prefect's API (test harness), Great Expectations, DVC with a local remote,
MLflow on SQLite with its model registry, moto's S3 server over HTTP for S3 snapshots.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.flowkit import dvc_md5, make_project, registered_versions, store_client, upload

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

BAD = Path(__file__).resolve().parents[1] / "fixtures" / "bad"


@pytest.fixture
def project(tmp_path, bert, monkeypatch) -> Path:
    root = make_project(tmp_path / "proj", bert)
    monkeypatch.chdir(root)
    return root


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def summary_artifact(flow_run_id) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from flows.nightly import ARTIFACT_KEY

    with _client() as c:
        arts = c.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[ARTIFACT_KEY])
            )
        )
    assert len(arts) == 1, arts
    assert arts[0].type == "markdown"
    return arts[0].data


def task_runs(flow_run_id) -> dict:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r for r in runs}


def mlflow_runs(root: Path) -> list:

    client = store_client(root)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, max_results=1000)


def test_nightly_registers_a_champion_then_gates_a_challenger(project):
    """The default run, as `make run` does it: the embedded synthetic data, HLLM + both baselines."""
    from flows.nightly import nightly_retrain

    state = nightly_retrain(return_state=True)
    assert state.is_completed(), state.message
    res = state.result()
    fr_id = str(state.state_details.flow_run_id)

    # data: a new DVC version recorded in data.dvc and pushed to the remote
    md5 = dvc_md5(project)
    assert md5 and md5.endswith(".dir") and res["data"]["dvc_md5"] == md5
    assert (project / "dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]).is_file()
    assert res["data"]["pushed_to"] == "local"
    assert (project / "data" / "built" / "sequences.parquet").is_file()

    # one registered version, from the HLLM child run, and as the first one it is the champion
    versions = registered_versions(project)
    assert [str(v.version) for v in versions] == ["1"] and res["registered_version"] == "1"
    assert res["alias"] == "champion"
    runs = {r.info.run_id: r for r in mlflow_runs(project)}
    parent = runs[res["parent_run_id"]]
    assert parent.data.tags["prefect.flow_run_id"] == fr_id
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["hllm.data.dvc_md5"] == md5
    children = {
        r.data.tags["hllm.model_kind"]: r
        for r in runs.values()
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"hllm", "sasrec", "pop"}
    assert versions[0].run_id == children["hllm"].info.run_id
    assert all(c.info.status == "FINISHED" and "test/ndcg_at_10" in c.data.metrics for c in children.values())
    assert {m["kind"] for m in res["models"]} == {"hllm", "sasrec", "pop"}
    for m in res["models"]:
        assert m["metrics"]["ndcg@10"] == pytest.approx(runs[m["run_id"]].data.metrics["test/ndcg_at_10"])
    # the same artefacts `hllm evaluate --split both` / `hllm export` write
    hllm_run = res["run_name"] + "-hllm"
    assert (project / "reports" / "eval" / hllm_run / "valid" / "metrics.json").is_file()
    assert (project / "reports" / "eval" / hllm_run / "test" / "per_user.npz").is_file()
    assert (project / "exports" / hllm_run / "manifest.json").is_file()

    md = summary_artifact(fr_id)
    assert "registered hllm-recommender v1 -> alias 'champion'" in md
    for label in ("HLLM (this run)", "SASRec", "popularity"):
        assert f"| {label} |" in md
    assert md5 in md and f"/runs/{parent.info.run_id}" in md
    assert (project / "reports" / "nightly" / f"{res['run_name']}.md").read_text() == md

    # a second night on the same data: the candidate is gated against the champion and becomes
    # challenger (identical seeds and data; min_rel_gain=-1 keeps float noise from deciding)
    state2 = nightly_retrain(baselines=False, overrides=["registry.min_rel_gain=-1.0"], return_state=True)
    assert state2.is_completed(), state2.message
    res2 = state2.result()
    assert res2["registered_version"] == "2" and res2["alias"] == "challenger", res2["promotion"]
    assert "is the challenger" in res2["promotion"] and "paired bootstrap" in res2["promotion"]
    md2 = summary_artifact(str(state2.state_details.flow_run_id))
    assert "| champion v1 |" in md2 and "| SASRec |" not in md2
    assert dvc_md5(project) == md5  # same snapshot, same data version

    # a third night on a new data version (the same log, every timestamp a day later: a new DVC hash,
    # the same catalogue): the champion is re-evaluated on it, so the gate compares like with like
    import pyarrow.compute as pc

    from hllm.config import load_config
    from hllm.data.raw import write_raw
    from hllm.data.synth import generate

    tables = generate(load_config("params.yaml").synth)
    ts = tables.interactions.column("timestamp")
    i = tables.interactions.column_names.index("timestamp")
    tables.interactions = tables.interactions.set_column(i, "timestamp", pc.add(ts, 86_400))
    later = write_raw(tables, project.parent / "snapshot-later")
    state3 = nightly_retrain(
        snapshot=str(later), baselines=False, overrides=["registry.min_rel_gain=-1.0"], return_state=True
    )
    assert state3.is_completed(), state3.message
    res3 = state3.result()
    assert dvc_md5(project) != md5 and res3["data"]["data_version"] != res["data"]["data_version"]
    champ_row = next(m for m in res3["models"] if m["label"] == "champion v1")
    assert champ_row["note"].startswith("re-evaluated on today's data")
    assert "no evaluation comparable" not in res3["promotion"] and "v1" in res3["promotion"]
    v1_run = next(v for v in registered_versions(project) if str(v.version) == "1").run_id

    arts = store_client(project).list_artifacts(
        v1_run, f"eval/test/{res3['protocol_hash']}"
    )
    assert {Path(a.path).name for a in arts} == {res["data"]["data_version"], res3["data"]["data_version"]}

    # the registry flows, as a user of the Prefect UI runs them
    from flows.registry import promote, rollback

    client = store_client(project)
    challenger = client.get_model_version_by_alias("hllm-recommender", "challenger").version
    assert promote(to="champion")["action"] == "champion"  # the challenger wins its A/B test
    assert str(client.get_model_version_by_alias("hllm-recommender", "champion").version) == str(challenger)
    assert rollback(reason="test")["version"] == "1"
    assert str(client.get_model_version_by_alias("hllm-recommender", "champion").version) == "1"


def test_bad_snapshot_fails_at_validation_and_changes_nothing(project, raw_snapshot):
    from flows.nightly import nightly_retrain

    # a good raw dataset and its version are already there; the bad snapshot must not replace them
    from hllm.config import load_config
    from hllm.data.raw import fingerprint, read_raw, write_raw
    from hllm.data.versioning import add

    cfg = load_config("params.yaml")
    write_raw(read_raw(raw_snapshot), cfg.paths.raw_dir)
    add(cfg.paths.raw_dir)
    before = (fingerprint(cfg.paths.raw_dir), dvc_md5(project))

    state = nightly_retrain(snapshot=str(BAD / "negative_timestamp"), snapshot_format="hllm", return_state=True)
    assert state.is_failed()
    assert "validation FAILED" in state.message and "timestamp" in state.message
    fr_id = str(state.state_details.flow_run_id)
    tr = task_runs(fr_id)
    assert tr["validate"].state.is_failed()
    assert not {"publish-snapshot", "dvc-add", "build", "train", "register"} & set(tr)
    assert (fingerprint(cfg.paths.raw_dir), dvc_md5(project)) == before
    assert not (project / "runs").exists() and not (project / "data" / "built").exists()
    assert not [p for p in (project / "data").iterdir() if p.name.startswith((".raw-staging", ".snapshot"))]
    assert registered_versions(project) == []
    (parent,) = mlflow_runs(project)
    assert parent.info.status == "FAILED" and parent.data.tags["hllm.flow_status"] == "FAILED"
    md = summary_artifact(fr_id)
    assert "FAILED at stage 'validate'" in md and "timestamp" in md


def test_transient_s3_errors_are_retried(project, s3, raw_snapshot):
    from flows.nightly import nightly_retrain

    uri = upload(raw_snapshot, "snapshots", "nightly/2026-11-23")
    s3.fail = 2  # the next two S3 requests answer 503 SlowDown
    state = nightly_retrain(snapshot=uri, baselines=False, promote=False, return_state=True)
    assert state.is_completed(), state.message
    assert s3.failed == 2
    snap = task_runs(str(state.state_details.flow_run_id))["snapshot"]
    assert snap.state.is_completed() and snap.run_count == 3  # two failed attempts, then success
    res = state.result()
    assert res["snapshot"] == uri and res["registered_version"] == "1" and res["alias"] is None
    from hllm.data.raw import fingerprint

    assert fingerprint(project / "data" / "raw") == fingerprint(raw_snapshot)


def test_a_second_run_does_not_start_while_one_runs(project, s3, raw_snapshot):
    """Run A (a real nightly run) holds the concurrency slot while its S3 download hangs; run B,
    started meanwhile, gives up after flow.slot_timeout_s without touching anything."""
    from prefect.client.orchestration import get_client

    from flows.nightly import nightly_retrain

    uri = upload(raw_snapshot, "snapshots", "nightly/held")
    limit = "test-nightly-slot"
    states: dict = {}
    s3.gate.clear()  # A's first S3 request hangs until the gate opens
    a = threading.Thread(
        target=lambda: states.setdefault(
            "a",
            nightly_retrain(
                snapshot=uri,
                baselines=False,
                promote=False,
                overrides=[f"flow.concurrency_limit={limit}"],
                return_state=True,
            ),
        )
    )
    a.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            with get_client(sync_client=True) as c:
                try:
                    if c.read_global_concurrency_limit_by_name(limit).active_slots == 1:
                        break
                except Exception:  # noqa: BLE001 - not created yet
                    pass
            assert time.monotonic() < deadline, "run A never took the slot"
            time.sleep(0.2)
        b = nightly_retrain(overrides=[f"flow.concurrency_limit={limit}", "flow.slot_timeout_s=2"], return_state=True)
        assert b.is_failed() and "holds the 'test-nightly-slot' concurrency slot" in b.message
        assert not (project / "data" / "raw").exists() and not (project / "reports").exists()
        assert summary_artifact(str(b.state_details.flow_run_id)).count("wait-for-slot") >= 1
    finally:
        s3.gate.set()
        a.join(timeout=300)
    assert states["a"].is_completed(), states["a"].message
    with get_client(sync_client=True) as c:
        assert c.read_global_concurrency_limit_by_name(limit).active_slots == 0  # released at the end
    assert [str(v.version) for v in registered_versions(project)] == ["1"]  # only A registered
    assert os.path.isdir(project / "data" / "raw")


def test_a_run_whose_training_fails_registers_nothing(project):
    from flows.nightly import nightly_retrain

    state = nightly_retrain(overrides=["train.batch_size=0"], return_state=True)  # passes build, fails in train
    assert state.is_failed() and "train.batch_size must be >= 1" in state.message
    fr_id = str(state.state_details.flow_run_id)
    tr = task_runs(fr_id)
    assert tr["train"].state.is_failed() and tr["train"].run_count == 1  # training is never retried
    assert not {"evaluate", "export", "register", "promotion-gate"} & set(tr)
    assert registered_versions(project) == []
    runs = {r.data.tags.get("hllm.kind"): r for r in mlflow_runs(project)}
    assert runs["flow"].info.status == "FAILED" and runs["train"].info.status == "FAILED"
    assert not (project / "exports").exists()
    assert "FAILED at stage 'train-hllm'" in summary_artifact(fr_id)
