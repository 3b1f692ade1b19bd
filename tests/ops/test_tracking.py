"""Run lifecycle, lineage, metric logging and plots on a real SQLite MLflow store."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from hllm import lineage
from hllm.config import load_config, protocol_hash
from hllm.data import versioning
from hllm.evaluation.results import EvalResult
from hllm.ops import tracking
from tests.helpers.reghelpers import SEQS, write_built

PNG = b"\x89PNG\r\n\x1a\n"


def _download(client, run_id, path, dst):
    import mlflow

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst))


def test_parent_and_sibling_runs_carry_config_lineage_and_system_info(cfg, store, tmp_path):
    with tracking.start_parent_run(cfg, "nightly-2026-11-23", flow_run_id="flow-run-42") as parent:
        with tracking.start_run(cfg, "hllm", parent_run_id=parent.run_id) as hllm_run:
            pass
        with tracking.start_run(cfg, "sasrec", parent_run_id=parent.run_id, kind="baseline") as base:
            pass
    c = tracking.client(cfg)
    p, h, b = (c.get_run(r.run_id) for r in (parent, hllm_run, base))
    assert p.data.tags[tracking.TAG_FLOW_RUN] == "flow-run-42" and p.data.tags[tracking.TAG_KIND] == "flow"
    assert h.data.tags[tracking.TAG_PARENT] == parent.run_id == b.data.tags[tracking.TAG_PARENT]
    assert b.data.tags[tracking.TAG_KIND] == "baseline"
    assert all(r.info.status == "FINISHED" for r in (p, h, b))

    # config: flattened params + the YAML file
    params = h.data.params
    assert params["train.lr"] == str(cfg.train.lr) and params["model.user.config.hidden_size"] == "384"
    assert params["eval.protocol.ks"] == "[5, 10, 50, 200]"
    local = _download(c, hllm_run.run_id, "config/params.yaml", tmp_path)
    assert load_config(local).to_dict() == cfg.to_dict()  # the logged file reproduces the config
    assert h.data.tags[tracking.TAG_PROTOCOL] == protocol_hash(cfg.eval.protocol)

    # dataset version: the md5 from data.dvc and the content hash of the built sequences
    t = h.data.tags
    assert t[tracking.TAG_DVC_MD5] == "0123456789abcdef0123456789abcdef.dir"
    assert t[tracking.TAG_SEQ_MD5] == versioning.sequences_md5(store / "data" / "built")
    assert t[tracking.TAG_DATA_VERSION] == versioning.data_version(cfg).version
    (inp,) = h.inputs.dataset_inputs
    assert inp.dataset.digest == t[tracking.TAG_SEQ_MD5][:20]
    assert json.loads(inp.dataset.profile) == {"num_rows": 4, "num_interactions": 16}
    assert "items" in inp.dataset.schema and json.loads(inp.dataset.source)["uri"].endswith("sequences.parquet")
    assert {x.key: x.value for x in inp.tags}["mlflow.data.context"] == "training"

    # system info
    import torch

    assert t["sys.torch"] == torch.__version__ and t["sys.device"] == "cpu" and t["sys.world_size"] == "1"


def test_git_commit_is_tagged(cfg, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    for k in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(k, "tester")
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(cmd, cwd=repo, check=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert lineage.code_version(repo) == lineage.CodeVersion(sha, False)
    with tracking.start_run(cfg, "hllm", root=repo, log_data=False) as tr:
        pass
    assert tracking.client(cfg).get_run(tr.run_id).data.tags[tracking.TAG_GIT_COMMIT] == sha
    assert lineage.code_version(tmp_path / "nowhere") == lineage.CodeVersion(None)
    # one definition of "dirty": a changed tracked file (staged or not) counts, an untracked one does not
    (repo / "untracked.txt").write_text("x")
    assert not lineage.code_version(repo).dirty
    subprocess.run(["git", "add", "untracked.txt"], cwd=repo, check=True)
    assert lineage.code_version(repo) == lineage.CodeVersion(sha, True)
    assert lineage.code_version(repo).label == sha + "-dirty"


def test_log_metrics_per_step_and_names(cfg):
    with tracking.start_run(cfg, "hllm", log_data=False) as tr:
        for step in range(3):
            tr.log_metrics(
                {"loss": 3.0 - step, "scale": 14.3, "lr": 1e-4 * step, "throughput": 100.0}, step, prefix="train/"
            )
        tr.log_metrics({"ndcg@10": 0.25, "bad": float("nan"), "text": "x"}, step=1, prefix="valid/")
    c = tracking.client(cfg)
    hist = c.get_metric_history(tr.run_id, "train/loss")
    assert [(m.step, m.value) for m in hist] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    m = c.get_run(tr.run_id).data.metrics
    assert m["valid/ndcg_at_10"] == 0.25 and "valid/bad" not in m and "valid/text" not in m
    assert tracking.metric_key("recall@200", "test") == "test/recall_at_200"


def test_failed_body_marks_run_failed(cfg):
    with pytest.raises(RuntimeError):
        with tracking.start_run(cfg, "boom", log_data=False) as tr:
            raise RuntimeError("training diverged")
    assert tracking.client(cfg).get_run(tr.run_id).info.status == "FAILED"


def test_only_rank0_logs_and_attach_by_env(cfg, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with tracking.start_run(cfg, "rank1", log_data=False) as tr:
        tr.log_metrics({"loss": 1.0}, 0)
    assert tr.run_id is None
    assert tracking.find_runs(cfg, "attributes.run_name = 'rank1'") == []
    assert not tracking.attach("someid").active

    monkeypatch.setenv("RANK", "0")
    with tracking.start_run(cfg, "opened-by-flow", log_data=False) as tr:
        pass
    monkeypatch.setenv("MLFLOW_RUN_ID", tr.run_id)
    worker = tracking.attach(cfg=cfg)  # what a torchrun worker does
    worker.log_metrics({"loss": 0.5}, step=7, prefix="train/")
    assert [(m.step, m.value) for m in tracking.client(cfg).get_metric_history(tr.run_id, "train/loss")] == [(7, 0.5)]


def test_evaluation_plots_and_validation_report(cfg, tmp_path):
    users = np.arange(5, dtype=np.int32)
    runs = {}
    for name, ndcg in (("hllm", 0.3), ("sasrec", 0.2), ("pop", 0.05)):
        with tracking.start_run(cfg, name, log_data=False) as tr:
            res = EvalResult(
                split="test",
                metrics={"recall@10": ndcg * 2, "ndcg@10": ndcg, "recall@50": ndcg * 3, "ndcg@50": ndcg * 1.2},
                per_user={"ndcg@10": np.full(5, ndcg)},
                users=users,
                protocol_hash="p123",
                n_users=5,
            )
            assert tr.log_eval_result(res, "dA-sB") == "eval/test/p123/dA-sB"
            runs[name] = tr
    tr = runs["hllm"]
    for step in range(4):
        tr.log_metrics({"loss": 4.0 - step}, step, prefix="train/")
    assert tr.log_loss_curve() is not None
    assert tr.log_comparison({k: r.run_id for k, r in runs.items()}, ks=[10, 50]) is not None
    report = tmp_path / "validation.json"
    report.write_text('{"success": true}')
    tr.log_validation_report(report)

    c = tracking.client(cfg)
    arts = {a.path for a in c.list_artifacts(tr.run_id, "plots")}
    assert arts == {"plots/loss_curve.png", "plots/test_metrics.png"}
    for a in arts:
        assert open(_download(c, tr.run_id, a, tmp_path / "p"), "rb").read(8) == PNG
    assert {a.path for a in c.list_artifacts(tr.run_id, "data/validation")} == {"data/validation/validation.json"}
    d = _download(c, tr.run_id, "eval/test/p123/dA-sB", tmp_path / "e")
    with np.load(f"{d}/per_user.npz") as z:
        assert z["users"].tolist() == users.tolist() and z["ndcg@10"].tolist() == [0.3] * 5
    m = c.get_run(tr.run_id).data
    assert m.metrics["test/ndcg_at_10"] == 0.3 and m.tags[tracking.TAG_PROTOCOL] == "p123"
    # one schema: what was logged reads back as the same result, with its data version
    back = EvalResult.load(d)
    assert back.metrics["ndcg@10"] == 0.3 and back.protocol_hash == "p123" and back.data_version == "dA-sB"
    with pytest.raises(ValueError, match="one value per user"):
        EvalResult(
            split="test",
            metrics={"ndcg@10": 0.1},
            per_user={"ndcg@10": np.zeros(3)},
            users=users,
            protocol_hash="p123",
            n_users=5,
        )


def test_data_version_is_content_based_and_bad_dvc_file_is_named(cfg, store, tmp_path):
    a = write_built(tmp_path / "a", SEQS)
    import pyarrow.parquet as pq

    # same content, different physical layout -> same hash
    t = pq.read_table(a / "sequences.parquet")
    b = write_built(tmp_path / "b", SEQS)
    pq.write_table(t, b / "sequences.parquet", row_group_size=1, compression="gzip")
    assert versioning.sequences_md5(a) == versioning.sequences_md5(b)
    c = write_built(tmp_path / "c", [SEQS[0], SEQS[1], SEQS[2], SEQS[3][:-1] + [5]])
    assert versioning.sequences_md5(c) != versioning.sequences_md5(a)
    assert versioning.sequences_md5(tmp_path / "missing") == "none"

    bad = tmp_path / "repo"
    bad.mkdir()
    (bad / "data.dvc").write_text("outs: []\n")
    with pytest.raises(ValueError, match="data.dvc"):
        versioning.dvc_md5(cfg, bad)
    assert versioning.dvc_md5(cfg, tmp_path) == "none"
