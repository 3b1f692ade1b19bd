"""The nightly flow with the temporal split set in params.yaml: build, train, evaluate, MLflow and the
summary all run under it (tiny models and data, the Prefect test API)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.flowkit import make_project, store_client

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def test_nightly_under_the_temporal_split(tmp_path, bert, monkeypatch):
    from flows.nightly import nightly_retrain
    from hllm.config import load_config, protocol_hash

    root = make_project(tmp_path / "proj", bert, **{
        "synth.n_users": 300, "build.k_core_user": 0, "build.k_core_item": 0, "eval.protocol.split": "temporal",
        "eval.protocol.valid_cutoff": 0.5, "eval.protocol.test_cutoff": 0.7})  # fmt: skip
    monkeypatch.chdir(root)
    cfg = load_config(root / "params.yaml")
    state = nightly_retrain(return_state=True)
    assert state.is_completed(), state.message
    res = state.result()
    stats = json.loads((root / "data" / "built" / "stats.json").read_text())
    assert stats["split"]["split"] == "temporal"  # the build cut at the cutoffs of params.yaml
    saved = json.loads((root / "reports" / "eval" / f"{res['run_name']}-hllm" / "test" / "metrics.json").read_text())
    assert saved["protocol"]["split"] == "temporal" and saved["protocol_hash"] == protocol_hash(cfg.eval.protocol)
    assert saved["split_info"]["test_cutoff_time"] == stats["split"]["test_cutoff_time"]
    assert saved["n_users"] == stats["split"]["test_users"]
    client = store_client(root)
    for m in res["models"]:
        run = client.get_run(m["run_id"])
        assert run.data.tags["hllm.protocol_hash"] == saved["protocol_hash"]
        assert run.data.metrics["test/slice/new_items/n"] == saved["slices"]["new_items"]["n"]
    md = (root / "reports" / "nightly" / f"{res['run_name']}.md").read_text()
    assert f"protocol `{saved['protocol_hash']}`" in md and "new items" in md
