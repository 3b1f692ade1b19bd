"""``train_backend: k8s``: hllm.training.k8s and the nightly flow submitting HLLM training as a PyTorchJob.

The Kubernetes API is a fake (``fakekube.py``: no cluster, kubelet or Training Operator can run on
these machines); the ``kubernetes`` client, the template rendering, the training processes the
"pods" run (torchrun, two nodes on loopback), MLflow, Prefect and the rest of the flow are real.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from hllm.config import ConfigError, load_config
from tests.helpers.fakekube import FakeKube
from tests.helpers.flowkit import evaluate_stage_files, make_project, registered_versions, store_client

IMAGE = "registry.example.com/ml/hllm:cuda"
ARGS = ["-m", "hllm.cli.worker", "--params", "/etc/hllm/params.yaml", "--resume", "--no-progress"]


def k8s_config(root: Path, kubeconfig: Path | None = None, *overrides: str):
    shared = root / "shared"
    return load_config(
        None,
        [
            f"flow.k8s.image={IMAGE}",
            f"flow.k8s.shared_mount={shared}",
            f"paths.built_dir={shared}/data/built",
            f"paths.runs_dir={shared}/runs",
            f"flow.k8s.kubeconfig={kubeconfig or ''}",
            "flow.k8s.poll_s=0.2",
            "train.run_name=nightly-20260101-020000-abcdef12-hllm",
            *overrides,
        ],
    )


@pytest.fixture
def kube(tmp_path, monkeypatch):
    import hllm.training.k8s

    monkeypatch.setattr(hllm.training.k8s, "_BACKOFF_S", 0.01)  # transient API errors retried without waiting
    (tmp_path / "shared").mkdir()
    with FakeKube(tmp_path / "kube", tmp_path, mode="hold") as fk:
        fk.kubeconfig_path = fk.kubeconfig(tmp_path / "kubeconfig")
        yield fk


# --------------------------------------------------------------------------- hllm.training.k8s


def test_job_names_are_short_valid_kubernetes_names():
    from hllm.training.k8s import MAX_JOB_NAME, job_name

    assert (
        job_name("hllm-train", "nightly-20260101-020000-abcdef12-hllm")
        == "hllm-train-nightly-20260101-020000-abcdef12-hllm"
    )
    long_a, long_b = (job_name("hllm-train", "Nightly_Run." + "x" * 60 + tail) for tail in ("a", "b"))
    for name in (long_a, long_b, job_name("7", "x")):
        assert len(name) <= MAX_JOB_NAME and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    assert long_a != long_b  # the hash of the full run name keeps truncated names apart


@pytest.mark.parametrize(
    "override, message",
    [
        ("flow.k8s.image=", "flow.k8s.image is empty"),
        ("flow.k8s.gpus_per_node=0", "flow.k8s.gpus_per_node must be >= 1"),
        ("flow.k8s.shared_mount=/nonexistent/shared", "flow.k8s.shared_mount=/nonexistent/shared is not a folder here"),
        ("paths.built_dir=data/built", "paths.built_dir=data/built is not on the shared volume"),
        ("flow.k8s.template=missing.yaml", "flow.k8s.template: missing.yaml not found"),
        ("flow.k8s.namespace=Team_A", "NAMESPACE='Team_A' is not a valid Kubernetes name"),
    ],
)
def test_check_names_the_bad_setting(tmp_path, override, message):
    from hllm.training import k8s

    (tmp_path / "shared").mkdir()
    with pytest.raises(ConfigError, match=re.escape(message)):
        k8s.check(k8s_config(tmp_path, None, override))


def test_unfinished_job_is_deleted_at_the_timeout_and_api_hiccups_are_retried(kube, tmp_path):
    from hllm.training import k8s

    cfg = k8s_config(
        tmp_path,
        kube.kubeconfig_path,
        "flow.k8s.timeout_s=1",
        "flow.k8s.workers=2",
        "flow.k8s.gpus_per_node=4",
        "flow.k8s.namespace=ml-team",
    )
    kube.unavailable = 2  # the first two requests get 503: retried, not fatal
    with pytest.raises(k8s.K8sError) as err:
        k8s.train(cfg, "run-1")
    msg = str(err.value)
    job = "hllm-train-nightly-20260101-020000-abcdef12-hllm"
    assert "did not finish within 1 s (flow.k8s.timeout_s), deleted it" in msg
    assert "Running=True (PyTorchJobRunning" in msg and f"kubectl -n ml-team logs {job}-master-0" in msg
    assert kube.get("pytorchjobs", "ml-team", job) is None  # deleted: it no longer holds GPUs
    methods = [m for m, path in kube.requests if path.endswith("/pytorchjobs/" + job) or path.endswith("pytorchjobs")]
    assert methods[0] == "POST" and methods[-1] == "DELETE" and methods.count("GET") >= 2

    # what was submitted: the params ConfigMap, owned by the job; the rendered job
    cm = kube.get("configmaps", "ml-team", f"{job}-params")
    [owner] = cm["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"]) == ("PyTorchJob", job)
    params = yaml.safe_load(cm["data"]["params.yaml"])
    assert params["paths"]["built_dir"] == str(tmp_path / "shared" / "data" / "built")
    assert params["paths"]["reports_dir"] == str(Path("reports").resolve())  # absolute: the pods' cwd differs
    assert params["train"]["run_name"] == "nightly-20260101-020000-abcdef12-hllm"
    posted = [r for r in kube.requests if r == ("POST", "/apis/kubeflow.org/v1/namespaces/ml-team/pytorchjobs")]
    assert len(posted) == 1


def test_an_existing_job_is_waited_on_only_by_its_own_run(kube, tmp_path):
    from hllm.training import k8s

    cfg = k8s_config(tmp_path, kube.kubeconfig_path)
    api = k8s.api_client(cfg)
    try:
        first = k8s.submit(cfg, "run-1", api)
        again = k8s.submit(cfg, "run-1", api)  # the flow process restarted: same MLflow run, same job
        assert not first.adopted and again.adopted and again.job == first.job
        with pytest.raises(k8s.K8sError, match=r"already exists for another MLflow run \(run-1\)"):
            k8s.submit(cfg, "run-2", api)
    finally:
        api.close()
    assert len(kube.of_kind("pytorchjobs")) == 1


def test_refused_credentials_are_a_clear_error(kube, tmp_path):
    from hllm.training import k8s

    kube.token = "another-token"
    with pytest.raises(k8s.K8sError, match=r"HTTP 401: Unauthorized \(the API refused the credentials\)"):
        k8s.train(k8s_config(tmp_path, kube.kubeconfig_path), "run-1")
    assert kube.of_kind("pytorchjobs") == []


# --------------------------------------------------------------------------- the nightly flow


@contextlib.contextmanager
def k8s_project(tmp_path, bert, monkeypatch, **k8s) -> Iterator[tuple[Path, FakeKube]]:
    """A tiny project whose params send HLLM training to the fake cluster (run mode: the "pods"
    train for real), with paths.built_dir / runs_dir on the shared volume."""
    root = tmp_path / "proj"
    shared = root / "shared"
    shared.mkdir(parents=True)
    with FakeKube(tmp_path / "kube", root, mode="run") as fk:
        fk.claims["hllm-shared"] = shared
        fk.secrets["hllm-stack"] = {"HLLM_LOG_LEVEL": "INFO"}
        make_project(
            root,
            bert,
            **{
                "paths.built_dir": str(shared / "data" / "built"),
                "paths.runs_dir": str(shared / "runs"),
                "flow.train_backend": "k8s",
                "flow.k8s.image": IMAGE,
                "flow.k8s.shared_mount": str(shared),
                "flow.k8s.kubeconfig": str(fk.kubeconfig(tmp_path / "kubeconfig")),
                "flow.k8s.poll_s": 0.3,
                "flow.k8s.timeout_s": 300.0,
                **{f"flow.k8s.{k}": v for k, v in k8s.items()},
            },
        )
        monkeypatch.chdir(root)
        yield root, fk


def _runs(root: Path) -> dict:

    client = store_client(root)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client, {r.data.tags.get("hllm.kind"): r for r in client.search_runs(exps)}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_nightly_trains_on_kubernetes_and_registers(tmp_path, bert, monkeypatch):
    from flows.nightly import nightly_retrain
    from hllm.training.k8s import job_name

    with k8s_project(tmp_path, bert, monkeypatch, workers=1, gpus_per_node=1) as (root, fk):
        state = nightly_retrain(baselines=False, return_state=True)  # train_backend from params.yaml
    assert state.is_completed(), state.message + "".join(
        f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((tmp_path / "kube").rglob("*.log"))
    )
    res = state.result()
    client, runs = _runs(root)
    train_run = runs["train"]

    # the job the "cluster" received: rendered from infra/k8s/pytorchjob.yaml with flow.k8s's settings
    [job] = fk.of_kind("pytorchjobs")
    name = job["metadata"]["name"]
    assert name == job_name("hllm-train", f"{res['run_name']}-hllm") and job["metadata"]["namespace"] == "hllm"
    assert res["paths"]["hllm_k8s_job"] == f"hllm/{name}" == train_run.data.tags["hllm.k8s_job"]
    assert job["spec"]["nprocPerNode"] == "1"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert (specs["Master"]["replicas"], specs["Worker"]["replicas"]) == (1, 1)
    for role in ("Master", "Worker"):
        pod = specs[role]["template"]["spec"]
        c = pod["containers"][0]
        assert c["image"] == IMAGE and c["command"] == ["torchrun"] and c["args"] == ARGS
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["MLFLOW_RUN_ID"] == train_run.info.run_id  # rank 0 logs into the flow's child run
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 == c["resources"]["requests"]["nvidia.com/gpu"]
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["shared"]["persistentVolumeClaim"]["claimName"] == "hllm-shared"
        assert vols["params"]["configMap"]["name"] == f"{name}-params"
        assert {"name": "shared", "mountPath": str(root / "shared")} in c["volumeMounts"]
    params = yaml.safe_load(fk.get("configmaps", "hllm", f"{name}-params")["data"]["params.yaml"])
    assert params["model"]["kind"] == "hllm" and params["train"]["run_name"] == f"{res['run_name']}-hllm"
    assert params["paths"]["runs_dir"] == str(root / "shared" / "runs")
    assert job["status"]["conditions"][-1]["type"] == "Succeeded"

    # the pods trained one world of 2 ranks on the shared volume and logged to the child run
    ckpt = Path(res["paths"]["hllm_checkpoint"])
    assert ckpt.is_relative_to(root / "shared" / "runs")
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
    assert len(client.get_metric_history(train_run.info.run_id, "train/loss")) == 3  # train.max_steps
    assert train_run.info.status == "FINISHED" and "test/ndcg_at_10" in train_run.data.metrics

    # ... and the flow went on from those checkpoints: evaluation, export, registration
    assert [str(v.version) for v in registered_versions(root)] == ["1"] and res["alias"] == "champion"
    assert (root / "exports" / f"{res['run_name']}-hllm" / "manifest.json").is_file()
    run = f"{res['run_name']}-hllm"  # evaluation wrote what dvc.yaml's evaluate stage declares, no more
    written = {str(f.relative_to(root)) for f in (root / "reports" / "eval" / run).rglob("*") if f.is_file()}
    assert written == evaluate_stage_files(run)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_a_failed_kubernetes_job_fails_the_flow_and_registers_nothing(tmp_path, bert, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.nightly import nightly_retrain

    with k8s_project(tmp_path, bert, monkeypatch, workers=0, gpus_per_node=1) as (root, fk):
        # valid for the flow, refused by `python -m hllm.cli.worker` in the pod
        state = nightly_retrain(baselines=False, overrides=["train.batch_size=0"], return_state=True)
    assert state.is_failed()
    assert "PyTorchJob hllm/hllm-train-" in state.message and "Failed=True (PyTorchJobFailed" in state.message
    assert "1 Master replica(s) failed" in state.message and "kubectl -n hllm logs" in state.message
    [job] = fk.of_kind("pytorchjobs")
    assert "Worker" not in job["spec"]["pytorchReplicaSpecs"]  # workers 0: master only
    assert "train.batch_size must be >= 1" in (tmp_path / "kube" / job["metadata"]["name"] / "master-0.log").read_text()

    with get_client(sync_client=True) as c:
        trs = c.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    tasks = {t.name.rsplit("-", 1)[0]: t for t in trs}
    assert tasks["train"].state.is_failed() and tasks["train"].run_count == 1  # never retried
    assert not {"evaluate", "export", "register", "promotion-gate"} & set(tasks)
    assert registered_versions(root) == []
    _, runs = _runs(root)
    assert runs["flow"].info.status == "FAILED" and runs["train"].info.status == "FAILED"
    assert not (root / "exports").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_bad_kubernetes_settings_fail_the_flow_before_any_data_is_touched(tmp_path, bert, monkeypatch):
    from flows.nightly import nightly_retrain

    root = make_project(tmp_path / "proj", bert)  # no flow.k8s.image, paths not on a shared volume
    monkeypatch.chdir(root)
    state = nightly_retrain(train_backend="k8s", return_state=True)
    assert state.is_failed() and "flow.k8s.image is empty" in state.message
    assert not (root / "data").exists() and not (root / "data.dvc").exists()
    assert registered_versions(root) == []
    [report] = (root / "reports" / "nightly").glob("*.json")
    assert json.loads(report.read_text())["failed_stage"] == "setup"


def test_cli_rejects_an_unknown_train_backend(tmp_path, monkeypatch):
    import logging

    from typer.testing import CliRunner

    from hllm.cli import app

    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        res = CliRunner().invoke(app, ["flows", "run", "nightly", "--train-backend", "slurm"])
        assert res.exit_code == 2 and "--train-backend 'slurm': expected one of local, torchrun, k8s" in res.output
        res = CliRunner().invoke(app, ["flows", "run", "nightly", "--help"])
        assert "--train-backend" in res.output
    finally:  # the CLI's callback installs a handler on CliRunner's stream
        root.handlers[:] = handlers
        root.setLevel(level)
