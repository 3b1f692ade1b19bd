"""Helpers for the flow tests (a plain module: tests/ is not a package).

``make_project`` lays out a throw-away project the way a clone looks: a git repo with DVC
initialised and a local DVC remote, a params.yaml for a tiny run (tiny random BERT item model,
tiny Llama user model, a small synthetic shop, a few steps), MLflow on a SQLite file inside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from hllm.testing import TINY_USER


def sh(*args: str, cwd: Path) -> str:
    proc = subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1", "ITERATIVE_DO_NOT_TRACK": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed in {cwd}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def tiny_params(root: Path, item_model: Path, **overrides: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "paths": {
            "raw_dir": "data/raw",
            "built_dir": "data/built",
            "reports_dir": "reports",
            "runs_dir": "runs",
            "export_dir": "exports",
        },
        "synth": {"seed": 15, "n_items": 200, "n_users": 70, "min_seq_len": 6, "max_seq_len": 12},
        "validate": {"data_docs": False},
        "build": {"k_core_user": 5, "k_core_item": 2, "max_seq_len": 6},
        "model": {
            "item": {"path": str(item_model), "max_text_len": 24},
            "user": {"config": dict(TINY_USER)},
            "sasrec_dim": 16,
            "sasrec_heads": 2,
            "sasrec_layers": 1,
        },
        "train": {
            "max_steps": 3,
            "batch_size": 4,
            "num_negatives": 8,
            "lr": 1e-3,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "device": "cpu",
            "checkpoint_every": 0,
            "eval_every_epoch": False,
        },
        "eval": {"protocol": {"max_history": 6, "ks": [5, 10], "select_metric": "ndcg@10"}, "item_batch": 64},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"},
        "registry": {"bootstrap_samples": 200},
        "flow": {"io_retries": 2, "io_retry_delay_s": 0.1, "slot_timeout_s": 3.0},
    }
    for key, value in overrides.items():
        node = p
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return p


def make_project(root: Path, item_model: Path, **overrides: Any) -> Path:
    """A git + DVC project with a local remote and a tiny params.yaml; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "mlflow").mkdir(exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(root, item_model, **overrides), sort_keys=False))
    sh("git", "init", "-q", cwd=root)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=root)
    sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(root / "dvc-remote"), cwd=root)
    return root


def store_client(root: Path) -> Any:
    """A client of the project's own store, for runs *and* the registry: with a registry URI set
    process-wide by an earlier in-process flow (``tracking.configure``), ``MlflowClient(uri)`` alone
    would read another test's registry."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def registered_versions(root: Path, model: str = "hllm-recommender") -> list[Any]:
    client = store_client(root)
    try:
        return list(client.search_model_versions(f"name='{model}'"))
    except Exception:  # noqa: BLE001 - no registered model yet
        return []


def dvc_md5(root: Path) -> str | None:
    p = root / "data.dvc"
    return yaml.safe_load(p.read_text())["outs"][0]["md5"] if p.exists() else None


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


def upload(folder: Path, bucket: str, prefix: str) -> str:
    import boto3

    s3 = boto3.client("s3")
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder)}")
    return f"s3://{bucket}/{prefix}"


def evaluate_stage_files(run_name: str) -> set[str]:
    """The files dvc.yaml's evaluate stage declares (metrics and outs) for one run name, relative to
    the project: what `hllm evaluate --split both`, and so the flow's evaluate task, must write."""
    stage = yaml.safe_load((Path(__file__).resolve().parents[2] / "dvc.yaml").read_text())["stages"]["evaluate"]
    paths = [next(iter(x)) if isinstance(x, dict) else x for x in stage.get("metrics", []) + stage.get("outs", [])]
    return {p.replace("${train.run_name}", run_name) for p in paths}
