"""``hllm data import``: the formats users already have -> the canonical raw layout.

Every format lands in ``paths.raw_dir`` as ``interactions.parquet``
(user_id, item_id, timestamp) + ``items.parquet`` (item_id + text fields), see
:mod:`hllm.data.raw`. Columns are found by name wherever the format has a
header. How each format's fields map to the text fields:

=========== ================================== ====================== ============================================
format      interactions                       items: title           tag / description / other columns
=========== ================================== ====================== ============================================
hllm        CSV with item_id,user_id,timestamp item CSV ``title``      every other column kept under its own name
            (any column order)                                        (``tag``, ``description``, ...)
amazon      SNAP ratings CSV user,item,rating, metadata ``title``      tag = ``categories`` (2014, flattened) or
            timestamp (header-less 2014 files                          ``category`` (2018), ", "-joined;
            in that order; a header is used                            description = ``description`` (a list is
            by name), or reviews JSON lines                            joined); item_id = ``asin``
            (reviewerID, asin, unixReviewTime)
movielens   ML-100K ``u.data`` (tab) or ML-1M  ``u.item`` / ``movies``  tag = genres (", "-joined; names from
            ``ratings.dat`` (``::``)           title incl. year        ``u.genre`` when given); description =
                                                                      "Released <date>." (ML-100K only)
recbole     ``.inter`` with ``name:type``       first of title,         tag = first of tag/tags/genre/genres/
            header (user_id, item_id,          movie_title, item_name, class/categories/category (a token_seq is
            timestamp; float timestamps are    name                    ", "-joined); description = first of
            rounded to seconds when integral)                          description/desc/overview/plot; every other
                                                                      field kept under its own name
=========== ================================== ====================== ============================================

Ratings are dropped (every interaction counts, as in HLLM's Books
preprocessing). MovieLens files are latin-1, as GroupLens ships them.

Import stages the new tables next to ``raw_dir``, validates them (unless told
not to) and only then swaps them in, so a bad file never replaces good data.
"""

from __future__ import annotations

import logging
import shutil
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hllm.config import Config, ImportFormat
from hllm.data.errors import DataError
from hllm.data.raw import RawTables, file_md5, replace_dir, write_staged
from hllm.data.readers import check_file, csv_header, iter_json_lines, read_csv, read_delimited

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = typing.get_args(ImportFormat)

# ML-100K genre flag order (u.genre), used when u.genre is not among the sources.
ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


@dataclass
class ImportResult:
    raw_dir: Path
    interactions: int
    items: int
    validation: Any = None  # ValidationReport when validated


# --------------------------------------------------------------------------- helpers


def _expand(sources: list[str | Path]) -> list[Path]:
    """Folders expand to the files inside them (sorted); files are checked for existence."""
    out: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            out.extend(sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith(".")))
        else:
            out.append(check_file(p))
    if not out:
        raise DataError(f"no input files in {[str(s) for s in sources]}")
    return out


