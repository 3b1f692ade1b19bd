"""Where a result came from: the code version (git) and the machine (system info)."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodeVersion:
    """The git commit the code runs from and whether tracked files differ from it (staged or not;
    untracked files do not count). ``sha`` is None outside a git checkout."""

    sha: str | None
    dirty: bool = False

    @property
    def label(self) -> str | None:
        """``<sha>`` or ``<sha>-dirty`` (checkpoint ``meta.json``, Prefect flow versions)."""
        return None if self.sha is None else self.sha + ("-dirty" if self.dirty else "")


def code_version(cwd: str | Path | None = None) -> CodeVersion:
    """The one definition of the code version, for MLflow tags, checkpoints and flows. ``cwd``:
    a folder inside the checkout (default: this package's)."""
    here = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0 or not sha.stdout.strip():
            return CodeVersion(None)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return CodeVersion(sha.stdout.strip(), bool(status.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        return CodeVersion(None)


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
