"""`hllm train` as an MLflow run (real SQLite store in a temporary folder): lineage, metrics, resume,
torchrun workers, and `hllm registry register --run-id` on the run it printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hllm import testing
from hllm.cli import app
from hllm.config import save_config
from hllm.data import versioning
from hllm.ops import registry, tracking
from hllm.training.setup import lr_lambda
from hllm.training.trainer import train

DVC = "outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data/raw\n"


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_bert_dir, built_dir):
    """A project folder (cwd) with a data.dvc, and a params.yaml of a tiny run logging to a store in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("HLLM_ACTOR", "tester")
    (tmp_path / "data.dvc").write_text(DVC)
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    cfg = testing.tiny_config(
        tmp_path,
        tiny_bert_dir,
        built_dir,
        **{
            "train.max_steps": 2,
            "train.checkpoint_every": 0,
            "train.new_params_lr": 1e-2,
            "tracking.tracking_uri": uri,
            "tracking.experiment": "t",
        },
    )
    save_config(cfg, tmp_path / "params.yaml")
    return cfg


def _hllm(*args: str):
    return CliRunner().invoke(app, list(args))


def _runs(cfg):
    return tracking.find_runs(cfg)


def _run_id(output: str) -> str:
    m = re.search(r"mlflow run: ([0-9a-f]{32})", output)
    assert m, output
    return m.group(1)


@pytest.mark.slow
def test_cli_train_is_an_mlflow_run_that_registry_register_accepts(project, built_dir):
    cfg = project
    r = _hllm("train", "--params", "params.yaml")
    assert r.exit_code == 0, r.output
    rid = _run_id(r.output)
    assert f"MLflow run {rid}" in r.output and "mlflow ui --backend-store-uri" in r.output  # the UI hint
    client = tracking.client(cfg)
    run = client.get_run(rid)
    t, p, m = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.train.run_name
    dv = versioning.data_version(cfg)
    assert dv.dvc_md5 == "0123456789abcdef0123456789abcdef.dir"
    assert t[tracking.TAG_KIND] == "train" and t[tracking.TAG_MODEL_KIND] == "hllm" and t["hllm.launcher"] == "cli"
    assert t[tracking.TAG_DATA_VERSION] == dv.version and t[tracking.TAG_SEQ_MD5] == dv.sequences_md5
    assert t[tracking.TAG_PROTOCOL] and t["sys.device"] == "cpu" and t["sys.world_size"] == "1"
    assert p["train.max_steps"] == "2" and p["model.kind"] == "hllm"
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [dv.sequences_md5[:20]]
    arts = {a.path for a in client.list_artifacts(rid, "config")} | {
        a.path for a in client.list_artifacts(rid, "plots")
    }
    assert {"config/params.yaml", "plots/loss_curve.png"} <= arts
    assert [x.step for x in client.get_metric_history(rid, "train/loss")] == [1, 2]
    assert {"train/lr", "train/lr_new", "valid/ndcg_at_10", "test/ndcg_at_10", "test/recall_at_5"} <= set(m)
    ev = f"eval/test/{t[tracking.TAG_PROTOCOL]}/{dv.version}"
    assert {Path(a.path).name for a in client.list_artifacts(rid, ev)} == {"metrics.json", "per_user.npz"}
    assert json.loads((Path(cfg.paths.runs_dir) / cfg.train.run_name / "mlflow_run.json").read_text())["run_id"] == rid
    ckpt = Path(t["hllm.checkpoint"])
    assert ckpt == (Path(cfg.paths.runs_dir) / cfg.train.run_name / "best").resolve()

    # --resume continues the same MLflow run
    r = _hllm("train", "--params", "params.yaml", "--resume", "--set", "train.max_steps=3")
    assert r.exit_code == 0, r.output
    assert _run_id(r.output) == rid and len(_runs(cfg)) == 1
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["hllm.resumes"] == "1"
    assert json.loads(run.data.tags["hllm.resume.changed_params"]) == {"train.max_steps": {"was": "2", "now": "3"}}
    assert [x.step for x in client.get_metric_history(rid, "train/loss")] == [1, 2, 3]
    # without --resume the run folder is refused before an MLflow run is opened
    r = _hllm("train", "--params", "params.yaml")
    assert r.exit_code == 1 and "--resume" in r.output and len(_runs(cfg)) == 1

    # the README recipe: export, register the run, promote
    out = Path("exports") / cfg.train.run_name
    r = _hllm("export", "--params", "params.yaml", "--out", str(out))
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["data"]["data_version"] == dv.version and man["data"]["dvc_md5"] == dv.dvc_md5
    assert man["data"]["sequences_md5"] == dv.sequences_md5
    assert (
        man["data"]["content_hash"] == json.loads((ckpt / "meta.json").read_text())["content_hash"]
    )  # checkpoint's hash
    r = _hllm(
        "registry",
        "register",
        "--run-id",
        rid,
        "--export",
        str(out),
        "--checkpoint",
        str(ckpt),
        "--params",
        "params.yaml",
    )
    assert r.exit_code == 0 and f"version 1 from run {rid}" in r.output, r.output
    mv = client.get_model_version(cfg.registry.model_name, "1")
    assert mv.tags[tracking.TAG_DATA_VERSION] == dv.version == man["data"]["data_version"]
    r = _hllm("registry", "promote", "1", "--params", "params.yaml")
    assert r.exit_code == 0 and "first champion" in r.output, r.output
    rows = registry.list_versions(cfg)
    assert rows[0]["aliases"] == ["champion"] and rows[0]["metrics"]["ndcg@10"] == pytest.approx(
        run.data.metrics["test/ndcg_at_10"]
    )


