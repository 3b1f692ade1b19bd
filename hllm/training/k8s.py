"""Training on Kubernetes: submit one run of ``python -m hllm.cli.worker`` as a Kubeflow ``PyTorchJob``
and wait for it (the nightly flow's ``flow.train_backend: k8s``).

What :func:`train` does, through the Kubernetes API (the official ``kubernetes`` client, extra
``hllm[k8s]``; credentials from the pod's service account in a cluster, else a kubeconfig):

1. writes the resolved config as ``params.yaml`` into ConfigMap ``<job>-params`` (created, or
   replaced when it exists), with ``paths.built_dir`` / ``paths.runs_dir`` made absolute: they
   must lie on the shared volume, which the flow and every training pod mount at the same path
   (``flow.k8s.shared_mount``), so the pods read the dataset the flow built and the flow reads
   back the checkpoints the pods wrote (and ``meta.json``'s paths stay valid for both);
2. renders ``infra/k8s/pytorchjob.yaml`` with ``infra/k8s/render.py`` (image, replicas, GPUs,
   ``MLFLOW_RUN_ID`` = the flow's child run, so rank 0 logs its metrics there) and creates the job;
   a job of that name that already exists is waited on when it belongs to the same MLflow run (the
   flow process restarted) and is an error otherwise;
3. makes the job the ConfigMap's owner, so the ConfigMap goes when the job's TTL removes it;
4. polls the job until its ``Succeeded`` or ``Failed`` condition (or ``flow.k8s.timeout_s``, after
   which the job is deleted so it stops holding GPUs) and returns the :class:`~hllm.training.trainer.TrainResult`
   the pods wrote under ``paths.runs_dir``.

A failed or timed-out job raises :class:`K8sError` with the job's conditions and the command for
its logs; the flow then registers nothing, exactly as when local training fails.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import runpy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import yaml

from hllm.config import Config, ConfigError

if TYPE_CHECKING:
    from kubernetes.client import V1ConfigMap

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
PARAMS_KEY = "params.yaml"  # the ConfigMap key the template mounts at /etc/hllm/params.yaml
REPO = Path(__file__).resolve().parents[2]  # the checkout (hllm/training/k8s.py -> .)
# Pods are named <job>-worker-<i> and get a Service of that name: both must stay within 63 characters.
MAX_JOB_NAME = 48
_REQUEST_TIMEOUT = (10, 60)  # connect, read (seconds) of each API call
_API_ATTEMPTS = 5  # transient API errors (5xx, 429, connection) tolerated in a row by one call
_BACKOFF_S = 1.0  # first retry delay of a call; doubles, at most 30 s
_OUTAGE_S = 600.0  # while waiting, an API server that stays unreachable this long fails the run


class K8sError(RuntimeError):
    """Submitting or running the training job failed; the message says where and why."""


class ApiUnavailable(K8sError):
    """The API server did not answer (connection error, 5xx, 429) after the call's retries."""


@dataclass
class Submission:
    namespace: str
    job: str
    configmap: str
    adopted: bool = False  # the job existed already (same MLflow run) and was waited on, not created
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.job}"

    def logs_hint(self) -> str:
        return f"kubectl -n {self.namespace} logs {self.job}-master-0"


# --------------------------------------------------------------------------- config -> objects


def _resolve_file(path: str, what: str) -> Path:
    """A repository file: relative to the working directory (a flow run's checkout, /app in the
    image), else to the checkout this package is installed from."""
    p = Path(path)
    for cand in [p] if p.is_absolute() else [Path.cwd() / p, REPO / p]:
        if cand.is_file():
            return cand
    raise ConfigError(f"{what}: {path} not found (relative to {Path.cwd()} or {REPO})")


def job_name(prefix: str, run_name: str) -> str:
    """``<prefix>-<run_name>`` as a DNS-1035 label short enough for the pods' names."""
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{prefix}-{run_name}".lower())).strip("-")
    if not name[:1].isalpha():
        name = "j-" + name
    if len(name) > MAX_JOB_NAME:  # keep it unique: the run name's hash replaces the cut-off tail
        digest = hashlib.sha1(run_name.encode()).hexdigest()[:8]
        name = name[: MAX_JOB_NAME - 9].rstrip("-") + "-" + digest
    return name


