"""Append-only exposure and outcome logs of an A/B test, as immutable Parquet part files.

Layout (``root`` is a local folder or a URI such as ``s3://bucket/prefix``)::

    <root>/exposures/part-<utc ts>-<uuid>.parquet     one row per served slate (POST /recommend)
    <root>/outcomes/part-<utc ts>-<uuid>.parquet      one row per click/consume (POST /feedback)

Writing: records are buffered in memory and written as one new part file every ``flush_every``
records or ``flush_s`` seconds, whichever comes first, and on :meth:`LogWriter.close` (a clean
shutdown loses nothing). Nothing is ever rewritten or appended to: a part file is complete or absent.
On a local filesystem a part is written under a hidden temporary name (``.part-....tmp``, which the
reader skips) and renamed into place, so a crash mid-write never leaves a torn file; on an object
store (S3) a single PUT is atomic already, so the part is written under its final name.

Loss bound: a crash (SIGKILL, OOM) loses the records still in the buffer, i.e. at most
``flush_every`` records and at most ``flush_s`` seconds of traffic (defaults: 1,000 records / 5 s).

The writer takes a ``pyarrow.fs.FileSystem``, an fsspec filesystem (wrapped), or infers one from
the root URI (``pyarrow.fs.FileSystem.from_uri``), so the same code writes locally and to S3.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

EXPOSURES = "exposures"
OUTCOMES = "outcomes"
EVENTS = ("click", "consume")

_TS = pa.timestamp("us", tz="UTC")

EXPOSURE_SCHEMA = pa.schema(
    [
        pa.field("exposure_id", pa.string(), nullable=False),
        pa.field("ts", _TS, nullable=False),
        pa.field("experiment_id", pa.string()),  # null: no running experiment (champion only)
        pa.field("layer", pa.string()),
        pa.field("unit_id", pa.string()),  # null: anonymous request (history only, no user id)
        pa.field("unit_hash", pa.string()),
        pa.field("layer_bucket", pa.int32()),
        pa.field("exposure_bucket", pa.int32()),
        pa.field("arm_bucket", pa.int32()),
        pa.field("in_experiment", pa.bool_(), nullable=False),
        pa.field("intended_arm", pa.string()),  # champion | challenger | null (not in the experiment)
        pa.field("served_arm", pa.string(), nullable=False),  # champion | challenger
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),  # the version that produced the slate
        pa.field("model_uri", pa.string(), nullable=False),
        pa.field("data_version", pa.string()),
        pa.field("request_kind", pa.string(), nullable=False),  # user | history
        pa.field("k", pa.int32(), nullable=False),
        pa.field("items", pa.list_(pa.string()), nullable=False),  # the slate, best first (position = index)
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
        pa.field("latency_ms", pa.float64(), nullable=False),  # model time of the served slate
        pa.field("fallback", pa.bool_(), nullable=False),  # intended challenger, served by the champion
        pa.field("error", pa.string()),  # why the intended arm failed (fallback) or the shadow failed
        pa.field("mode", pa.string(), nullable=False),  # ab | shadow
        pa.field("shadow_version", pa.string()),  # shadow mode: the challenger version scored
        pa.field("shadow_items", pa.list_(pa.string())),
        pa.field("shadow_overlap", pa.float64()),  # |served top-k ∩ shadow top-k| / k
        pa.field("shadow_latency_ms", pa.float64()),
        pa.field("teams", pa.list_(pa.string())),  # interleave mode: the arm that placed each position
        pa.field("interleave_version", pa.string()),  # interleave mode: the challenger version merged in
    ]
)

OUTCOME_SCHEMA = pa.schema(
    [
        pa.field("exposure_id", pa.string(), nullable=False),  # the join key into exposures
        pa.field("ts", _TS, nullable=False),
        pa.field("unit_id", pa.string()),  # from the exposure when the service still knows it, else the body
        pa.field("event", pa.string(), nullable=False),  # click | consume
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("position", pa.int32()),  # 0-based position in the served slate; null when not in it
        pa.field("known_exposure", pa.bool_(), nullable=False),  # the service had the exposure in memory
        pa.field("credit", pa.string()),  # interleave mode: the team whose item it was (position's team)
    ]
)

SCHEMAS = {EXPOSURES: EXPOSURE_SCHEMA, OUTCOMES: OUTCOME_SCHEMA}


def now() -> datetime:
    return datetime.now(UTC)


def _filesystem(root: str | Path, filesystem: Any = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for ``root``: an explicit pyarrow or fsspec filesystem, or
    the one the URI names (a plain path is the local filesystem)."""
    root = str(root)
    if filesystem is None:
        if "://" in root:
            return pafs.FileSystem.from_uri(root)
        return pafs.LocalFileSystem(), str(Path(root).resolve())
    if isinstance(filesystem, pafs.FileSystem):
        return filesystem, root
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), root  # an fsspec filesystem (s3fs, gcsfs, ...)


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


