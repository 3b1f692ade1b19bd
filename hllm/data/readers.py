"""Low-level file readers that fail with the file and line named.

Some bad inputs cannot even become a table (an empty file, bytes that are not
in the declared encoding, a row cut short): these are caught here, before any
validation, with a message a user can act on instead of a parser traceback.
Line numbers are 1-based physical lines, as an editor shows them.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from hllm.data.errors import DataError

_CHUNK = 1 << 24


def open_bytes(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    if p.is_dir():
        raise DataError(f"{p}: is a folder, expected a file")
    with open_bytes(p) as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise DataError(f"{p}: file is empty")
    return p


def check_utf8(path: Path) -> None:
    """Decode the file in blocks cut at line ends; on the first bad byte say which line and column."""
    line = 1
    carry = b""
    with open_bytes(path) as f:
        while True:
            chunk = f.read(_CHUNK)
            data = carry + chunk
            cut = len(data) if not chunk else data.rfind(b"\n") + 1
            if chunk and cut == 0:  # one very long line so far: keep reading
                carry = data
                continue
            block, carry = data[:cut], data[cut:]
            try:
                block.decode("utf-8")
            except UnicodeDecodeError as e:
                nl = b"\n"
                at_line = line + block.count(nl, 0, e.start)
                col = e.start - (block.rfind(nl, 0, e.start) + 1) + 1
                what = (
                    "the file ends inside a multi-byte character (truncated file?)"
                    if e.reason == "unexpected end of data"
                    else f"byte 0x{block[e.start]:02x} is not valid UTF-8; re-save the file as UTF-8"
                )
                raise DataError(f"{path}: line {at_line}, column {col}: {what}") from None
            line += block.count(b"\n")
            if not chunk:
                return


def read_csv(
    path: str | Path,
    required: list[str] | None = None,
    delimiter: str = ",",
    encoding: str = "utf-8",
    column_names: list[str] | None = None,
) -> pa.Table:
    """A CSV with quoting, every column read as string (types are decided later, by name).

    ``column_names`` is for header-less files; otherwise the header names the
    columns and ``required`` ones must be among them.
    """
    p = check_file(path)
    if encoding.replace("-", "").lower() == "utf8":
        check_utf8(p)
    header = column_names or csv_header(p, delimiter, encoding)
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise DataError(f"{p}: line 1: duplicate column name(s) {dup}")
    if required:
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{p}: missing required column(s) {missing}; found {header}")
    convert = pcsv.ConvertOptions(
        column_types={h: pa.string() for h in header}, strings_can_be_null=True, quoted_strings_can_be_null=False
    )
    bad: list[Any] = []

    def on_bad_row(row) -> str:
        bad.append(row)
        return "skip"

    def parse(threads: bool) -> pa.Table:
        bad.clear()
        return pcsv.read_csv(
            p,
            read_options=pcsv.ReadOptions(
                encoding=encoding, column_names=column_names, block_size=_CHUNK, use_threads=threads
            ),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_bad_row),
            convert_options=convert,
        )

    try:
        table = parse(True)
        if bad:  # threaded parsing does not know line numbers; re-parse serially to report them
            table = parse(False)
    except pa.ArrowInvalid as e:
        raise DataError(f"{p}: cannot be parsed as CSV ({e})") from None
    if bad:
        r = bad[0]
        where = f"line {r.number}" if r.number is not None else "a row"
        more = f" ({len(bad) - 1} more bad row(s))" if len(bad) > 1 else ""
        raise DataError(
            f"{p}: {where}: expected {r.expected_columns} fields, got {r.actual_columns}: "
            f"{r.text[:120]!r} (truncated or unquoted row?){more}"
        )
    return table


def csv_header(p: Path, delimiter: str, encoding: str) -> list[str]:
    with open_bytes(p) as f:
        first = f.readline()
    text = first.decode(encoding, errors="replace").lstrip("\ufeff").rstrip("\r\n")
    return [h.strip().strip('"') for h in text.split(delimiter)]


def read_delimited(
    path: str | Path, sep: str, n_fields: int | None = None, header: bool = False, encoding: str = "utf-8"
) -> tuple[list[str] | None, list[pa.Array]]:
    """An unquoted separated file (MovieLens ``::`` / ``|`` / tab, RecBole atomic files).

    Lines are read as one string column and split with Arrow, so a multi-character
    separator works and every line's field count is checked (vectorised).
    Returns (header fields or None, one string array per field).
    """
    p = check_file(path)
    if encoding.replace("-", "").lower() == "utf8":
        check_utf8(p)
    try:
        lines = (
            pcsv.read_csv(
                p,
                read_options=pcsv.ReadOptions(encoding=encoding, column_names=["line"], block_size=_CHUNK),
                parse_options=pcsv.ParseOptions(
                    delimiter="\x1f", quote_char=False, escape_char=False, ignore_empty_lines=False
                ),
                convert_options=pcsv.ConvertOptions(column_types={"line": pa.string()}, strings_can_be_null=False),
            )
            .column("line")
            .combine_chunks()
        )
    except pa.ArrowInvalid as e:
        raise DataError(f"{p}: cannot be read as text lines ({e})") from None
    lines = pc.utf8_rtrim(lines, characters="\r")
    first_line = 1
    names = None
    if header:
        names = [h.strip() for h in lines[0].as_py().lstrip("\ufeff").split(sep)]
        lines = lines.slice(1)
        first_line = 2
        n_fields = len(names)
    # a final empty line is just the file's last newline
    import numpy as np

    n = len(lines)
    if n and lines[n - 1].as_py() == "":
        lines = lines.slice(0, n - 1)
    parts = pc.split_pattern(lines, pattern=sep)
    counts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    expected = n_fields if n_fields is not None else (int(counts[0]) if len(counts) else 0)
    bad = np.nonzero(counts != expected)[0]
    if len(bad):
        i = int(bad[0])
        more = f" ({len(bad) - 1} more bad line(s))" if len(bad) > 1 else ""
        raise DataError(
            f"{p}: line {i + first_line}: expected {expected} fields separated by {sep!r}, "
            f"got {int(counts[i])}: {lines[i].as_py()[:120]!r}{more}"
        )
    if len(lines) == 0:
        return names, [pa.array([], type=pa.string()) for _ in range(expected)]
    flat = pc.list_flatten(parts)
    cols = [flat.take(pa.array(np.arange(j, len(flat), expected))) for j in range(expected)]
    return names, cols


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Records of a JSON-lines file (``.gz`` too). The 2014 Amazon metadata is not
    strict JSON but Python literals (single quotes); those lines are read with
    ``ast.literal_eval``, which evaluates literals only, never code."""
    p = check_file(path)
    if p.suffix != ".gz":
        check_utf8(p)
    with open_bytes(p) as f:
        for n, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{p}: line {n}: not valid UTF-8") from None
            try:
                rec = json.loads(text)
            except json.JSONDecodeError:
                try:
                    rec = ast.literal_eval(text)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    raise DataError(
                        f"{p}: line {n}: neither JSON nor a Python literal record: {text[:120]!r}"
                    ) from None
            if not isinstance(rec, dict):
                raise DataError(f"{p}: line {n}: expected one object per line, got {type(rec).__name__}")
            yield n, rec
