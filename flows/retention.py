"""How many nights of local run folders the nightly flow keeps.

Each ``nightly-retrain`` run writes ``<runs_dir>/<run>-<kind>/`` (checkpoints with optimizer state:
~300 MB for the default HLLM), ``<export_dir>/<run>-hllm/`` and ``<reports_dir>/eval/<run>-<kind>/``.
Nothing needs them once the run is over: a registered version carries its own weights, export and
id maps (:mod:`hllm.serving.pyfunc`), and MLflow holds the metrics. So after a successful run the folders of
all but the newest ``keep`` runs are deleted; folders of other run names are never touched.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# nightly-<UTC yyyymmdd-HHMMSS>-<first 8 chars of the flow run id>[-<kind>]
_RUN = re.compile(r"^(nightly-\d{8}-\d{6}-[0-9a-z]{1,8})(?:-[a-z0-9_]+)?$")


def nightly_run(name: str) -> str | None:
    """The run a nightly folder belongs to (``nightly-20261123-020000-1a2b3c4d``), else None."""
    m = _RUN.match(name)
    return m.group(1) if m else None


def prune_nightly_runs(folders: list[str | Path], keep: int) -> list[Path]:
    """Delete the nightly folders (under each of ``folders``) of all but the ``keep`` newest runs;
    returns what was deleted. ``keep <= 0`` keeps everything."""
    if keep <= 0:
        return []
    found: dict[str, list[Path]] = {}
    for parent in map(Path, folders):
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            run = nightly_run(p.name) if p.is_dir() else None
            if run:
                found.setdefault(run, []).append(p)
    old = sorted(found)[:-keep]  # names sort by their UTC timestamp
    removed = []
    for run in old:
        for p in found[run]:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.info("removed the local folders of %d old nightly run(s): %s", len(old), ", ".join(old))
    return removed
