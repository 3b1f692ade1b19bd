"""Real servers on loopback for the tests: ``mlflow server`` (SQLite backend; artifacts proxied to an
S3 endpoint), started, killed and restarted on the same port, as an outage does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """End the process group (the server forks its workers); SIGKILL is a crash, not a shutdown."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class MlflowServer:
    """``mlflow server`` with its store in ``root/server.db`` and artifacts proxied to
    ``s3://<bucket>/mlruns`` at ``s3_endpoint``; ``kill`` + ``start`` is an outage: same port, same store."""

    def __init__(self, root: Path, s3_endpoint: str, bucket: str = "mlflow-art"):
        self.root, self.s3_endpoint, self.bucket = root, s3_endpoint, bucket
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120.0) -> None:
        self.starts += 1
        log = self.root / f"mlflow-server-{self.starts}.log"
        # no job runner: it forks ~5 huey consumers (GenAI features) that only cost CPU and memory here
        env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # fmt: skip
        args = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
                "--artifacts-destination", f"s3://{self.bucket}/mlruns", "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1"]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # fmt: skip
        wait_healthy(f"{self.uri}/health", self.proc, log, timeout)

    def kill(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGKILL)

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)
