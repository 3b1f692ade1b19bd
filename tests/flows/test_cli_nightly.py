"""`hllm flows run nightly` to completion through the CLI (Prefect's test API, tiny models and data,
MLflow on SQLite, DVC with a local remote): what it prints, and what the registered run holds."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers.flowkit import dvc_md5, make_project

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def test_hllm_flows_run_nightly_prints_the_summary_and_the_hllm_run_holds_its_evidence(
    tmp_path, bert, monkeypatch, keep_root_logging
):
    import mlflow
    from typer.testing import CliRunner

    from hllm.cli import app

    # validation every epoch (the curve under test) and one baseline (the comparison bars need two models)
    root = make_project(tmp_path / "proj", bert, **{"train.eval_every_epoch": True, "flow.baselines": ["pop"]})
    monkeypatch.chdir(root)
    res = CliRunner().invoke(app, ["flows", "run", "nightly"])
    assert res.exit_code == 0, res.output
    [summary] = (root / "reports" / "nightly").glob("*.json")
    rep = json.loads(summary.read_text())
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(rep["parent_run_id"])
    hllm_id, pop_id = rep["run_ids"]["HLLM"], rep["run_ids"]["popularity"]

    # ---- the printed summary, line by line
    lines = res.output.splitlines()
    start = lines.index(
        f"nightly-retrain {rep['run_name']}: COMPLETED: registered hllm-recommender v1 -> alias 'champion'"
    )
    out = lines[start:]
    md5 = dvc_md5(root)
    assert out[1] == (f"  data version {parent.data.tags['hllm.data_version']} (data.dvc md5 {md5}, pushed to local)")
    assert out[3] == f"test metrics (%, full ranking, protocol {rep['protocol_hash']}):"
    assert out[4].split() == ["model", "recall@5", "recall@10", "ndcg@5", "ndcg@10"]
    for line, (label, run_id) in zip(out[5:7], (("HLLM (this run)", hllm_id), ("popularity", pop_id))):
        assert line.strip().startswith(label)
        m = client.get_run(run_id).data.metrics
        assert line.split()[-4:] == [
            f"{100 * m[f'test/{n}']:.2f}" for n in ("recall_at_5", "recall_at_10", "ndcg_at_5", "ndcg_at_10")
        ]
    # the slices table: recall@10 per slice and model, the new-item slice first
    assert out[7] == "by slice (recall@10 %, users; new items never occurred in training):"
    assert out[8].split()[:5] == ["R@10", "by", "slice", "new", "items"]
    for line, label in zip(out[9:11], ("HLLM (this run)", "popularity")):
        assert line.strip().startswith(label)
    out = out[4:]  # the rest as before the slices were added
    assert out[7].startswith("promotion: ") and "champion" in out[7]
    assert out[8] == f"MLflow store: {uri}"
    assert (
        out[9]
        == f"MLflow run:   http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning"
    )
    assert out[10].startswith(f"MLflow UI:    mlflow ui --backend-store-uri {uri} ")
    assert re.fullmatch(r"elapsed: \d+ min \d+ s", out[11]), out[11:]
    assert str(client.get_model_version("hllm-recommender", "1").run_id) == hllm_id

    # ---- the registered (HLLM) run holds the GX report and the comparison bars, as the parent does
    def names(run_id: str, path: str) -> set[str]:
        return {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, path)}

    assert names(hllm_id, "data/validation") == names(parent.info.run_id, "data/validation") != set()
    assert "test_metrics.png" in names(hllm_id, "plots") and "test_metrics.png" in names(parent.info.run_id, "plots")

    # ---- valid/* is the per-epoch curve training logged, with no extra step-0 point from the evaluation;
    # test/* (logged once, by the evaluation) is there; popularity's one validation is one point
    steps = [m.step for m in client.get_metric_history(hllm_id, "valid/ndcg_at_10")]
    assert steps and 0 not in steps and steps == sorted(set(steps)), steps
    assert [m.step for m in client.get_metric_history(hllm_id, "test/ndcg_at_10")] == [0]
    assert len(client.get_metric_history(pop_id, "valid/ndcg_at_10")) == 1