def to_timestamp(values: pa.Array | pa.ChunkedArray, where: str) -> pa.Array:
    """Seconds as int64. Integral floats (RecBole writes ``881250949.0``) are accepted;
    anything else stays string so that validation shows the bad values by name."""
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_integer(arr.type):
        return arr.cast(pa.int64())
    s = pc.utf8_trim_whitespace(arr.cast(pa.string()))
    try:
        return pc.cast(s, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    try:
        f = pc.cast(s, pa.float64())
        if pc.all(pc.or_kleene(pc.is_null(f), pc.equal(pc.floor(f), f))).as_py() is not False:
            return pc.cast(f, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    log.warning("%s: timestamp values are not all integers; keeping them as text for validation to report", where)
    return arr.cast(pa.string())


def _interactions(user: Any, item: Any, ts: Any, where: str) -> pa.Table:
    return pa.table({"user_id": _strings(user), "item_id": _strings(item), "timestamp": to_timestamp(ts, where)})


def _source_entries(files: list[Path]) -> list[dict[str, Any]]:
    return [{"name": f.name, "bytes": f.stat().st_size, "md5": file_md5(f)} for f in files]


def _first(names: list[str], candidates: list[str]) -> str | None:
    low = {n.lower(): n for n in names}
    return next((low[c] for c in candidates if c in low), None)


def _strings(arr: Any) -> pa.Array:
    a = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    return a.cast(pa.string())


# --------------------------------------------------------------------------- hllm (reference CSVs)


def read_hllm(files: list[Path]) -> RawTables:
    inter: list[tuple[Path, list[str]]] = []
    items: list[tuple[Path, list[str]]] = []
    for f in files:
        if f.suffix.lower() not in (".csv", ".gz"):
            raise DataError(f"{f}: hllm format expects CSV files (interactions + item information)")
        header = read_csv_header(f)
        (inter if "user_id" in header else items).append((f, header))
    if len(inter) != 1:
        found = "; ".join(f"{f.name}: {h}" for f, h in inter + items)
        raise DataError(
            "hllm format needs exactly one interactions CSV (columns item_id, user_id, timestamp) "
            f"and one item-information CSV (item_id, title, ...); got {len(inter)} file(s) with a "
            f"user_id column. Headers: {found}"
        )
    if len(items) != 1:
        raise DataError(
            f"hllm format needs one item-information CSV (item_id, title, tag, description) next to "
            f"{inter[0][0].name}; got {[f.name for f, _ in items] or 'none'}"
        )
    fi, fitems = inter[0][0], items[0][0]
    t = read_csv(fi, required=["user_id", "item_id", "timestamp"])
    it = read_csv(fitems, required=["item_id"])
    text = [c for c in it.column_names if c != "item_id"]
    if not text:
        raise DataError(f"{fitems}: no text column besides item_id (expected title, tag, description, ...)")
    items_t = pa.table({"item_id": _strings(it.column("item_id")), **{c: _strings(it.column(c)) for c in text}})
    return RawTables(
        _interactions(t.column("user_id"), t.column("item_id"), t.column("timestamp"), str(fi)),
        items_t,
        {"format": "hllm", "text_columns": text},
    )


def read_csv_header(path: Path) -> list[str]:
    check_file(path)
    return csv_header(path, ",", "utf-8")


# --------------------------------------------------------------------------- amazon


_USER_COLS = ["user_id", "user", "reviewerid"]
_ITEM_COLS = ["item_id", "item", "asin", "parent_asin"]
_TIME_COLS = ["timestamp", "unixreviewtime", "time"]


def _join_text(v: Any, sep: str = ", ") -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        flat: list[str] = []
        for x in v:
            for y in x if isinstance(x, (list, tuple)) else [x]:
                if y is not None and str(y) not in flat:
                    flat.append(str(y))
        return sep.join(flat) if flat else None
    return str(v)


def read_amazon(files: list[Path]) -> RawTables:
    rating_tables: list[pa.Table] = []
    item_rows: dict[str, list[Any]] = {"item_id": [], "title": [], "tag": [], "description": []}
    reviews: dict[str, list[Any]] = {"user_id": [], "item_id": [], "timestamp": []}
    for f in files:
        name = f.name.lower()
        if name.endswith(".csv") or name.endswith(".csv.gz"):
            header = read_csv_header(f)
            low = [h.lower() for h in header]
            if _first(low, _USER_COLS) and _first(low, _ITEM_COLS):
                t = read_csv(f)
                u, i, ts = (_first(t.column_names, c) for c in (_USER_COLS, _ITEM_COLS, _TIME_COLS))
                if ts is None:
                    raise DataError(f"{f}: no timestamp column (one of {_TIME_COLS}); found {header}")
            else:  # the SNAP 2014 ratings files have no header: user,item,rating,timestamp
                t = read_csv(f, column_names=["user", "item", "rating", "timestamp"])
                u, i, ts = "user", "item", "timestamp"
            rating_tables.append(_interactions(t.column(u), t.column(i), t.column(ts), str(f)))
        elif any(name.endswith(s) for s in (".json", ".jsonl", ".json.gz", ".jsonl.gz")):
            from tqdm.auto import tqdm

            for n, rec in tqdm(iter_json_lines(f), desc=f.name, unit=" lines", disable=None, mininterval=2):
                if "reviewerID" in rec:
                    missing = [k for k in ("reviewerID", "asin", "unixReviewTime") if k not in rec]
                    if missing:
                        raise DataError(f"{f}: line {n}: review record lacks {missing}")
                    reviews["user_id"].append(str(rec["reviewerID"]))
                    reviews["item_id"].append(str(rec["asin"]))
                    reviews["timestamp"].append(rec["unixReviewTime"])
                else:
                    asin = rec.get("asin", rec.get("parent_asin"))
                    if asin is None:
                        raise DataError(f"{f}: line {n}: metadata record has no 'asin'")
                    item_rows["item_id"].append(str(asin))
                    item_rows["title"].append(_join_text(rec.get("title")))
                    item_rows["tag"].append(_join_text(rec.get("categories", rec.get("category"))))
                    item_rows["description"].append(_join_text(rec.get("description"), sep=" "))
        else:
            raise DataError(f"{f}: amazon format expects a ratings .csv and a metadata .json/.jsonl(.gz)")
    if reviews["user_id"]:
        ts = pa.array([str(x) for x in reviews["timestamp"]], type=pa.string())
        rating_tables.append(_interactions(pa.array(reviews["user_id"]), pa.array(reviews["item_id"]), ts, "reviews"))
    if not rating_tables:
        raise DataError(f"amazon format: no ratings CSV or reviews JSON among {[f.name for f in files]}")
    if not item_rows["item_id"]:
        raise DataError(f"amazon format: no metadata JSON (asin, title, ...) among {[f.name for f in files]}")
    inter = pa.concat_tables(rating_tables, promote_options="permissive")
    if not pa.types.is_int64(inter.schema.field("timestamp").type):
        inter = inter.set_column(2, "timestamp", to_timestamp(inter.column("timestamp"), "amazon ratings"))
    items = pa.table({k: pa.array(v, type=pa.string()) for k, v in item_rows.items()})
    return RawTables(inter, items, {"format": "amazon", "text_columns": ["title", "tag", "description"]})


# --------------------------------------------------------------------------- movielens


def _pick(files: list[Path], name: str) -> Path | None:
    return next((f for f in files if f.name.lower() == name), None)


def read_movielens(files: list[Path]) -> RawTables:
    enc = "latin-1"
    if _pick(files, "u.data"):
        fi, fitems = _pick(files, "u.data"), _pick(files, "u.item")
        assert fi is not None  # just picked above
        if fitems is None:
            raise DataError("movielens: u.data needs u.item (movie titles and genres) among the sources")
        _, (u, i, _r, ts) = read_delimited(fi, "\t", n_fields=4, encoding=enc)
        genres = ML100K_GENRES
        fg = _pick(files, "u.genre")
        if fg is not None:
            _, (gname, gidx) = read_delimited(fg, "|", n_fields=2, encoding=enc)
            order = np.argsort(np.array(gidx.to_pylist(), dtype=np.int64))
            genres = [gname.to_pylist()[k] for k in order]
        _, cols = read_delimited(fitems, "|", n_fields=5 + len(genres), encoding=enc)
        item_id, title, release = cols[0], cols[1], cols[2]
        tag = _flags_to_tags(cols[5:], genres)
        desc = pc.if_else(
            pc.equal(release, ""),
            pa.scalar(None, pa.string()),
            pc.binary_join_element_wise("Released ", release, ".", ""),
        )
        version = "ml-100k"
    elif _pick(files, "ratings.dat"):
        fi, fitems = _pick(files, "ratings.dat"), _pick(files, "movies.dat")
        assert fi is not None  # just picked above
        if fitems is None:
            raise DataError("movielens: ratings.dat needs movies.dat (titles and genres) among the sources")
        _, (u, i, _r, ts) = read_delimited(fi, "::", n_fields=4, encoding=enc)
        _, (item_id, title, g) = read_delimited(fitems, "::", n_fields=3, encoding=enc)
        tag = pc.replace_substring(g, "|", ", ")
        desc = pa.nulls(len(item_id), pa.string())
        version = "ml-1m"
    else:
        raise DataError(
            f"movielens: expected u.data + u.item (ML-100K) or ratings.dat + movies.dat (ML-1M); "
            f"got {[f.name for f in files]}"
        )
    items = pa.table({"item_id": item_id, "title": title, "tag": tag, "description": desc})
    used = [f for f in (fi, fitems, _pick(files, "u.genre") if version == "ml-100k" else None) if f is not None]
    return RawTables(
        _interactions(u, i, ts, str(fi)),
        items,
        {"format": "movielens", "version": version, "text_columns": ["title", "tag", "description"], "_used": used},
    )


def _flags_to_tags(flags: list[pa.Array], names: list[str]) -> pa.Array:
    parts = [
        pc.if_else(pc.equal(f, "1"), pa.scalar(n, pa.string()), pa.scalar(None, pa.string()))
        for f, n in zip(flags, names)
    ]
    # join the non-null names with ", " (null_handling="skip" drops the genres a film does not have)
    joined = pc.binary_join_element_wise(*parts, ", ", null_handling="skip")
    return pc.if_else(pc.equal(joined, ""), pa.scalar(None, pa.string()), joined)


# --------------------------------------------------------------------------- recbole


_TITLE = ["title", "movie_title", "item_name", "name"]
_TAG = ["tag", "tags", "genre", "genres", "class", "categories", "category"]
_DESC = ["description", "desc", "overview", "plot"]


def _atomic(path: Path) -> tuple[list[str], list[str], list[pa.Array]]:
    header, cols = read_delimited(path, "\t", header=True)
    assert header is not None
    names, types = [], []
    for h in header:
        name, _, typ = h.partition(":")
        if not typ:
            raise DataError(f"{path}: line 1: header field {h!r} is not NAME:TYPE (e.g. item_id:token)")
        names.append(name)
        types.append(typ)
    return names, types, cols


def read_recbole(files: list[Path]) -> RawTables:
    fi = next((f for f in files if f.suffix == ".inter"), None)
    fitems = next((f for f in files if f.suffix == ".item"), None)
    if fi is None or fitems is None:
        raise DataError(f"recbole: expected a .inter and a .item atomic file; got {[f.name for f in files]}")
    names, _types, cols = _atomic(fi)
    c = dict(zip(names, cols))
    missing = [k for k in ("user_id", "item_id", "timestamp") if k not in c]
    if missing:
        raise DataError(f"{fi}: line 1: missing field(s) {missing}; found {names}")
    inames, itypes, icols = _atomic(fitems)
    ic = dict(zip(inames, icols))
    if "item_id" not in ic:
        raise DataError(f"{fitems}: line 1: missing field item_id; found {inames}")
    mapping: dict[str, str] = {}
    for target, cands in (("title", _TITLE), ("tag", _TAG), ("description", _DESC)):
        src = _first([n for n in inames if n != "item_id" and n not in mapping.values()], cands)
        if src:
            mapping[target] = src
    out: dict[str, pa.Array] = {"item_id": ic["item_id"]}
    for target, src in mapping.items():
        col = ic[src]
        if target == "tag" and itypes[inames.index(src)] == "token_seq":
            col = pc.replace_substring(col, " ", ", ")
        out[target] = col
    for n in inames:  # every other field keeps its own name, so model.item.text_fields can pick it
        if n != "item_id" and n not in mapping.values() and n not in out:
            out[n] = ic[n]
    out = {
        k: pc.if_else(pc.equal(v, ""), pa.scalar(None, pa.string()), v) if k != "item_id" else v for k, v in out.items()
    }
    return RawTables(
        _interactions(c["user_id"], c["item_id"], c["timestamp"], str(fi)),
        pa.table(out),
        {
            "format": "recbole",
            "field_mapping": mapping,
            "text_columns": [k for k in out if k != "item_id"],
            "_used": [fi, fitems],
        },
    )


READERS: dict[str, Callable[[list[Path]], RawTables]] = {
    "hllm": read_hllm,
    "amazon": read_amazon,
    "movielens": read_movielens,
    "recbole": read_recbole,
}


def read_source(fmt: str, sources: list[str | Path]) -> RawTables:
    if fmt not in READERS:
        raise DataError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    files = _expand(sources)
    tables = READERS[fmt](files)
    used = tables.manifest.pop("_used", files)  # a MovieLens folder also holds files we do not read
    tables.manifest.update(
        {"sources": _source_entries(used), "interactions": tables.interactions.num_rows, "items": tables.items.num_rows}
    )
    return tables


def drop_duplicate_interactions(t: pa.Table) -> tuple[pa.Table, int]:
    """Keep the first of rows equal on (user_id, item_id, timestamp), in file order."""
    df = t.select(["user_id", "item_id", "timestamp"]).to_pandas()
    dup = df.duplicated(keep="first").to_numpy()
    n = int(dup.sum())
    return (t.filter(pa.array(~dup)) if n else t), n


def import_dataset(
    cfg: Config,
    fmt: str,
    sources: list[str | Path],
    raw_dir: str | Path | None = None,
    validate: bool = True,
    drop_duplicates: bool = False,
) -> ImportResult:
    """Parse ``sources`` as ``fmt``, stage the canonical tables, validate them and swap them into ``raw_dir``.

    Raises :class:`DataError` for input that cannot be parsed and
    :class:`hllm.data.validate.ValidationFailed` when validation fails; in both
    cases ``raw_dir`` is left exactly as it was.
    """
    target = Path(raw_dir or cfg.paths.raw_dir)
    tables = read_source(fmt, sources)
    if drop_duplicates:
        tables.interactions, n = drop_duplicate_interactions(tables.interactions)
        tables.manifest["dropped_duplicates"] = n
        tables.manifest["interactions"] = tables.interactions.num_rows
        if n:
            log.info("dropped %d duplicate (user_id, item_id, timestamp) rows", n)
    stage = write_staged(tables, target.parent)
    report = None
    try:
        if validate:
            from hllm.data.validate import ValidationFailed, validate_raw

            report = validate_raw(cfg, raw_dir=stage, source=f"import --format {fmt} {' '.join(map(str, sources))}")
            if not report.passed:
                raise ValidationFailed(report)
        replace_dir(stage, target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    if report is not None:  # the report checked the staged copy; record where the data now lives
        report.relocate(target)
    log.info(
        "imported %s: %d interactions, %d items -> %s", fmt, tables.interactions.num_rows, tables.items.num_rows, target
    )
    return ImportResult(target, tables.interactions.num_rows, tables.items.num_rows, report)
