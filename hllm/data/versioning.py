"""Dataset versions with DVC: record, push and bring back the raw data.

``data.dvc`` (repo root) tracks ``data/raw``; its ``md5`` is the dataset
version that MLflow runs record as lineage. A version is made by
:func:`add_and_push` (hash the folder into the DVC cache, rewrite ``data.dvc``,
upload to the remote) and brought back by checking out an old ``data.dvc``
and :func:`pull`. Commit ``data.dvc`` to git after :func:`add_and_push`:
the commit is what names the version.

DVC is driven through its command line (``python -m dvc``), its stable
interface; each call costs about half a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from hllm.config import Config
from hllm.data.errors import DataError

log = logging.getLogger(__name__)

DVC_FILE = "data.dvc"


class VersioningError(RuntimeError):
    """A DVC command failed; the message carries its output."""


@dataclass
class DvcRecord:
    md5: str  # the version: DVC's directory hash, e.g. "3f2c...e1.dir"
    path: str  # tracked path, relative to the .dvc file
    size: int | None
    nfiles: int | None
    dvc_file: Path


def dvc(*args: str, repo: str | Path = ".", check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "ITERATIVE_DO_NOT_TRACK": "1"}
    # through hllm.data.dvc_child: the DVC process dies with this one (a SIGKILLed flow leaves no
    # DVC writer behind), and it carries the failpoints inside DVC (hllm.faults)
    cmd = [sys.executable, "-m", "hllm.data.dvc_child", *args]
    proc = subprocess.run(cmd, cwd=repo, env=env, text=True, capture_output=True)
    if check and proc.returncode != 0:
        out = (proc.stderr or proc.stdout).strip()[-2000:]
        raise VersioningError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}) in {repo}:\n{out}")
    return proc


STACK_REMOTE_URL_ENV = "HLLM_DVC_REMOTE_URL"
STACK_REMOTE = "s3"  # the shared stack's remote, committed in .dvc/config


def choose_remote(configured: str = "", repo: str | Path = ".") -> str | None:
    """The DVC remote a data version goes to (and comes back from); first match wins:

    1. ``configured`` (``flow.dvc_remote``, or ``--remote`` of ``hllm data push|pull``): a remote name;
    2. ``$HLLM_DVC_REMOTE_URL`` set (the shared stack, ``infra/client.env.example``): remote ``s3``,
       pointed at that URL in the git-ignored ``.dvc/config.local`` when it differs from what
       ``.dvc/config`` says (added there when the repository has no remote ``s3``); its endpoint and
       keys come from the environment (``AWS_ENDPOINT_URL[_S3]``, ``AWS_ACCESS_KEY_ID``, ...);
    3. ``None``: DVC's default remote (``core.remote`` of ``.dvc/config``, ``local`` in this repository).
    """
    if configured:
        return configured
    url = os.environ.get(STACK_REMOTE_URL_ENV, "").strip()
    if not url:
        return None
    current = dvc("config", f"remote.{STACK_REMOTE}.url", repo=repo, check=False).stdout.strip()  # all levels
    if not current:
        dvc("remote", "add", "--local", STACK_REMOTE, url, repo=repo)
    elif current != url:
        dvc("remote", "modify", "--local", STACK_REMOTE, "url", url, repo=repo)
    return STACK_REMOTE


def read_version(dvc_file: str | Path = DVC_FILE, repo: str | Path = ".") -> DvcRecord:
    p = Path(repo) / dvc_file
    if not p.exists():
        raise DataError(f"{p}: no such DVC file; run `hllm data push` to create the first version")
    try:
        outs = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("outs") or []
        out = outs[0]
    except (yaml.YAMLError, IndexError, AttributeError) as e:
        raise DataError(f"{p}: not a DVC file with one output ({e})") from e
    if not out.get("md5"):
        raise DataError(f"{p}: output {out.get('path')!r} has no hash yet; run `hllm data push`")
    return DvcRecord(out["md5"], out["path"], out.get("size"), out.get("nfiles"), p)


def add(raw_dir: str | Path = "data/raw", dvc_file: str | Path = DVC_FILE, repo: str | Path = ".") -> DvcRecord:
    """Hash ``raw_dir`` into the DVC cache and record it in ``dvc_file`` (created when missing).

    ``dvc add`` would name the file ``data/raw.dvc``; writing the stub and
    running ``dvc commit`` keeps the project's ``data.dvc`` at the repo root.
    """
    repo = Path(repo)
    p = repo / dvc_file
    rel = os.path.relpath(Path(repo, raw_dir).resolve(), p.parent.resolve())
    if not (repo / raw_dir).is_dir():
        raise DataError(f"{repo / raw_dir}: no raw dataset to version; run `hllm data synth` or `hllm data import`")
    current = None
    if p.exists():
        try:
            current = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("outs", [{}])[0].get("path")
        except yaml.YAMLError:
            current = None
    if current != rel:
        p.write_text(yaml.safe_dump({"outs": [{"path": rel}]}, sort_keys=False), encoding="utf-8")
    dvc("commit", "--force", "--quiet", str(dvc_file), repo=repo)
    v = read_version(dvc_file, repo)
    log.info("dataset version %s (%s files) recorded in %s", v.md5, v.nfiles, p)
    return v


def push(dvc_file: str | Path = DVC_FILE, remote: str | None = None, repo: str | Path = ".") -> None:
    args = ["push", "--quiet", str(dvc_file)] + (["--remote", remote] if remote else [])
    dvc(*args, repo=repo)


def add_and_push(
    raw_dir: str | Path = "data/raw", dvc_file: str | Path = DVC_FILE, remote: str | None = None, repo: str | Path = "."
) -> DvcRecord:
    """Record the raw data as a version and upload it; returns the version (md5)."""
    v = add(raw_dir, dvc_file, repo)
    push(dvc_file, remote, repo)
    log.info("pushed dataset version %s to %s", v.md5, remote or "the default remote")
    return v


def pull(dvc_file: str | Path = DVC_FILE, remote: str | None = None, repo: str | Path = ".") -> DvcRecord:
    """Bring the workspace data to the version ``dvc_file`` names (download what the cache lacks)."""
    v = read_version(dvc_file, repo)
    args = ["pull", "--quiet", "--force", str(dvc_file)] + (["--remote", remote] if remote else [])
    dvc(*args, repo=repo)
    log.info("checked out dataset version %s into %s", v.md5, Path(repo) / v.path)
    return v


def is_current(dvc_file: str | Path = DVC_FILE, repo: str | Path = ".") -> bool:
    """True when the workspace data matches what ``dvc_file`` records."""
    proc = dvc("status", "--quiet", str(dvc_file), repo=repo, check=False)
    return proc.returncode == 0


@dataclass(frozen=True)
class DataVersion:
    dvc_md5: str  # md5 of the raw dataset recorded in the .dvc file ("none" when not under DVC)
    sequences_md5: str  # content hash of the built sequences + id maps ("none" when not built)

    @property
    def version(self) -> str:
        """One short string: what the registry gate compares."""
        return f"d{self.dvc_md5[:10]}-s{self.sequences_md5[:10]}"


def dvc_md5(cfg: Config, root: str | Path = ".") -> str:
    """The ``md5`` of the first ``outs`` entry of ``data.dvc`` (or ``<raw_dir>.dvc``)."""
    import yaml

    root = Path(root)
    for cand in (root / "data.dvc", root / f"{cfg.paths.raw_dir.rstrip('/')}.dvc"):
        if cand.is_file():
            try:
                outs = (yaml.safe_load(cand.read_text(encoding="utf-8")) or {}).get("outs") or []
                md5 = outs[0].get("md5") if outs else None
            except (yaml.YAMLError, AttributeError) as e:
                raise ValueError(f"{cand}: not a valid .dvc file ({e})") from e
            if not md5:
                raise ValueError(f"{cand}: no outs[0].md5 entry")
            return str(md5)
    return "none"


def sequences_md5(built_dir: str | Path) -> str:
    """Hash of the built dataset's content (sequences and both id maps), not of the parquet bytes,
    so rewriting the same data with another pyarrow version keeps the version."""
    import pyarrow.parquet as pq

    d = Path(built_dir)
    if not (d / "sequences.parquet").is_file():
        return "none"
    h = hashlib.md5()
    seq = pq.read_table(d / "sequences.parquet", columns=["user_idx", "items"])
    col = seq.column("items").combine_chunks()
    offs = col.offsets.to_numpy()
    h.update((offs - offs[0]).astype("<i8").tobytes())
    h.update(col.flatten().to_numpy().astype("<i4").tobytes())
    h.update(seq.column("user_idx").to_numpy().astype("<i4").tobytes())
    for name, id_col in (("items.parquet", "item_id"), ("users.parquet", "user_id")):
        if (d / name).is_file():
            t = pq.read_table(d / name, columns=["idx", id_col]).sort_by("idx")
            h.update(name.encode())
            h.update("\x1f".join(map(str, t.column(id_col).to_pylist())).encode())
    return h.hexdigest()


def data_version(cfg: Config, root: str | Path = ".") -> DataVersion:
    # Path("/root") / "/abs/built" is "/abs/built": absolute built dirs keep working.
    return DataVersion(dvc_md5(cfg, root), sequences_md5(Path(root) / cfg.paths.built_dir))


def content_hash(built_dir: str | Path) -> str:
    """Content hash of the built dataset's tables (what the model was trained on)."""
    h = hashlib.sha256()
    for name in ("items.parquet", "users.parquet", "sequences.parquet"):
        p = Path(built_dir) / name
        h.update(name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]
