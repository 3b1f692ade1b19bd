"""Screenshots of the MLflow and Prefect UIs after a nightly run, for the docs (docs/img/*.png).

    # once: a nightly run recorded on a real Prefect server (starts one, runs `hllm flows run nightly`)
    .venv/bin/python docs/screenshots.py --project /tmp/ui-clone --run-flow
    # then (again at any time): the servers over that project's stores, Chromium, the PNGs
    .venv/bin/python docs/screenshots.py --project /tmp/ui-clone --out docs/img

``--project`` is a checkout whose ``mlflow/`` store ``make run`` filled (default: this repository).
The Prefect server keeps its database under ``<project>/.prefect-ui/`` (``PREFECT_HOME``), so the
flow run of ``--run-flow`` is still there for the screenshots. MLflow runs through ``mlflow/ui.sh``
(what ``make mlflow-ui`` runs), on port 5000 when it is free, so the links in the summary artifact
(``http://127.0.0.1:5000/#/...``) open. It also checks, through both APIs, what the pictures should
show: the experiment's kind, the parent run's metrics and description, the version's description,
and that the Prefect artifact links to the MLflow runs.

Needs headless Chromium from the system packages (``apt-get install -y chromium``). Pictures:

    mlflow-experiment.png   the experiment page: the runs table, parent runs with their children
    mlflow-parent-run.png   a nightly parent run: metrics of every model, the summary as description
    mlflow-model-version.png  the registered version: the description with the gate's numbers
    prefect-flow-run.png    the Prefect flow run page
    prefect-artifact.png    its markdown summary artifact, with the links to the MLflow runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FLOW = "nightly-retrain"
ARTIFACT_KEY = "nightly-retrain-summary"
UI_WORKFLOW = "workflowType=machine_learning"


def free_port(preferred: int | None = None) -> int:
    if preferred:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", preferred))
            return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}) before {url} answered")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def api(url: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def prefect_env(project: Path, port: int) -> dict[str, str]:
    home = project / ".prefect-ui"
    home.mkdir(exist_ok=True)
    return {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
    }


@contextlib.contextmanager
def server(cmd: list[str], env: dict[str, str], cwd: Path, health: str, log: Path) -> Iterator[None]:
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(health, 180, proc)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def prefect_server(project: Path, port: int, logs: Path) -> contextlib.AbstractContextManager[None]:
    cmd = [str(project / ".venv/bin/prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return server(cmd, prefect_env(project, port), project, f"http://127.0.0.1:{port}/api/health", logs / "prefect.log")


def mlflow_server(project: Path, port: int, logs: Path) -> contextlib.AbstractContextManager[None]:
    env = {**os.environ, "MLFLOW_PORT": str(port), "MLFLOW": str(project / ".venv/bin/mlflow")}
    env.pop("MLFLOW_TRACKING_URI", None)
    ui = project / "mlflow" / "ui.sh"
    return server(["bash", str(ui)], env, project, f"http://127.0.0.1:{port}/health", logs / "mlflow.log")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return str(shutil.which(name))
    sys.exit("no chromium on PATH: apt-get install -y chromium")


def shoot(url: str, png: Path, size: str = "1600,1000", budget_ms: int = 15000) -> None:
    """One screenshot with headless Chromium in a fresh profile; JS apps get ``budget_ms`` to render."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={size}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={png}",
            url,
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    print(f"{png}  <- {url}  ({png.stat().st_size // 1024} KB)")


def shrink(png: Path, max_kb: int = 300) -> None:
    """Fewer colours when a picture is over ``max_kb`` (Pillow, if installed)."""
    if png.stat().st_size <= max_kb * 1024:
        return
    try:
        from PIL import Image
    except ImportError:
        return
    Image.open(png).convert("RGB").quantize(colors=128).save(png, optimize=True)
    print(f"  {png.name} quantized to {png.stat().st_size // 1024} KB")


# --------------------------------------------------------------------------- what the pages show