def _on_volume(path: str | Path, mount: Path) -> bool:
    try:
        Path(path).resolve().relative_to(mount)
        return True
    except ValueError:
        return False


def check(cfg: Config) -> None:
    """Everything that can be checked before any data is touched: settings, the shared volume as
    this process sees it, the template, the client library. Raises ``ConfigError`` naming the key."""
    kc = cfg.flow.k8s
    if not kc.image:
        raise ConfigError(
            "flow.k8s.image is empty: set it to the CUDA image built from infra/Dockerfile "
            "(e.g. registry.example.com/ml/hllm:cuda)"
        )
    for key, value, low in (
        ("workers", kc.workers, 0),
        ("gpus_per_node", kc.gpus_per_node, 1),
        ("cpus_per_node", kc.cpus_per_node, 1),
    ):
        if value < low:
            raise ConfigError(f"flow.k8s.{key} must be >= {low}, got {value}")
    if kc.poll_s <= 0 or kc.timeout_s <= 0:
        raise ConfigError(f"flow.k8s.poll_s and flow.k8s.timeout_s must be > 0, got {kc.poll_s}, {kc.timeout_s}")
    mount = Path(kc.shared_mount)
    if not mount.is_absolute():
        raise ConfigError(f"flow.k8s.shared_mount must be an absolute path, got {kc.shared_mount!r}")
    if not mount.is_dir():
        raise ConfigError(
            f"flow.k8s.shared_mount={mount} is not a folder here: the flow must see the shared "
            f"volume (claim {kc.shared_pvc}) at the path the training pods mount it (the hllm-k8s "
            "work pool's job template mounts it at /shared)"
        )
    mount = mount.resolve()
    for key in ("built_dir", "runs_dir"):
        value = getattr(cfg.paths, key)
        if not _on_volume(value, mount):
            raise ConfigError(
                f"paths.{key}={value} is not on the shared volume {mount} (flow.k8s.shared_mount): "
                f"the training pods could not see it; set e.g. paths.{key}: "
                f"{mount / 'hllm' / ('data/built' if key == 'built_dir' else 'runs')}"
            )
    try:
        import kubernetes  # noqa: F401
    except ImportError as e:
        raise ConfigError("flow.train_backend=k8s needs the Kubernetes client: pip install 'hllm[k8s]'") from e
    manifest(cfg, job_name(kc.job_prefix, cfg.train.run_name), "check-params", "")  # template errors now


def job_params(cfg: Config) -> str:
    """The ``params.yaml`` every rank loads: the resolved config with absolute paths (the pods'
    working directory is the image's, not the flow's)."""
    c = copy.deepcopy(cfg)
    for key in ("raw_dir", "built_dir", "reports_dir", "runs_dir", "export_dir"):
        setattr(c.paths, key, str(Path(getattr(c.paths, key)).resolve()))
    item = c.model.item.path
    if (
        item
        and not item.startswith("pkg:")
        and Path(item).is_absolute()
        and not _on_volume(item, Path(cfg.flow.k8s.shared_mount).resolve())
    ):
        log.warning("model.item.path=%s is outside the shared volume: the training image must have it", item)
    return yaml.safe_dump(c.to_dict(), sort_keys=False)