class PartWriter:
    """Buffered writer of one log kind (``exposures`` or ``outcomes``) under ``root``.

    Thread-safe: ``append`` may be called from many request threads; a background thread flushes
    every ``flush_s`` seconds. A failed write keeps the batch in the buffer and retries it at the next
    flush (the buffer is bounded by ``max_buffer``; beyond it the oldest records are dropped and counted
    in ``dropped``)."""

    def __init__(
        self,
        root: str | Path,
        kind: str,
        *,
        filesystem: Any = None,
        flush_every: int = 1000,
        flush_s: float = 5.0,
        max_buffer: int = 1_000_000,
    ) -> None:
        if kind not in SCHEMAS:
            raise ValueError(f"log kind must be one of {sorted(SCHEMAS)}, got {kind!r}")
        if flush_every < 1 or flush_s <= 0:
            raise ValueError(f"flush_every must be >= 1 and flush_s > 0 (got {flush_every}, {flush_s})")
        self.kind = kind
        self.schema = SCHEMAS[kind]
        self.fs, base = _filesystem(root, filesystem)
        self.dir = f"{base.rstrip('/')}/{kind}"
        self.flush_every = flush_every
        self.flush_s = flush_s
        self.max_buffer = max_buffer
        self.written = 0  # records in part files
        self.parts = 0
        self.dropped = 0
        self.write_errors = 0
        self._buf: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # guards the buffer
        self._io = threading.Lock()  # one part write at a time
        self._stop = threading.Event()
        self._closed = False
        self.fs.create_dir(self.dir, recursive=True)
        self._thread = threading.Thread(target=self._run, name=f"hllm-log-{kind}", daemon=True)
        self._thread.start()

    def append(self, record: Mapping[str, Any]) -> None:
        if self._closed:
            raise RuntimeError(f"{self.kind} log is closed")
        with self._lock:
            self._buf.append(dict(record))
            full = len(self._buf) >= self.flush_every
        if full:
            self.flush()

    def flush(self) -> str | None:
        """Write the buffered records as one new part file; returns its path (None when empty)."""
        with self._io:
            with self._lock:
                batch, self._buf = self._buf, []
            if not batch:
                return None
            try:
                path = self._write(batch)
            except Exception:
                self.write_errors += 1
                log.exception("%s log: writing %d records failed; kept for the next flush", self.kind, len(batch))
                with self._lock:
                    self._buf = batch + self._buf
                    over = len(self._buf) - self.max_buffer
                    if over > 0:
                        del self._buf[:over]
                        self.dropped += over
                return None
            self.written += len(batch)
            self.parts += 1
            return path

    def _write(self, batch: list[dict[str, Any]]) -> str:
        table = pa.Table.from_pylist(batch, schema=self.schema)
        stamp = now().strftime("%Y%m%dT%H%M%S%fZ")
        name = f"part-{stamp}-{uuid.uuid4().hex}.parquet"
        final = f"{self.dir}/{name}"
        if _is_local(self.fs):
            tmp = f"{self.dir}/.{name}.tmp"
            with self.fs.open_output_stream(tmp) as out:
                pq.write_table(table, out)
            self.fs.move(tmp, final)  # atomic rename on one local filesystem
        else:
            with self.fs.open_output_stream(final) as out:  # one PUT: the object appears whole or not at all
                pq.write_table(table, out)
        log.debug("%s log: %d records -> %s", self.kind, len(batch), final)
        return final

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()

    @property
    def buffered(self) -> int:
        with self._lock:
            return len(self._buf)

    def close(self) -> None:
        """Stop the timer and write what is left (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=max(5.0, 2 * self.flush_s))
        self.flush()


class LogWriter:
    """The exposure and outcome writers of one service, sharing a root and flush policy."""

    def __init__(
        self, root: str | Path, *, filesystem: Any = None, flush_every: int = 1000, flush_s: float = 5.0
    ) -> None:
        self.root = str(root)
        self.exposures = PartWriter(root, EXPOSURES, filesystem=filesystem, flush_every=flush_every, flush_s=flush_s)
        self.outcomes = PartWriter(root, OUTCOMES, filesystem=filesystem, flush_every=flush_every, flush_s=flush_s)

    def flush(self) -> None:
        self.exposures.flush()
        self.outcomes.flush()

    def close(self) -> None:
        self.exposures.close()
        self.outcomes.close()


def part_files(root: str | Path, kind: str, filesystem: Any = None) -> list[str]:
    """Complete part files of ``kind`` under ``root``, oldest first (temporary files are skipped)."""
    fs, base = _filesystem(root, filesystem)
    d = f"{base.rstrip('/')}/{kind}"
    infos = fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
    names = [
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.rsplit("/", 1)[-1].startswith("part-")
        and i.path.endswith(".parquet")
    ]
    return sorted(names)


def read_table(root: str | Path, kind: str, filesystem: Any = None) -> pa.Table:
    """All parts of ``kind`` as one table with the log's schema (empty table when there are none)."""
    if kind not in SCHEMAS:
        raise ValueError(f"log kind must be one of {sorted(SCHEMAS)}, got {kind!r}")
    fs, _ = _filesystem(root, filesystem)
    files = part_files(root, kind, filesystem)
    tables = [pq.read_table(f, filesystem=fs, schema=SCHEMAS[kind]) for f in files]
    if not tables:
        return SCHEMAS[kind].empty_table()
    return pa.concat_tables(tables)


def read_exposures(root: str | Path, filesystem: Any = None) -> Any:
    """The exposure log as a pandas DataFrame."""
    return read_table(root, EXPOSURES, filesystem).to_pandas()


def read_outcomes(root: str | Path, filesystem: Any = None) -> Any:
    """The outcome log as a pandas DataFrame."""
    return read_table(root, OUTCOMES, filesystem).to_pandas()