def mlflow_targets(project: Path) -> dict[str, str]:
    """Experiment id, the newest nightly parent run, the newest registered version; checked."""
    sys.path.insert(0, str(project))
    from mlflow import MlflowClient

    from hllm.config import load_config

    cfg = load_config(str(project / "params.yaml"), [])
    uri = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    c = MlflowClient(uri, uri)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        sys.exit(f"no experiment {cfg.tracking.experiment!r} in {uri}: run `make run` in {project} first")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development", exp.tags
    parents = c.search_runs([exp.experiment_id], "tags.`hllm.kind` = 'flow'", max_results=1,
                            order_by=["attributes.start_time DESC"])  # fmt: skip
    if not parents:
        sys.exit("no nightly parent run in the store: run `make run` first")
    parent = parents[0]
    assert "hllm/test/ndcg_at_10" in parent.data.metrics, sorted(parent.data.metrics)
    assert parent.data.tags.get("mlflow.note.content", "").startswith("# nightly-retrain"), "no description"
    name = cfg.registry.model_name
    versions = sorted(c.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version))
    if not versions:
        sys.exit(f"no version of {name}: the nightly run registered nothing")
    mv = versions[-1]
    assert mv.description, f"{name} v{mv.version} has no description"
    print(f"MLflow: experiment {exp.experiment_id}, parent run {parent.info.run_id}, {name} v{mv.version}")
    return {"experiment": exp.experiment_id, "parent": parent.info.run_id, "model": name, "version": str(mv.version)}


def prefect_targets(port: int, parent_run: str) -> dict[str, str]:
    """The newest nightly flow run and its summary artifact; the artifact must link to the parent run."""
    base = f"http://127.0.0.1:{port}/api"
    runs = api(f"{base}/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 20})
    flows = {f["id"]: f["name"] for f in api(f"{base}/flows/filter", {})}
    nightly = [r for r in runs if flows.get(r["flow_id"]) == FLOW]
    if not nightly:
        sys.exit(f"no {FLOW} flow run on the Prefect server: run this script with --run-flow once")
    fr = nightly[0]
    arts = api(f"{base}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [fr["id"]]}}})
    summary = [a for a in arts if a.get("key") == ARTIFACT_KEY]
    assert summary, f"flow run {fr['name']} has no {ARTIFACT_KEY} artifact ({[a.get('key') for a in arts]})"
    md = summary[0]["data"]
    assert "/#/experiments/" in md and f"/runs/{parent_run}" in md, (
        "the summary artifact does not link to the MLflow parent run"
    )
    print(f"Prefect: flow run {fr['name']} ({fr['id']}, {fr['state_type']}), artifact {summary[0]['id']}")
    return {"flow_run": fr["id"], "artifact": summary[0]["id"]}


# --------------------------------------------------------------------------- main


def run_flow(project: Path, logs: Path, args: list[str]) -> None:
    """`hllm flows run nightly` recorded on a real Prefect server (what `make run` does, plus the API URL)."""
    port = free_port()
    with prefect_server(project, port, logs):
        env = prefect_env(project, port)
        env.pop("MLFLOW_TRACKING_URI", None)
        print(f"running the nightly flow in {project} against {env['PREFECT_API_URL']} ...", flush=True)
        subprocess.run([str(project / ".venv/bin/hllm"), "flows", "run", "nightly", *args], cwd=project, env=env,
                       check=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--project", type=Path, default=REPO, help="checkout whose mlflow/ store `make run` filled")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    p.add_argument("--run-flow", action="store_true", help="run the nightly flow on a real Prefect server first")
    p.add_argument("--flow-arg", action="append", default=[], help="extra `hllm flows run nightly` argument")
    p.add_argument("--budget-ms", type=int, default=15000, help="Chromium --virtual-time-budget per page")
    a = p.parse_args(argv)
    project = a.project.resolve()
    logs = project / ".prefect-ui" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if a.run_flow:
        run_flow(project, logs, a.flow_arg)
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    ml = mlflow_targets(project)
    mport, pport = free_port(5000), free_port()
    with mlflow_server(project, mport, logs), prefect_server(project, pport, logs):
        pf = prefect_targets(pport, ml["parent"])
        m, pr = f"http://127.0.0.1:{mport}/#", f"http://127.0.0.1:{pport}"
        pages = {
            # workflowType: a fresh browser would open MLflow 3's GenAI side (see flows/report.py UI_WORKFLOW)
            "mlflow-experiment.png": f"{m}/experiments/{ml['experiment']}?{UI_WORKFLOW}",
            "mlflow-parent-run.png": f"{m}/experiments/{ml['experiment']}/runs/{ml['parent']}?{UI_WORKFLOW}",
            "mlflow-model-version.png": f"{m}/models/{ml['model']}/versions/{ml['version']}",
            "prefect-flow-run.png": f"{pr}/runs/flow-run/{pf['flow_run']}",
            "prefect-artifact.png": f"{pr}/artifacts/artifact/{pf['artifact']}",
        }
        for name, url in pages.items():
            png = a.out / name
            shoot(url, png, budget_ms=a.budget_ms)
            shrink(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
