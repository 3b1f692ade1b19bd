"""A journal that makes "publish a snapshot -> ``dvc add`` -> ``dvc push``" atomic as the next run sees it.

The nightly flow changes three things for a new data version, one after the other: ``data/raw``
(the swap), ``data.dvc`` (``dvc commit``) and the DVC remote (``dvc push``). A crash between any
two of them would leave a mix: new tables under an old ``data.dvc``, or a ``data.dvc`` naming a
version the remote lacks. So before it touches anything the flow writes a pending marker
(``<raw_dir parent>/.publish-pending.json``: flow run, the staged folder, ``data.dvc``'s md5 then),
and removes it only once the push succeeded. The next run, holding the slot, calls :func:`recover`
first; when a marker is there the previous run died (or failed) in between, and:

1. an interrupted swap is undone (:func:`hllm.data.raw.recover_dir`) and the dead run's staged
   folder deleted;
2. **roll back** ``data/raw`` to the version ``data.dvc`` names, with ``dvc checkout --force``
   from the local cache (``dvc pull`` when the cache lacks it): whichever of old or new
   ``data.dvc`` the crash left, ``data/raw`` matches it afterwards;
3. **roll forward** the remote: ``dvc push`` of that ``data.dvc``, so the remote never lacks the
   version ``data.dvc`` names (DVC uploads a directory's ``.dir`` manifest only after all of its
   files, so a remote never lists a version with files missing, even mid-push).

Why roll ``data/raw`` back rather than forward (``dvc add`` the new tables): the new snapshot's
validation report died with the run that made it (a version must never exist without its
evidence), the version ``data.dvc`` names is always in the local cache (``dvc commit`` writes the
cache before ``data.dvc``), and the rerun stages, validates and publishes its own snapshot anyway.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from hllm.config import Config
from hllm.data import versioning

log = logging.getLogger(__name__)

MARKER = ".publish-pending.json"


def marker_path(cfg: Config) -> Path:
    return Path(cfg.paths.raw_dir).parent / MARKER


def _write(path: Path, state: dict[str, Any]) -> None:
    """Write the marker atomically (tmp + fsync + rename): a crash leaves the old one or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(state, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _current_md5(repo: str | Path = ".") -> str | None:
    try:
        return versioning.read_version(repo=repo).md5
    except Exception:  # noqa: BLE001 - no data.dvc yet, or one without a hash: no version to roll back to
        return None


def begin(cfg: Config, owner: str) -> Path:
    """Record that ``owner`` (a flow run) is about to stage and publish a new data version."""
    p = marker_path(cfg)
    _write(p, {"owner": owner, "pid": os.getpid(), "started": time.time(), "dvc_md5_before": _current_md5()})
    return p


def note(cfg: Config, **fields: Any) -> None:
    """Add fields to the pending marker (e.g. the staged folder once it exists)."""
    p = marker_path(cfg)
    state = read(cfg) or {}
    _write(p, {**state, **fields})


def read(cfg: Config) -> dict[str, Any] | None:
    p = marker_path(cfg)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # torn by a crash mid-write (the rename makes this unlikely)
        log.warning("%s unreadable (%s): treating it as pending", p, e)
        return {}


def finish(cfg: Config) -> None:
    """The version is published, recorded and pushed (or nothing was published): clear the marker."""
    marker_path(cfg).unlink(missing_ok=True)


def recover(cfg: Config, remote: str | None = None, repo: str | Path = ".") -> list[str]:
    """Bring ``raw_dir``, ``data.dvc`` and the remote back into agreement after a crash (see the
    module docstring). Call it while holding the nightly slot, so no live run is mid-publish.
    Returns what was done (empty: nothing to recover)."""
    from hllm.data.raw import recover_dir

    done = []
    raw = Path(repo) / cfg.paths.raw_dir
    what = recover_dir(raw)
    if what:
        done.append(what)
    state = read(cfg)
    if state is None:
        return done
    staged = state.get("staged")
    if staged and Path(staged).name.startswith(".") and Path(staged).exists():  # only our hidden staging folders
        shutil.rmtree(staged, ignore_errors=True)
        done.append(f"deleted the staged snapshot {staged} of {state.get('owner', 'a dead run')}")
    md5 = _current_md5(repo)
    if md5 is None:
        done.append("no data version recorded yet (first run): nothing to roll back to")
    else:
        proc = versioning.dvc("checkout", "--force", "--quiet", versioning.DVC_FILE, repo=repo, check=False)
        if proc.returncode != 0:
            versioning.pull(remote=remote, repo=repo)  # the cache lacks it: from the remote
        done.append(f"{cfg.paths.raw_dir} rolled back to data.dvc's version {md5}")
        try:
            versioning.push(remote=remote, repo=repo)
            done.append(f"version {md5} pushed to {remote or 'the default remote'}")
        except versioning.VersioningError as e:  # the remote is down: keep the marker, the next run retries
            log.warning("could not push data version %s while recovering: %s", md5, e)
            done.append(f"version {md5} NOT pushed (remote unavailable; the next run retries)")
            for line in done:
                log.warning("crash recovery: %s", line)
            return done
    finish(cfg)
    for line in done:
        log.warning("crash recovery: %s", line)
    return done
