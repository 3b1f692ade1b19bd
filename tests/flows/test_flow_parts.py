"""The pieces of the nightly flow that need no Prefect API: snapshot staging, the run report, the CLI's
argument handling."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.report import ModelRow, RunReport
from hllm.config import load_config
from hllm.data.errors import DataError

BAD = Path(__file__).resolve().parents[1] / "fixtures" / "bad"


def _cfg(tmp: Path, *sets: str):
    return load_config(
        None,
        [
            f"paths.raw_dir={tmp / 'data' / 'raw'}",
            "synth.n_items=60",
            "synth.n_users=30",
            "synth.min_seq_len=6",
            "synth.max_seq_len=8",
            *sets,
        ],
    )


def test_default_snapshot_is_exactly_what_hllm_data_synth_writes(tmp_path):
    """The embedded default: the same bytes as `hllm data synth` (so the same DVC version)."""
    from hllm.data import snapshot
    from hllm.data.raw import fingerprint
    from hllm.data.synth import synthesize

    cfg = _cfg(tmp_path)
    staged = snapshot.stage(cfg, None)
    assert staged.parent == tmp_path / "data" and staged.name.startswith(".raw-staging")
    assert not (tmp_path / "data" / "raw").exists()  # staging touches nothing else
    ref = synthesize(cfg, tmp_path / "ref")
    assert fingerprint(staged) == fingerprint(ref) and len(fingerprint(ref)) == 2


def test_publish_swaps_the_staged_snapshot_in_and_keeps_nothing_half_written(tmp_path):
    from hllm.data import snapshot
    from hllm.data.raw import fingerprint

    cfg = _cfg(tmp_path)
    first = snapshot.stage(cfg, None)
    fp = fingerprint(first)
    snapshot.publish(cfg, first)
    assert fingerprint(tmp_path / "data" / "raw") == fp
    second = snapshot.stage(_cfg(tmp_path, "synth.seed=99"), None)
    snapshot.discard(second)  # e.g. it failed validation
    assert fingerprint(tmp_path / "data" / "raw") == fp
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]


def test_snapshot_errors_name_the_source(tmp_path):
    from hllm.data import snapshot

    cfg = _cfg(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        snapshot.stage(cfg, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"no interactions\.parquet.*hllm, amazon, movielens, recbole"):
        snapshot.stage(cfg, str(BAD / "negative_timestamp"))  # CSVs given as raw parquet
    staged = snapshot.stage(cfg, str(BAD / "negative_timestamp"), "hllm")  # parsed; validation judges it
    assert (staged / "interactions.parquet").is_file()
    assert snapshot.split_s3("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert snapshot.split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(DataError, match="s3://bucket/prefix"):
        snapshot.split_s3("s3:///x")
    assert not (tmp_path / "data" / "raw").exists()


def test_report_renders_success_and_failure():
    ok = RunReport(
        run_name="nightly-x",
        status="COMPLETED",
        model_name="hllm-recommender",
        registered_version="3",
        alias="challenger",
        promotion="version 3 is the challenger",
        protocol_hash="abc",
        ks=[5, 10],
        tracking_uri="http://mlflow:5000",
        experiment_id="1",
        parent_run_id="p1",
        data={"data_version": "dv1", "dvc_md5": "m.dir", "stats": {"users": 9, "items": 8}},
        models=[
            ModelRow("HLLM (this run)", "hllm", {"recall@5": 0.5, "ndcg@10": 0.25}, "r1"),
            ModelRow("champion v2", "hllm", {"recall@5": 0.4}, "r0", note="not comparable"),
        ],
    )
    md = ok.markdown()
    assert "**COMPLETED: registered hllm-recommender v3 -> alias 'challenger'**" in md
    assert "| HLLM (this run) | 50.00 | - | - | 25.00 |  |" in md
    assert "| champion v2 | 40.00 | - | - | - | not comparable |" in md
    assert "[p1](http://mlflow:5000/#/experiments/1/runs/p1?workflowType=machine_learning)" in md
    text = ok.console()
    assert "open http://mlflow:5000" in text and "data version dv1" in text
    assert RunReport.from_dict(ok.to_dict()).markdown() == md

    bad = RunReport(
        run_name="nightly-y",
        status="FAILED",
        failed_stage="validate",
        error="ValidationFailed: boom",
        validation="validation FAILED: items 3/4",
        tracking_uri="sqlite:////tmp/m/mlflow.db",
    )
    md = bad.markdown()
    assert "FAILED at stage 'validate': ValidationFailed: boom" in md and "validation FAILED: items 3/4" in md
    assert "_no model was evaluated_" in md
    assert (
        "mlflow ui --backend-store-uri sqlite:////tmp/m/mlflow.db --default-artifact-root /tmp/m/artifacts"
        in bad.console()
    )


def test_report_shows_the_cold_start_slices():
    slices = {"new_items": {"n": 40.0, "recall@10": 0.3}, "head_items": {"n": 100.0, "recall@10": 0.25},
              "tail_items": {"n": 60.0}}  # fmt: skip
    rep = RunReport(
        run_name="nightly-x",
        ks=[10],
        models=[
            ModelRow("HLLM (this run)", "hllm", {"recall@10": 0.2}, "r1", slices=slices),
            ModelRow("SASRec", "sasrec", {"recall@10": 0.1}, "r2", slices={"new_items": {"n": 40.0, "recall@10": 0.0}}),
            ModelRow("champion v2", "hllm", {"recall@10": 0.2}, "r0"),  # no slices: no row
        ],
    )
    rows = rep.slices_rows()
    assert rows[0][:4] == ["R@10 by slice", "new items", "tail items", "head items"]
    assert rows[1][:4] == ["HLLM (this run)", "30.00 (40)", "- (60)", "25.00 (100)"]
    assert rows[2][:2] == ["SASRec", "0.00 (40)"] and len(rows) == 3
    assert "| HLLM (this run) | 30.00 (40) | - (60) | 25.00 (100) |" in rep.markdown()
    assert "new items never occurred in training" in rep.console()
    assert RunReport.from_dict(rep.to_dict()).models[0].slices == slices  # survives the JSON summary


def test_cli_rejects_a_bad_config_before_starting_prefect(tmp_path, monkeypatch, keep_root_logging):
    from hllm.cli import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["flows", "run", "nightly", "--set", "flow.nope=1"])
    assert res.exit_code == 2 and "unknown key(s) ['nope']" in res.output
    res = CliRunner().invoke(app, ["flows", "--help"])
    assert res.exit_code == 0 and "serve" in res.output and "run" in res.output


def test_old_nightly_run_folders_are_pruned_others_kept(tmp_path):
    from flows.retention import prune_nightly_runs

    runs, exports = tmp_path / "runs", tmp_path / "exports"
    stamps = ["20261120-020000-aaaa1111", "20261121-020000-bbbb2222", "20261122-020000-cccc3333"]
    for st in stamps:
        for kind in ("hllm", "sasrec"):
            (runs / f"nightly-{st}-{kind}").mkdir(parents=True)
        (exports / f"nightly-{st}-hllm").mkdir(parents=True)
    (runs / "default").mkdir()  # `hllm train` by hand: never touched
    (runs / "nightly-notes").mkdir()
    removed = prune_nightly_runs([runs, exports, tmp_path / "missing"], keep=2)
    assert sorted(p.name for p in removed) == [f"nightly-{stamps[0]}-{k}" for k in ("hllm", "hllm", "sasrec")]
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        ["default", "nightly-notes"] + [f"nightly-{st}-{k}" for st in stamps[1:] for k in ("hllm", "sasrec")]
    )
    assert prune_nightly_runs([runs], keep=0) == []