def manifest(cfg: Config, job: str, configmap: str, mlflow_run_id: str) -> dict[str, Any]:
    """The PyTorchJob object: ``flow.k8s.template`` rendered by ``infra/k8s/render.py``."""
    kc = cfg.flow.k8s
    render = runpy.run_path(str(_resolve_file("infra/k8s/render.py", "the template renderer")))["render"]
    values = {
        "JOB_NAME": job,
        "IMAGE": kc.image,
        "PARAMS_CONFIGMAP": configmap,
        "NAMESPACE": kc.namespace,
        "WORKERS": str(kc.workers),
        "GPUS_PER_NODE": str(kc.gpus_per_node),
        "CPUS_PER_NODE": str(kc.cpus_per_node),
        "MEMORY_PER_NODE": kc.memory_per_node,
        "SHARED_PVC": kc.shared_pvc,
        "SHARED_MOUNT": kc.shared_mount,
        "STACK_SECRET": kc.stack_secret,
        "MLFLOW_RUN_ID": mlflow_run_id,
    }
    try:
        doc = yaml.safe_load(render(_resolve_file(kc.template, "flow.k8s.template"), values, environ={}))
    except ValueError as e:
        raise ConfigError(f"flow.k8s: {e}") from None
    if kc.workers == 0:  # master only: a Worker spec with 0 replicas is not a valid replica spec
        doc["spec"]["pytorchReplicaSpecs"].pop("Worker", None)
    return doc


def _configmap(cfg: Config, name: str, job: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": cfg.flow.k8s.namespace,
            "labels": {"app.kubernetes.io/part-of": "hllm", "hllm/job": job},
        },
        "data": {PARAMS_KEY: job_params(cfg)},
    }


# --------------------------------------------------------------------------- API access


def api_client(cfg: Config):
    """A ``kubernetes.client.ApiClient``: ``flow.k8s.kubeconfig`` when set; the pod's service account
    inside a cluster; else ``$KUBECONFIG`` / ``~/.kube/config``."""
    from kubernetes import client, config

    kc = cfg.flow.k8s
    try:
        if not kc.kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
            conf = client.Configuration()
            config.load_incluster_config(client_configuration=conf)
            return client.ApiClient(conf)
        return config.new_client_from_config(
            config_file=kc.kubeconfig or None, context=kc.context or None, persist_config=False
        )
    except config.ConfigException as e:
        raise K8sError(
            f"no Kubernetes credentials ({e}): run the flow in the cluster (service account "
            "hllm-flow) or set flow.k8s.kubeconfig / $KUBECONFIG"
        ) from None


def _api_error(e: Exception) -> tuple[int | None, str]:
    """(HTTP status or None, the server's message) of a client exception."""
    import json

    status = getattr(e, "status", None)
    body = getattr(e, "body", None)
    msg = ""
    if body:
        try:
            msg = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            msg = str(body)[:500]
    return status, msg or getattr(e, "reason", None) or str(e)


def _transient(status: int | None) -> bool:
    return status in (None, 0, 429) or (status is not None and status >= 500)