@pytest.mark.slow
def test_no_mlflow_flag_and_config_and_baselines(project):
    cfg = project
    r = _hllm("train", "--params", "params.yaml", "--model", "pop", "--no-mlflow", "--set", "train.run_name=p1")
    assert r.exit_code == 0 and "mlflow run" not in r.output, r.output
    r = _hllm(
        "train",
        "--params",
        "params.yaml",
        "--model",
        "pop",
        "--set",
        "train.run_name=p2",
        "--set",
        "tracking.enabled=false",
    )
    assert r.exit_code == 0 and "mlflow run" not in r.output, r.output
    assert _runs(cfg) == [] and not (Path(cfg.paths.runs_dir) / "p1" / "mlflow_run.json").exists()
    # a baseline is a run of kind baseline; --no-test leaves out the test evaluation
    r = _hllm("train", "--params", "params.yaml", "--model", "pop", "--set", "train.run_name=p3", "--no-test")
    assert r.exit_code == 0, r.output
    (run,) = _runs(cfg)
    assert run.data.tags[tracking.TAG_KIND] == "baseline" and run.data.tags[tracking.TAG_MODEL_KIND] == "pop"
    assert "valid/ndcg_at_10" in run.data.metrics and not any(k.startswith("test/") for k in run.data.metrics)


@pytest.mark.slow
def test_failed_training_marks_the_run_failed(project):
    cfg = project
    r = _hllm("train", "--params", "params.yaml", "--set", "eval.protocol.select_metric=ndcg@7")
    assert r.exit_code == 1 and "select_metric" in r.output
    (run,) = _runs(cfg)
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_torchrun_entry_tags_the_run_with_its_own_system_info(project, monkeypatch):
    """A run opened elsewhere (a flow on a CPU box describing an 8-GPU job) gets the sys.* tags of the
    process that trains: rank 0 of `python -m hllm.cli.worker` with MLFLOW_RUN_ID."""
    from hllm.cli.worker import main

    cfg = project
    launcher = tracking.open_run(cfg, "k8s-like", world_size=8, device="cuda")
    assert launcher.client.get_run(launcher.run_id).data.tags["sys.device"] == "cuda"
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher.run_id)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert (
        main(["--params", "params.yaml", "--set", "model.kind=pop", "--set", "train.run_name=k", "--no-progress"]) == 0
    )
    t = launcher.client.get_run(launcher.run_id).data.tags
    assert t["sys.device"] == "cpu" and t["sys.world_size"] == "1" and t["sys.nodes"] == "1"
    import torch

    assert t["sys.torch"] == torch.__version__ and t["sys.host"]


@pytest.mark.slow
def test_lr_of_each_parameter_group_is_logged(tmp_path, tiny_bert_dir, built_dir):
    """train/lr is what the pretrained groups' optimizer applies, train/lr_new the from-scratch ones'
    (train.new_params_lr), both following warmup + cosine."""
    cfg = testing.tiny_config(
        tmp_path,
        tiny_bert_dir,
        built_dir,
        **{
            "train.max_steps": 5,
            "train.warmup_ratio": 0.4,
            "train.lr": 1e-3,
            "train.new_params_lr": 1e-2,
            "train.log_every": 1,
            "train.eval_every_epoch": False,
            "train.checkpoint_every": 0,
        },
    )

    class Rows:
        def __init__(self):
            self.rows = []

        def log_metrics(self, metrics, step):
            self.rows.append((step, dict(metrics)))

    logger = Rows()
    train(cfg, logger=logger, progress=False)
    f = lr_lambda(5, 0.4)
    rows = [(s, m) for s, m in logger.rows if "train/lr" in m]
    assert [s for s, _ in rows] == [1, 2, 3, 4, 5]
    assert len({round(m["train/lr"], 9) for _, m in rows}) == 4  # 0.5, 1, 1, 0.75, 0.25 of the base rate
    for s, m in rows:  # the row of step s is the update that took the model from s - 1 to s
        assert m["train/lr"] == pytest.approx(1e-3 * f(s - 1), rel=1e-6)
        assert m["train/lr_new"] == pytest.approx(1e-2 * f(s - 1), rel=1e-6)


@pytest.mark.slow
def test_cli_torchrun_workers_log_into_the_cli_run(project):
    cfg = project
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_RUN_ID": "0" * 32}  # a stale id must be ignored
    hllm = str(Path(sys.executable).parent / "hllm")
    proc = subprocess.run(
        [
            hllm,
            "train",
            "--params",
            "params.yaml",
            "--nproc",
            "2",
            "--no-test",
            "--set",
            "train.run_name=ddp",
            "--set",
            "train.eval_every_epoch=false",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rid = _run_id(proc.stdout)
    client = tracking.client(cfg)
    run = client.get_run(rid)
    t = run.data.tags
    assert run.info.status == "FINISHED" and len(_runs(cfg)) == 1
    assert [x.step for x in client.get_metric_history(rid, "train/loss")] == [1, 2]  # rank 0 only
    assert t["sys.world_size"] == "2" and t["sys.local_world_size"] == "2" and t["sys.nodes"] == "1"
    assert t["hllm.checkpoint"].endswith("/ddp/best") and (Path(t["hllm.checkpoint"]) / "model.safetensors").is_file()
