"""infra/ checked without any service: files parse, and names agree everywhere they are repeated.

The same variable, bucket, pool, port or image appears in docker-compose.yml, the k8s manifests,
local-stack.sh, the env examples, infra/README.md and the code; a rename in one place only would
break a team's stack at deploy time, so it breaks here instead. Unmarked: runs in `make test`.
"""

from __future__ import annotations

import configparser
import json
import re
import runpy
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"


def env_example(name: str) -> dict[str, str]:
    out = {}
    for line in (INFRA / name).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def k8s_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def k8s_objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, over every manifest except the per-run template."""
    objs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in {"kustomization.yaml", "pytorchjob.yaml"}:
            continue
        for d in k8s_docs(path.name):
            objs[(d["kind"], d["metadata"]["name"])] = d
    return objs


def local_stack_env_keys() -> set[str]:
    """Names `local-stack.sh up` writes to its env file (the heredoc's `export NAME=` lines)."""
    return set(re.findall(r"^export ([A-Z_][A-Z0-9_]*)=", (INFRA / "local-stack.sh").read_text(), re.M))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def render():
    return runpy.run_path(str(K8S / "render.py"))["render"]


CLIENT = env_example("client.env.example")


# ------------------------------------------------------------------------------------- compose


def test_compose_has_the_stack_services_from_the_project_image(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker"}
    for name in ("mlflow", "prefect-server", "prefect-worker"):
        assert services[name]["image"] == "hllm:cpu"
        assert services[name]["build"] == {
            "context": "..",
            "dockerfile": "infra/Dockerfile",
            "args": {"TORCH_VARIANT": "cpu"},
        }
    assert (REPO / services["mlflow"]["build"]["dockerfile"]).is_file()
    assert services["mlflow"]["command"] == ["bash", "infra/mlflow-server.sh"]
    assert services["prefect-server"]["command"][:3] == ["prefect", "server", "start"]
    worker = services["prefect-worker"]["command"]
    assert worker[:3] == ["prefect", "worker", "start"]
    assert worker[worker.index("--pool") + 1] == CLIENT["HLLM_WORK_POOL"] == "hllm-process"


def test_compose_secrets_come_from_env_example(compose):
    text = (INFRA / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", text))
    with_default = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):-", text))
    bare = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", text))
    documented = set(env_example(".env.example"))
    assert required, "compose should require its secrets with ${VAR:?...}"
    assert required | bare <= documented, sorted((required | bare) - documented)
    assert not bare - required - with_default, "every bare ${VAR} must be required somewhere too"


def test_compose_ports_match_readme(compose):
    published = {int(p.split(":")[0]) for s in compose["services"].values() for p in s.get("ports", [])}
    assert published == {5000, 4200, 9000, 9001}
    readme = (INFRA / "README.md").read_text()
    table = readme[readme.index("## Services, ports, secrets") : readme.index("### The client variables")]
    for port in published | {5432}:
        assert re.search(rf"\|\s*{port}\b", table), f"port {port} missing from infra/README.md's service table"


def test_compose_mlflow_gets_every_variable_its_entry_script_requires(compose):
    script = (INFRA / "mlflow-server.sh").read_text()
    required = set(re.findall(r'^: "\$\{([A-Z_][A-Z0-9_]*):\?', script, re.M))
    assert required == {
        "MLFLOW_BACKEND_STORE_URI",
        "MLFLOW_AUTH_DATABASE_URI",
        "MLFLOW_ARTIFACTS_DESTINATION",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    }
    assert required <= set(compose["services"]["mlflow"]["environment"])
    k8s_secret = k8s_objects()[("Secret", "hllm-mlflow-server")]["stringData"]
    assert required <= set(k8s_secret)


def test_databases_and_buckets_agree(compose):
    created = set(re.findall(r"CREATE DATABASE (\w+);", (INFRA / "postgres-init.sql").read_text()))
    env = compose["services"]["mlflow"]["environment"]
    used = {
        env["MLFLOW_BACKEND_STORE_URI"].rsplit("/", 1)[1],
        env["MLFLOW_AUTH_DATABASE_URI"].rsplit("/", 1)[1],
        compose["services"]["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"].rsplit("/", 1)[
            1
        ],
    }
    assert used == created == {"mlflow", "mlflow_auth", "prefect"}
    stack = (INFRA / "local-stack.sh").read_text()
    assert "for db in mlflow mlflow_auth prefect" in stack

    init = " ".join(compose["services"]["minio-init"]["command"])
    buckets = set(re.findall(r"s3/([a-z0-9-]+)", init))
    assert buckets == {"hllm-mlflow", "hllm-dvc"}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://hllm-mlflow/artifacts"
    assert (
        k8s_objects()[("Secret", "hllm-mlflow-server")]["stringData"]["MLFLOW_ARTIFACTS_DESTINATION"]
        == env["MLFLOW_ARTIFACTS_DESTINATION"]
    )
    assert "MLFLOW_BUCKET=hllm-mlflow" in stack and "DVC_BUCKET=hllm-dvc" in stack
    # The project's committed DVC remote `s3` is the bucket the stacks create.
    dvc = configparser.ConfigParser()
    dvc.read(REPO / ".dvc" / "config")
    assert dvc["'remote \"s3\"'"]["url"] == CLIENT["HLLM_DVC_REMOTE_URL"] == "s3://hllm-dvc/store"


# ------------------------------------------------------------------------ client variables


def test_client_variables_are_the_same_everywhere(compose):
    names = set(CLIENT)
    assert {
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "PREFECT_API_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "MLFLOW_S3_ENDPOINT_URL",
    } <= names
    assert names <= set(compose["services"]["prefect-worker"]["environment"])
    assert names == set(k8s_objects()[("Secret", "hllm-stack")]["stringData"])
    assert names <= local_stack_env_keys()
    from hllm.config import Config

    assert Config().flow.work_pool == CLIENT["HLLM_WORK_POOL"]  # the pool `prefect deploy` targets
    readme = (INFRA / "README.md").read_text()
    table = readme[readme.index("### The client variables") : readme.index("## From nothing")]
    in_table = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    assert in_table == names, (sorted(in_table - names), sorted(names - in_table))


def test_code_reads_the_tracking_uri_from_the_environment(monkeypatch):
    from hllm.config import Config
    from hllm.ops.tracking import resolve_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    cfg = Config()
    assert cfg.tracking.tracking_uri == ""  # the default defers to the environment
    assert resolve_tracking_uri(cfg) == "http://mlflow.example:5000"


def test_secrets_stay_out_of_git():
    ignored = subprocess.run(
        ["git", "check-ignore", "infra/.env", "infra/team.env", ".stack/env"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    assert ignored == ["infra/.env", "infra/team.env", ".stack/env"]


# ------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_agrees_with_the_project():
    text = (INFRA / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    py = re.search(r"^ARG PYTHON_VERSION=(\S+)", text, re.M).group(1)
    assert f">={py}" in project["requires-python"]
    torch_pin = re.search(r"^torch==(\S+)", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.M).group(1) == torch_pin
    extras = re.search(r'"\.\[([\w,]+)\]"', text).group(1).split(",")
    assert set(extras) <= set(project["optional-dependencies"]), extras
    assert "k8s" in extras  # flow runs on the cluster submit PyTorchJobs (hllm.training.k8s)
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            tracked = subprocess.run(["git", "ls-files", path], cwd=REPO, capture_output=True, text=True).stdout
            assert tracked.strip() or (REPO / path).is_file(), f"Dockerfile copies {path}, which is not in the repo"
    # The same offline/telemetry switches as the Makefile.
    make_vars = set(re.findall(r"^export (\w+) \?=", (REPO / "Makefile").read_text(), re.M))
    missing = {
        v
        for v in make_vars - {"HF_HUB_OFFLINE", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
        if f"{v}=" not in text
    }
    assert not missing, missing


# ------------------------------------------------------------------------------- Kubernetes


def test_k8s_manifests_parse_and_reference_existing_objects():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
    for gen in kust["configMapGenerator"]:
        for f in gen["files"]:
            assert (K8S / f.split("=", 1)[-1]).is_file(), f
    objs = k8s_objects()
    names = {name for _, name in objs}
    for (kind, name), obj in objs.items():
        if kind != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        for c in pod["containers"]:
            assert c["image"] == "hllm:cpu", (name, c["image"])
            for ref in c.get("envFrom", []):
                assert ref["secretRef"]["name"] in names, (name, ref)
        if "serviceAccountName" in pod:
            assert ("ServiceAccount", pod["serviceAccountName"]) in objs
        for vol in pod.get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in {g["name"] for g in kust["configMapGenerator"]}
    assert objs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "bash",
        "infra/mlflow-server.sh",
    ]
    assert objs[("Service", "mlflow")]["spec"]["ports"][0]["port"] == 5000
    assert objs[("Service", "prefect-server")]["spec"]["ports"][0]["port"] == 4200
    assert k8s_objects()[("Secret", "hllm-stack")]["stringData"]["MLFLOW_TRACKING_URI"] == "http://mlflow.hllm.svc:5000"
    worker = objs[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]["containers"][0]["command"]
    pool = worker[worker.index("--pool") + 1]
    assert pool == k8s_objects()[("Secret", "hllm-stack")]["stringData"]["HLLM_WORK_POOL"] == "hllm-k8s"
    assert worker[worker.index("--type") + 1] == "kubernetes"


def test_prefect_base_job_template_is_valid_and_points_at_existing_objects():
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import apply_values

    template = json.loads((K8S / "prefect-base-job-template.json").read_text())
    validate_base_job_template(template)  # what the server runs on `work-pool create`
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    job = apply_values(template["job_configuration"]["job_manifest"], defaults)
    pod = job["spec"]["template"]["spec"]
    objs = k8s_objects()
    assert ("ServiceAccount", pod["serviceAccountName"]) in objs
    assert ("PersistentVolumeClaim", pod["volumes"][0]["persistentVolumeClaim"]["claimName"]) in objs
    assert ("Secret", pod["containers"][0]["envFrom"][0]["secretRef"]["name"]) in objs
    assert job["metadata"]["namespace"] == "hllm"
    assert pod["containers"][0]["image"] == "hllm:cpu"


def _pytorchjob(render, **values) -> dict:
    base = {"JOB_NAME": "hllm-train-1", "IMAGE": "reg/hllm:cuda", "PARAMS_CONFIGMAP": "hllm-train-1-params"}
    return yaml.safe_load(render(K8S / "pytorchjob.yaml", {**base, **values}, environ={}))


def test_pytorchjob_renders_master_and_workers_with_gpus_and_nccl(render):
    job = _pytorchjob(render, WORKERS="3", GPUS_PER_NODE="4")
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["spec"]["nprocPerNode"] == "4"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
    for role in ("Master", "Worker"):
        pod = specs[role]["template"]["spec"]
        c = pod["containers"][0]
        assert c["name"] == "pytorch" and c["image"] == "reg/hllm:cuda"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
        assert [c["command"][0], *c["args"][:2]] == ["torchrun", "-m", "hllm.cli.worker"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert "NCCL_SOCKET_IFNAME" in env and env["MLFLOW_RUN_ID"] == ""
        claims = {v["name"]: v for v in pod["volumes"]}
        assert claims["shared"]["persistentVolumeClaim"]["claimName"] == "hllm-shared"
        assert claims["params"]["configMap"]["name"] == "hllm-train-1-params"
        assert c["envFrom"][0]["secretRef"]["name"] == "hllm-stack"


def test_pytorchjob_command_matches_the_training_entry_point(render, capsys):
    from hllm.cli.worker import main

    args = _pytorchjob(render)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    for flag in (a for a in args[2:] if a.startswith("--")):
        assert flag in usage, f"pytorchjob.yaml passes {flag}, which `python -m hllm.cli.worker` does not accept"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"JOB_NAME": None}, "JOB_NAME has no value"),
        ({"JOB_NAME": "Hllm_Train"}, "not a valid Kubernetes name"),
        ({"GPUS": "8"}, "no variable(s) ['GPUS']"),
    ],
)
def test_render_rejects_bad_values_naming_the_variable(render, values, message):
    base = {"JOB_NAME": "j", "IMAGE": "i", "PARAMS_CONFIGMAP": "p"}
    merged = {k: v for k, v in {**base, **values}.items() if v is not None}
    with pytest.raises(ValueError, match=re.escape(message)):
        render(K8S / "pytorchjob.yaml", merged, environ={})


# ------------------------------------------------------------------------------- scripts, CI


def test_shell_scripts_parse_and_mlflow_entry_names_a_missing_variable(tmp_path):
    for script in ("local-stack.sh", "mlflow-server.sh"):
        assert subprocess.run(["bash", "-n", str(INFRA / script)]).returncode == 0, script
    proc = subprocess.run(
        ["bash", str(INFRA / "mlflow-server.sh")],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0 and "MLFLOW_BACKEND_STORE_URI" in proc.stderr
    usage = subprocess.run(["bash", str(INFRA / "local-stack.sh"), "bogus"], capture_output=True, text=True)
    assert usage.returncode == 2 and "up|down|status" in usage.stderr


def test_integration_suite_is_marked_and_run_by_ci():
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^test-integration:.*\n\t.*pytest -m integration", make, re.M)
    assert "make test-integration" in (REPO / ".ci" / "run").read_text()
    for path in (REPO / "tests" / "integration").glob("test_stack_*.py"):
        assert "pytest.mark.integration" in path.read_text().split("def test_", 1)[0], path.name


# ------------------------------------------------------------------------ the A/B service


def _serve_objects() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in k8s_docs("serve.yaml")}


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_every_manifest_is_in_the_kustomization():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    not_applied = {"kustomization.yaml", "pytorchjob.yaml", "secrets.example.yaml"}  # template, never committed
    assert set(kust["resources"]) == {p.name for p in K8S.glob("*.yaml")} - not_applied
    assert "serve.yaml" in kust["resources"]


def test_serve_deployment_runs_hllm_serve_with_flags_it_accepts():
    from typer.testing import CliRunner

    from hllm.cli import app

    dep = _serve_objects()[("Deployment", "hllm-serve")]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    cmd = c["command"]
    assert cmd[:2] == ["hllm", "serve"] and c["image"] == "hllm:cpu"
    usage = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
    for flag in (a for a in cmd[2:] if a.startswith("--")):
        assert flag in usage, f"serve.yaml passes {flag}, which `hllm serve` does not accept"
    assert _flag(cmd, "--host") == "0.0.0.0"  # reachable from the Service, not loopback only
    # one port everywhere: the command, the container, the Service, the probes and the scrape annotation
    port = int(_flag(cmd, "--port"))
    [cport] = c["ports"]
    assert cport == {"name": "http", "containerPort": port}
    svc = _serve_objects()[("Service", "hllm-serve")]
    assert svc["spec"]["ports"][0]["targetPort"] == "http" and svc["spec"]["ports"][0]["port"] == port
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    # labels: the selector, the Service, the PDB and the pods agree
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for sel in (
        dep["spec"]["selector"]["matchLabels"],
        svc["spec"]["selector"],
        _serve_objects()[("PodDisruptionBudget", "hllm-serve")]["spec"]["selector"]["matchLabels"],
    ):
        assert sel.items() <= pod_labels.items(), sel


def test_serve_probes_and_metrics_are_routes_of_the_app():
    from hllm.abtest.service import ServeOptions, Service, create_app
    from hllm.config import Config

    svc = Service(Config(), ServeOptions())
    try:
        routes = {(r.path, m) for r in create_app(Config(), service=svc).routes for m in getattr(r, "methods", ())}
    finally:
        svc.close()
    dep = _serve_objects()[("Deployment", "hllm-serve")]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    scraped = dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    for path in ("/readyz", "/healthz", scraped):
        assert (path, "GET") in routes, path
    assert {("/recommend", "POST"), ("/feedback", "POST")} <= routes
    # uvicorn drains for up to 30 s (hllm/cli/serve.py), then the logs flush: the pod must get that long
    serve_src = (REPO / "hllm" / "cli" / "serve.py").read_text()
    drain = int(re.search(r"timeout_graceful_shutdown=(\d+)", serve_src).group(1))
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain


def test_serve_reads_the_registry_and_writes_logs_to_a_stack_bucket(compose):
    dep = _serve_objects()[("Deployment", "hllm-serve")]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert [r["secretRef"]["name"] for r in c["envFrom"]] == ["hllm-stack"]
    stack = k8s_objects()[("Secret", "hllm-stack")]["stringData"]
    # the registry (MLflow) and the S3 log writer (pyarrow reads AWS_* and AWS_ENDPOINT_URL)
    needed = {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    assert needed | {"AWS_ENDPOINT_URL"} <= set(stack)
    log_dir = _flag(c["command"], "--log-dir")
    assert log_dir.startswith("s3://")
    init = " ".join(compose["services"]["minio-init"]["command"])
    assert log_dir.split("/")[2] in set(re.findall(r"s3/([a-z0-9-]+)", init)), log_dir  # a bucket the stacks create
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]


def test_serve_autoscaler_targets_the_deployment():
    objs = _serve_objects()
    hpa = objs[("HorizontalPodAutoscaler", "hllm-serve")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) in objs and ref["apiVersion"] == objs[(ref["kind"], ref["name"])]["apiVersion"]
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"  # utilisation of the request: the pod must request CPU
    assert objs[("Deployment", "hllm-serve")]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"][
        "cpu"
    ]


def test_ab_analysis_deployment_in_the_readme_matches_prefect_yaml_and_the_service():
    """The k8s recipe deploys the same flow, name and schedule as prefect.yaml, on the cluster's pool,
    reading the logs where serve.yaml writes them."""
    import ast

    readme = (INFRA / "README.md").read_text()
    section = readme[readme.index("### Serving the A/B test") : readme.index("## Training across machines")]
    assert "serve.yaml" in section and "hllm-serve:8000" in section
    code = re.search(r"```python\n(.*?)\n```", section, re.S).group(1)
    [call] = [
        n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "deploy"
    ]
    source = call.func.value
    entrypoint = next(k.value.value for k in source.keywords if k.arg == "entrypoint")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    prefect_yaml = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [daily] = [d for d in prefect_yaml["deployments"] if d["entrypoint"] == entrypoint]
    assert entrypoint == "flows/ab_analysis.py:ab_analysis"
    assert kw["name"] == daily["name"] and kw["cron"] == daily["schedules"][0]["cron"]
    assert kw["work_pool_name"] == k8s_objects()[("Secret", "hllm-stack")]["stringData"]["HLLM_WORK_POOL"]
    assert kw["job_variables"]["image"].endswith(":cpu")  # required on the k8s pool (see above)
    serve_cmd = _serve_objects()[("Deployment", "hllm-serve")]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert kw["parameters"]["log_dir"] == _flag(serve_cmd, "--log-dir")
    import inspect

    from flows.ab_analysis import ab_analysis

    assert ab_analysis.name == "ab-analysis"
    assert set(kw["parameters"]) <= set(inspect.signature(ab_analysis.fn).parameters)