def _call(fn: Callable[[], Any], what: str) -> Any:
    """One API call; transient failures (5xx, 429, no connection) retried with back-off and, when
    they persist, raised as :class:`ApiUnavailable`; other API errors go to the caller as they are
    (it handles 404/409 or explains them with :func:`_explain`)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    for attempt in range(1, _API_ATTEMPTS + 1):
        try:
            return fn()
        except (ApiException, HTTPError, OSError) as e:
            status, msg = _api_error(e) if isinstance(e, ApiException) else (None, str(e))
            if _transient(status) and attempt < _API_ATTEMPTS:
                log.warning("%s: %s (attempt %d/%d, retrying)", what, msg, attempt, _API_ATTEMPTS)
                time.sleep(min(_BACKOFF_S * 2 ** (attempt - 1), 30.0))
                continue
            if isinstance(e, ApiException) and not _transient(status):
                raise  # the caller handles 404/409 or explains it
            raise ApiUnavailable(f"{what}: the Kubernetes API did not answer ({msg})") from None
    raise AssertionError("unreachable")


def _explain(e: Exception, what: str) -> K8sError:
    status, msg = _api_error(e)
    hint = {
        401: "the API refused the credentials",
        403: "the flow's service account lacks a permission (Role hllm-flow in infra/k8s/prefect-worker.yaml)",
        404: "no such namespace, or no PyTorchJob kind: install the Kubeflow Training Operator (kubeflow.org/v1)",
    }.get(status or 0, "")
    return K8sError(f"{what}: HTTP {status}: {msg}" + (f" ({hint})" if hint else ""))


# --------------------------------------------------------------------------- submit and wait


def _run_id_of(job: dict[str, Any]) -> str | None:
    for spec in (job.get("spec", {}).get("pytorchReplicaSpecs") or {}).values():
        for c in spec.get("template", {}).get("spec", {}).get("containers", []):
            for env in c.get("env") or []:
                if env.get("name") == "MLFLOW_RUN_ID":
                    return env.get("value")
    return None


def submit(cfg: Config, mlflow_run_id: str, api) -> Submission:
    """Create (or replace) the params ConfigMap and create the PyTorchJob; see the module docstring."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    kc = cfg.flow.k8s
    ns = kc.namespace
    job = job_name(kc.job_prefix, cfg.train.run_name)
    sub = Submission(ns, job, f"{job}-params", manifest=manifest(cfg, job, f"{job}-params", mlflow_run_id))
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    body = _configmap(cfg, sub.configmap, job)
    # the client's pydantic validate_call builds the V1ConfigMap from this dict; its signature admits only the model
    cm_body = cast("V1ConfigMap", body)
    try:
        try:
            _call(
                lambda: core.create_namespaced_config_map(ns, cm_body, _request_timeout=_REQUEST_TIMEOUT),
                f"creating ConfigMap {ns}/{sub.configmap}",
            )
        except ApiException as e:
            if e.status != 409:
                raise
            _call(
                lambda: core.replace_namespaced_config_map(
                    sub.configmap, ns, cm_body, _request_timeout=_REQUEST_TIMEOUT
                ),
                f"replacing ConfigMap {ns}/{sub.configmap}",
            )
    except ApiException as e:
        raise _explain(e, f"writing ConfigMap {ns}/{sub.configmap}") from None

    try:
        created = _call(
            lambda: custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, sub.manifest, _request_timeout=_REQUEST_TIMEOUT
            ),
            f"creating {KIND} {sub.ref}",
        )
    except ApiException as e:
        if e.status != 409:
            raise _explain(e, f"creating {KIND} {sub.ref}") from None
        created = get_job(api, ns, job)
        owner = _run_id_of(created)
        if owner != mlflow_run_id:
            raise K8sError(
                f"{KIND} {sub.ref} already exists for another MLflow run ({owner or 'none'}): delete it "
                f"(kubectl -n {ns} delete pytorchjob {job}) or use another train.run_name"
            ) from None
        log.info("%s %s already exists for this MLflow run: waiting on it", KIND, sub.ref)
        sub.adopted = True

    # The job owns the ConfigMap: both go when the job's ttlSecondsAfterFinished removes it.
    body["metadata"]["ownerReferences"] = [
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": job, "uid": created["metadata"]["uid"]}
    ]
    try:
        _call(
            lambda: core.replace_namespaced_config_map(sub.configmap, ns, cm_body, _request_timeout=_REQUEST_TIMEOUT),
            f"setting the owner of ConfigMap {ns}/{sub.configmap}",
        )
    except (ApiException, K8sError) as e:
        log.warning("ConfigMap %s/%s keeps no owner (delete it by hand later): %s", ns, sub.configmap, e)
    return sub


def get_job(api, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api)
    try:
        return _call(
            lambda: custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=_REQUEST_TIMEOUT
            ),
            f"reading {KIND} {namespace}/{name}",
        )
    except ApiException as e:
        if e.status == 404:
            raise K8sError(f"{KIND} {namespace}/{name} is gone (deleted while the flow waited on it?)") from None
        raise _explain(e, f"reading {KIND} {namespace}/{name}") from None


def delete_job(api, namespace: str, name: str) -> None:
    from kubernetes import client

    _call(
        lambda: client.CustomObjectsApi(api).delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background", _request_timeout=_REQUEST_TIMEOUT
        ),
        f"deleting {KIND} {namespace}/{name}",
    )


