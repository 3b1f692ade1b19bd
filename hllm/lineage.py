"""Where a result came from: the code version (git) and the machine (system info)."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def git_commit(cwd: str | Path | None = None) -> tuple[str | None, bool]:
    """(HEAD sha, working tree has uncommitted changes to tracked files); (None, False) outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=cwd, capture_output=True,
                               timeout=30).returncode == 1
        return sha or None, dirty
    except (OSError, subprocess.SubprocessError):
        return None, False


def system_info(world_size: int | None = None, device: str | None = None) -> dict[str, str]:
    """``sys.*`` tags of *this* process. ``device``: "cpu", "cuda" (or "cuda:N"), or None / "auto"
    for what ``train.device: auto`` picks here."""
    import torch

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {
        "sys.python": platform.python_version(),
        "sys.platform": platform.platform(),
        "sys.torch": torch.__version__,
        "sys.device": device,
        "sys.world_size": str(world_size or int(os.environ.get("WORLD_SIZE", "1"))),
        "sys.cpu_count": str(os.cpu_count()),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["sys.gpu"] = torch.cuda.get_device_name(0)
        info["sys.gpu_count"] = str(torch.cuda.device_count())
    try:
        import transformers

        info["sys.transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a hard dependency
        pass
    return info


def code_sha(cwd: str | Path | None = None) -> str | None:
    """Git commit of the code (with ``-dirty`` when the tree has changes), or None outside git."""
    here = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
