"""A fake Kubernetes API server on 127.0.0.1 for the ``train_backend: k8s`` tests.

Why a fake: no Kubernetes cluster can run on these machines (no Docker, no kind, no kubelet), so
the Kubeflow Training Operator cannot either. The client side is real: ``hllm.training.k8s`` talks to this
server through the official ``kubernetes`` client, with a kubeconfig and a bearer token, over HTTP.

It implements only what ``hllm.training.k8s`` calls, with the API's paths, status codes and ``Status``
bodies: create / read / replace ConfigMaps, create / read / delete PyTorchJobs. In ``run`` mode it
also plays the operator and the kubelet, minimally: each replica of a new job becomes a process
running the container's command (``torchrun`` as ``python -m torch.distributed.run``) with the
container's environment plus the ``PET_*`` variables the operator sets (nodes, node rank, ranks
per node, master address and port); a ConfigMap volume is written to a folder and the container's
arguments follow its mount path there; a claim is served from the host folder registered for it,
which must be the path the pod mounts it at (so the job's paths mean the same here and "in the
pod"). The job's conditions go Created -> Running -> Succeeded, or Failed when a replica exits
non-zero (no restarts: ``restartPolicy`` and ``backoffLimit`` are not simulated). ``hold`` mode
leaves a job Running until it is deleted (timeouts).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

_ROUTES = [
    ("configmaps", re.compile(r"^/api/v1/namespaces/(?P<ns>[a-z0-9-]+)/configmaps(?:/(?P<name>[a-z0-9.-]+))?$")),
    (
        "pytorchjobs",
        re.compile(r"^/apis/kubeflow\.org/v1/namespaces/(?P<ns>[a-z0-9-]+)/pytorchjobs(?:/(?P<name>[a-z0-9.-]+))?$"),
    ),
]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeKube:
    def __init__(self, state_dir: Path, workdir: Path, mode: str = "run", token: str = "fake-token"):
        self.state_dir, self.workdir, self.mode, self.token = Path(state_dir), Path(workdir), mode, token
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, namespace, name) -> object
        self.requests: list[tuple[str, str]] = []  # (method, path), in order
        self.claims: dict[str, Path] = {}  # PersistentVolumeClaim name -> host folder
        self.secrets: dict[str, dict[str, str]] = {}  # Secret name -> data (envFrom)
        self.unavailable = 0  # answer the next N requests with 503 (an API server restarting)
        self.pods: dict[str, list[subprocess.Popen]] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ server

    def __enter__(self) -> "FakeKube":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                fake._dispatch(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            for procs in self.pods.values():
                for p in procs:
                    if p.poll() is None:
                        p.kill()
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "flow", "user": {"token": self.token}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "flow", "namespace": "hllm"}}],
                }
            )
        )
        return path

    def get(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            obj = self.objects.get((plural, ns, name))
            return json.loads(json.dumps(obj)) if obj else None

    def of_kind(self, plural: str) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(json.dumps(o)) for (p, _, _), o in self.objects.items() if p == plural]

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        with self._lock:
            self.requests.append((h.command, path))
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._reply(h, 401, self._status(401, "Unauthorized", "Unauthorized"))
        with self._lock:
            if self.unavailable > 0:
                self.unavailable -= 1
                return self._reply(h, 503, self._status(503, "ServiceUnavailable", "the fake is restarting"))
        for plural, rx in _ROUTES:
            m = rx.match(path)
            if m:
                code, obj = self._serve(h.command, plural, m.group("ns"), m.group("name"), body)
                return self._reply(h, code, obj)
        self._reply(h, 404, self._status(404, "NotFound", f"the fake API does not serve {h.command} {path}"))

    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure" if code >= 400 else "Success",
            "message": message,
            "reason": reason,
            "code": code,
        }

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, code: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _serve(self, method: str, plural: str, ns: str, name: str | None, body: Any) -> tuple[int, dict]:
        with self._lock:
            if method == "POST" and name is None:
                name = body["metadata"]["name"]
                if (plural, ns, name) in self.objects:
                    return 409, self._status(409, "AlreadyExists", f'{plural} "{name}" already exists')
                body["metadata"].update(
                    namespace=ns, uid=str(uuid.uuid4()), resourceVersion="1", creationTimestamp=_now()
                )
                if plural == "pytorchjobs":
                    body["status"] = {
                        "conditions": [self._cond("Created", "PyTorchJobCreated", f"PyTorchJob {name} is created.")]
                    }
                self.objects[(plural, ns, name)] = body
                if plural == "pytorchjobs" and self.mode == "run":
                    threading.Thread(target=self._run_job, args=(ns, name), daemon=True).start()
                elif plural == "pytorchjobs":  # hold
                    self._set_status(ns, name, "Running", "PyTorchJobRunning", f"PyTorchJob {name} is running.")
                return 201, body
            obj = self.objects.get((plural, ns, name or ""))
            if obj is None:
                return 404, self._status(404, "NotFound", f'{plural} "{name}" not found')
            if method == "GET":
                return 200, obj
            if method == "PUT":
                body["metadata"].update(
                    namespace=ns,
                    uid=obj["metadata"]["uid"],
                    resourceVersion=str(int(obj["metadata"]["resourceVersion"]) + 1),
                    creationTimestamp=obj["metadata"]["creationTimestamp"],
                )
                self.objects[(plural, ns, name)] = body
                return 200, body
            if method == "DELETE":
                del self.objects[(plural, ns, name)]
                for p in self.pods.pop(name, []):
                    if p.poll() is None:
                        p.kill()
                return 200, self._status(200, "", "deleted")
        return 405, self._status(405, "MethodNotAllowed", f"the fake does not implement {method} on {plural}")

    # ------------------------------------------------------------------ the operator + kubelet

    @staticmethod
    def _cond(type_: str, reason: str, message: str, status: str = "True") -> dict[str, str]:
        return {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastUpdateTime": _now(),
            "lastTransitionTime": _now(),
        }

    def _set_status(
        self,
        ns: str,
        name: str,
        type_: str,
        reason: str,
        message: str,
        replicas: dict[str, dict[str, int]] | None = None,
    ) -> None:
        with self._lock:
            job = self.objects.get(("pytorchjobs", ns, name))
            if job is None:  # deleted meanwhile
                return
            conds = job["status"]["conditions"]
            if type_ in ("Succeeded", "Failed"):
                for c in conds:
                    if c["type"] == "Running":
                        c["status"] = "False"
            conds.append(self._cond(type_, reason, message))
            if replicas is not None:
                job["status"]["replicaStatuses"] = replicas

    def _run_job(self, ns: str, name: str) -> None:
        job = self.get("pytorchjobs", ns, name)
        specs = job["spec"]["pytorchReplicaSpecs"]
        roles = [(role, i) for role in ("Master", "Worker") for i in range(specs.get(role, {}).get("replicas", 0))]
        port, logs = _free_port(), self.state_dir / name
        logs.mkdir(parents=True, exist_ok=True)
        procs, problem = [], None
        for node_rank, (role, i) in enumerate(roles):
            try:
                cmd, env, cwd = self._container(ns, name, specs[role]["template"]["spec"], logs / f"{role}-{i}")
            except ValueError as e:  # a pod that cannot start (missing ConfigMap, claim)
                problem = str(e)
                break
            env.update(
                PET_NNODES=str(len(roles)),
                PET_NODE_RANK=str(node_rank),
                PET_NPROC_PER_NODE=str(job["spec"]["nprocPerNode"]),
                PET_MASTER_ADDR="127.0.0.1",
                PET_MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
            )  # 1 thread: the test machine has 2 cores
            with open(logs / f"{role.lower()}-{i}.log", "w") as out:  # the child keeps its own descriptor
                procs.append((role, subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)))
        with self._lock:
            self.pods[name] = [p for _, p in procs]
        if problem:
            for _, p in procs:
                p.kill()
            self._set_status(ns, name, "Failed", "PodStartFailed", problem)
            return
        self._set_status(
            ns,
            name,
            "Running",
            "PyTorchJobRunning",
            f"PyTorchJob {name} is running.",
            {r: {"active": sum(1 for x, _ in procs if x == r)} for r in specs},
        )
        failed: dict[str, int] = {}
        while any(p.poll() is None for _, p in procs):
            if any(p.poll() not in (None, 0) for _, p in procs):  # one replica failed: the others would hang
                time.sleep(1.0)
                for _, p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.1)
        for role, p in procs:
            if p.wait() != 0:
                failed[role] = failed.get(role, 0) + 1
        counts = {
            r: {"succeeded": sum(1 for x, p in procs if x == r and p.returncode == 0), "failed": failed.get(r, 0)}
            for r in specs
        }
        if failed:
            role, n = next(iter(failed.items()))
            self._set_status(
                ns,
                name,
                "Failed",
                "PyTorchJobFailed",
                f"PyTorchJob {name} is failed because {n} {role} replica(s) failed.",
                counts,
            )
        else:
            self._set_status(
                ns, name, "Succeeded", "PyTorchJobSucceeded", f"PyTorchJob {name} is successfully completed.", counts
            )

    def _container(self, ns: str, job: str, pod: dict[str, Any], vol_dir: Path):
        """(argv, env, cwd) of the pod's first container, its volumes set up as described above."""
        import os

        c = pod["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        remap: dict[str, str] = {}
        for vol in pod.get("volumes", []):
            if "configMap" in vol:
                cm = self.get("configmaps", ns, vol["configMap"]["name"])
                if cm is None:
                    raise ValueError(f'configmap "{vol["configMap"]["name"]}" not found')
                d = vol_dir / vol["name"]
                d.mkdir(parents=True, exist_ok=True)
                for key, text in cm.get("data", {}).items():
                    (d / key).write_text(text)
                remap[mounts[vol["name"]]] = str(d)
            elif "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                host = self.claims.get(claim)
                if host is None:
                    raise ValueError(f'persistentvolumeclaim "{claim}" not found')
                if Path(mounts[vol["name"]]) != host:
                    raise ValueError(
                        f"the fake serves claim {claim} only at its host path {host}, not at {mounts[vol['name']]}"
                    )
        argv = list(c.get("command", [])) + list(c.get("args", []))
        if argv and argv[0] == "torchrun":
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        for mount, host in remap.items():
            argv = [host + a[len(mount) :] if a.startswith(mount + "/") else a for a in argv]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
        for ref in c.get("envFrom", []):
            secret = ref["secretRef"]["name"]
            if secret not in self.secrets:
                raise ValueError(f'secret "{secret}" not found')
            env.update(self.secrets[secret])
        env.update({e["name"]: str(e.get("value", "")) for e in c.get("env", [])})
        return argv, env, self.workdir
