"""The canonical raw layout every importer (and ``hllm data synth``) writes.

Under ``paths.raw_dir``::

    interactions.parquet   user_id (string), item_id (string), timestamp (int64, seconds)
    items.parquet          item_id (string) + one string column per text field (title, tag, description, ...)
    manifest.json          where the data came from (format, source files + md5, row counts); no clock times,
                           so the same input always gives the same bytes and the same DVC hash

Columns are found by name everywhere. Ids stay strings exactly as read (no
trimming): whitespace in an id is a validation error, not something to fix
silently. A timestamp column that is not integral stays a string so that
validation can show the offending values instead of an import crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hllm import faults
from hllm.data.errors import DataError

log = logging.getLogger(__name__)

INTERACTIONS = "interactions.parquet"
ITEMS = "items.parquet"
MANIFEST = "manifest.json"
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")


@dataclass
class RawTables:
    interactions: pa.Table
    items: pa.Table
    manifest: dict[str, Any] = field(default_factory=dict)


def file_md5(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(raw_dir: str | Path) -> dict[str, str]:
    """md5 of each table file: ties a validation report to the exact bytes it checked."""
    d = Path(raw_dir)
    return {name: file_md5(d / name) for name in (INTERACTIONS, ITEMS) if (d / name).exists()}


def _write_parquet(table: pa.Table, path: Path) -> None:
    # No pandas metadata and fixed writer options: identical tables give identical bytes.
    table = table.replace_schema_metadata(None)
    pq.write_table(table, path, compression="zstd", row_group_size=1 << 20)


def write_raw(tables: RawTables, raw_dir: str | Path) -> Path:
    """Write the canonical layout atomically: a sibling staging folder is renamed
    over ``raw_dir`` only once every file is complete, so a crash or a bad input
    never leaves a half-written dataset where a good one was."""
    d = Path(raw_dir)
    stage = write_staged(tables, d.parent)
    replace_dir(stage, d)
    return d


def write_staged(tables: RawTables, parent: str | Path) -> Path:
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stage = parent / f".raw-staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        _write_parquet(tables.interactions, stage / INTERACTIONS)
        _write_parquet(tables.items, stage / ITEMS)
        (stage / MANIFEST).write_text(json.dumps(tables.manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


def replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target`` (both on one filesystem); the old contents go only after the swap.

    Two renames, so a crash between them leaves no ``target``, only ``.<name>-old-*``:
    :func:`recover_dir` (run by the next nightly run and by every ``hllm data`` command) puts it back.
    """
    target = Path(target)
    old = target.with_name(f"{OLD_PREFIX.format(name=target.name)}{uuid.uuid4().hex[:8]}")
    if target.exists():
        target.rename(old)
    faults.point("publish:between-renames")
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


OLD_PREFIX = ".{name}-old-"


def recover_dir(target: str | Path) -> str | None:
    """Undo or finish a :func:`replace_dir` that a crash interrupted; returns what was done, or None.

    - no ``target`` but ``.<name>-old-*`` folders: the crash came between the two renames; the
      newest old folder is renamed back (the swap is undone: the new data was never published);
    - ``target`` and old folders: the swap completed, only the cleanup was lost; they are deleted.
    """
    target = Path(target)
    olds = sorted(target.parent.glob(OLD_PREFIX.format(name=target.name) + "*"), key=lambda p: p.stat().st_mtime)
    olds = [p for p in olds if p.is_dir()]
    if not olds:
        return None
    if target.exists():
        what = f"{target}: removed {len(olds)} old folder(s) a crash left after a completed swap"
    else:
        olds[-1].rename(target)
        what = f"{target}: restored from {olds[-1].name} (a crash interrupted its replacement)"
        olds = olds[:-1]
    for p in olds:
        shutil.rmtree(p, ignore_errors=True)
    log.warning("%s", what)
    return what


def read_raw(raw_dir: str | Path, columns: dict[str, list[str] | None] | None = None) -> RawTables:
    """Read the canonical layout back, naming the missing or unreadable file."""
    d = Path(raw_dir)
    out: dict[str, pa.Table] = {}
    for name in (INTERACTIONS, ITEMS):
        p = d / name
        if not p.exists():
            raise DataError(f"{p}: missing; create the raw dataset with `hllm data synth` or `hllm data import`")
        try:
            out[name] = pq.read_table(p, columns=(columns or {}).get(name))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{p}: not a readable parquet file ({e})") from e
    manifest = {}
    if (d / MANIFEST).exists():
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    return RawTables(out[INTERACTIONS], out[ITEMS], manifest)
