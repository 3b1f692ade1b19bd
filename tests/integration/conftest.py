"""The local production stack (infra/local-stack.sh) as a session fixture for the integration tests.

The stack is started once per session in its own state dir, so a developer's own `.stack/` is never
touched, and stopped at the end even when tests fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "local-stack.sh"


def read_env_file(path: Path) -> dict[str, str]:
    """`export KEY=VALUE` lines of the stack's env file (values never need quoting: urlsafe secrets)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export ") :].split("=", 1)
            env[key] = value
    return env


@dataclass
class Stack:
    state: Path
    env: dict[str, str]  # what `source .stack/env` exports

    def environ(self, **extra: str) -> dict[str, str]:
        """A full process environment pointing at the stack, as a user's shell would have it."""
        env = {**os.environ, **self.env, **extra}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, *args: str, cwd: Path | None = None, timeout: float = 300, **extra: str):
        """Run a command with the stack's environment; fail with its output when it fails."""
        proc = subprocess.run(args, cwd=cwd, env=self.environ(**extra), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc


def _script(cmd: str, state: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HLLM_STACK_DIR": str(state), "HLLM_VENV": str(Path(sys.executable).parent.parent)}
    return subprocess.run(["bash", str(SCRIPT), cmd], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    state = tmp_path_factory.mktemp("stack")
    up = _script("up", state, timeout=600)
    try:
        if up.returncode != 0:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((state / "logs").glob("*.log")))
            pytest.fail(f"local-stack.sh up failed ({up.returncode}):\n{up.stderr}\n{logs}")
        yield Stack(state=state, env=read_env_file(state / "env"))
    finally:
        down = _script("down", state, timeout=180)
        if down.returncode != 0:
            print(f"local-stack.sh down failed:\n{down.stderr}", file=sys.stderr)


@pytest.fixture
def stack_env(stack: Stack, monkeypatch) -> Stack:
    """The stack's variables in this process's environment for one test (mlflow/boto3 read them)."""
    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    return stack