def conditions(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list((job.get("status") or {}).get("conditions") or [])


def phase(job: dict[str, Any]) -> str:
    """``Succeeded`` / ``Failed`` once finished, else the newest true condition (``Created``,
    ``Running``, ``Restarting``), or ``Pending`` before the operator has seen the job."""
    conds = [c for c in conditions(job) if str(c.get("status")) == "True"]
    for final in ("Failed", "Succeeded"):
        if any(c.get("type") == final for c in conds):
            return final
    return conds[-1]["type"] if conds else "Pending"


def describe(job: dict[str, Any]) -> str:
    """The job's conditions and replica counts, for logs and errors."""
    parts = []
    for c in conditions(job):
        text = f"{c.get('type')}={c.get('status')}"
        detail = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
        parts.append(text + (f" ({detail})" if detail else ""))
    replicas = (job.get("status") or {}).get("replicaStatuses") or {}
    if replicas:
        parts.append(
            "replicas "
            + ", ".join(
                f"{role} " + "/".join(f"{k} {v}" for k, v in sorted(st.items()) if isinstance(v, int))
                for role, st in sorted(replicas.items())
            )
        )
    return "; ".join(parts) or "no conditions yet"


def wait(
    cfg: Config,
    sub: Submission,
    api,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Poll the job until it succeeds (returns it) or fails / times out (raises ``K8sError``)."""
    kc = cfg.flow.k8s
    deadline = clock() + kc.timeout_s
    last, down_since, job = None, None, {}
    while True:
        try:
            job = get_job(api, sub.namespace, sub.job)
            down_since = None
        except ApiUnavailable as e:
            # The job runs on without us: an API server restart must not fail hours of training.
            down_since = clock() if down_since is None else down_since
            if clock() - down_since > _OUTAGE_S or clock() >= deadline:
                raise
            log.warning("%s (still waiting on %s)", e, sub.ref)
            sleep(kc.poll_s)
            continue
        state = phase(job)
        if state != last:
            log.info("%s %s: %s", KIND, sub.ref, state)
            last = state
        if state == "Succeeded":
            return job
        if state == "Failed":
            raise K8sError(f"training failed: {KIND} {sub.ref} failed: {describe(job)}. Logs: {sub.logs_hint()}")
        if clock() >= deadline:
            try:
                delete_job(api, sub.namespace, sub.job)
                fate = "deleted it"
            except Exception as e:  # noqa: BLE001 - the timeout is the error to report
                fate = f"could not delete it ({e})"
            raise K8sError(
                f"training failed: {KIND} {sub.ref} did not finish within {kc.timeout_s:.0f} s "
                f"(flow.k8s.timeout_s), {fate}; last state: {describe(job)}. Logs: {sub.logs_hint()}"
            )
        sleep(max(0.01, min(kc.poll_s, deadline - clock())))  # one last look at the deadline


def train(cfg: Config, mlflow_run_id: str, api=None):
    """Run ``cfg``'s training as a PyTorchJob and return ``(TrainResult, Submission)``; the result's
    checkpoints are on the shared volume, where this process reads them too."""
    from hllm.training.trainer import TrainResult

    check(cfg)
    own = api is None
    api = api_client(cfg) if own else api
    kc = cfg.flow.k8s
    try:
        sub = submit(cfg, mlflow_run_id, api)
        log.info(
            "%s %s submitted: %d node(s) x %d GPU(s), image %s; logs: %s",
            KIND,
            sub.ref,
            kc.workers + 1,
            kc.gpus_per_node,
            kc.image,
            sub.logs_hint(),
        )
        wait(cfg, sub, api)
    finally:
        if own:
            api.close()
    run_dir = Path(cfg.paths.runs_dir).resolve() / cfg.train.run_name
    if not (run_dir / "result.json").is_file():
        raise K8sError(
            f"{KIND} {sub.ref} succeeded but {run_dir}/result.json is missing: does the flow see the "
            f"volume the pods write to at flow.k8s.shared_mount={kc.shared_mount}?"
        )
    return TrainResult.load(run_dir), sub
