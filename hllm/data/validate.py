"""``hllm data validate``: Great Expectations suites over the raw tables.

The suites live in the repo (``hllm/data/expectations/*.json``, one per table)
and take their thresholds from ``params.yaml`` ``validate`` as GX suite
parameters (``{"$PARAMETER": "min_timestamp"}``), so changing a threshold never
means editing a suite. Four tables are checked:

* ``interactions`` and ``items``: the raw parquet files as they are;
* ``users`` (user_id, n_interactions) and ``interacted_items`` (item_id,
  has_text): derived from both, because "every user has >= N interactions" and
  "every interacted item has text" span rows or tables, and checking them as
  plain column expectations lets GX show the offending ids.

Every run writes ``<reports_dir>/validation/report.json`` (passed or not, the
failures with example bad values, and the md5 of the files it checked) and GX
Data Docs under ``<reports_dir>/validation/gx/uncommitted/data_docs/``. ``hllm
data build`` refuses to run unless the latest report passed on the exact
bytes now in ``raw_dir``: a failed validation produces nothing downstream.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from hllm import faults
from hllm.config import Config
from hllm.data.errors import DataError
from hllm.data.raw import fingerprint, read_raw

log = logging.getLogger(__name__)

SUITES = ("interactions", "items", "users", "interacted_items")
INDEX_COLUMNS = {"interactions": ["row"], "items": ["row"], "users": ["user_id"], "interacted_items": ["item_id"]}
REPORT = "report.json"


@dataclass
class Failure:
    table: str
    expectation: str
    column: str | None
    why: str
    unexpected_count: int | None = None
    element_count: int | None = None
    examples: list[str] = field(default_factory=list)

    def line(self) -> str:
        col = f" column '{self.column}'" if self.column else ""
        count = ""
        if self.unexpected_count is not None and self.element_count:
            count = f" ({self.unexpected_count} of {self.element_count} rows)"
        ex = f"; examples: {', '.join(self.examples)}" if self.examples else ""
        return f"{self.table}:{col} {self.expectation} failed: {self.why}{count}{ex}"


@dataclass
class ValidationReport:
    passed: bool
    raw_dir: str
    source: str
    fingerprint: dict[str, str]
    thresholds: dict[str, Any]
    tables: dict[str, dict[str, Any]]
    failures: list[Failure]
    validated_at: str
    report_path: str = ""
    data_docs: str | None = None

    def summary(self) -> str:
        head = f"validation {'PASSED' if self.passed else 'FAILED'} ({self.source}): " + ", ".join(
            f"{t} {v['expectations'] - v['failed']}/{v['expectations']}" for t, v in self.tables.items()
        )
        lines = [head] + [f"  - {f.line()}" for f in self.failures]
        lines.append(f"  report: {self.report_path}")
        if self.data_docs:
            lines.append(f"  data docs: {self.data_docs}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self) -> None:
        p = Path(self.report_path)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(p)

    def relocate(self, raw_dir: str | Path) -> None:
        """The data that was checked now lives in ``raw_dir`` (import validates a staged copy)."""
        self.raw_dir = str(raw_dir)
        self.write()


class ValidationFailed(DataError):
    def __init__(self, report: ValidationReport):
        super().__init__(report.summary())
        self.report = report


# --------------------------------------------------------------------------- suites


def load_suite(name: str) -> dict[str, Any]:
    text = resources.files("hllm.data").joinpath("expectations", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def expand_suite(
    suite: dict[str, Any], columns: list[str], required_text: list[str], integer_columns: set[str]
) -> list[dict[str, Any]]:
    """Instantiate templates for the columns present and drop what cannot be evaluated.

    ``{required_text}`` / ``{optional_text}`` expand per text field. Column
    expectations on a missing column are dropped (its ``expect_column_to_exist``
    reports it), and ``needs_integer`` ones on a non-integer column too (its type
    expectation reports that), so every failure names one clear cause.
    """
    text_cols = [c for c in columns if c not in ("item_id", "row")]
    optional = [c for c in text_cols if c not in required_text]
    out: list[dict[str, Any]] = []
    for e in suite["expectations"]:
        col = e["kwargs"].get("column")
        targets = {"{required_text}": required_text, "{optional_text}": optional}.get(col, [col])
        for c in targets:
            ex = copy.deepcopy(e)
            if c is not None:
                ex["kwargs"]["column"] = c
            is_exist = ex["type"] == "expect_column_to_exist"
            if c is not None and c not in columns and not is_exist:
                continue
            if ex.get("meta", {}).get("needs_integer") and c not in integer_columns:
                continue
            cols = ex["kwargs"].get("column_list") or []
            if any(x not in columns for x in cols):
                continue
            out.append(ex)
    return out


# --------------------------------------------------------------------------- frames


def _frames(interactions: pa.Table, items: pa.Table, required_text: list[str]) -> dict[str, pd.DataFrame]:
    """pandas frames for GX; ``row`` is the 1-based row number, shown next to bad values."""
    mapper = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int64Dtype()}.get
    inter = interactions.to_pandas(types_mapper=mapper)
    inter["row"] = np.arange(1, len(inter) + 1)
    it = items.to_pandas(types_mapper=mapper)
    it["row"] = np.arange(1, len(it) + 1)

    if "user_id" in inter.columns:
        counts = inter["user_id"].value_counts(dropna=True, sort=False)
        users = pd.DataFrame({"user_id": counts.index.astype(str), "n_interactions": counts.to_numpy(np.int64)})
    else:
        users = pd.DataFrame({"user_id": pd.Series([], dtype=str), "n_interactions": pd.Series([], dtype=np.int64)})

    if "item_id" in inter.columns and "item_id" in it.columns:
        used = pd.Series(inter["item_id"].dropna().unique(), dtype=object)
        ok = pd.Series(True, index=it.index)
        for f in required_text:
            if f in it.columns:
                ok &= it[f].astype("string").fillna("").str.strip().str.len() > 0
            else:
                ok &= False
        with_text = set(it.loc[ok.to_numpy(bool), "item_id"].dropna().astype(str))
        has = used.isin(with_text).to_numpy(bool)
        linked = pd.DataFrame({"item_id": used.astype(str), "has_text": has})
    else:
        linked = pd.DataFrame({"item_id": pd.Series([], dtype=str), "has_text": pd.Series([], dtype=bool)})
    return {"interactions": inter, "items": it, "users": users, "interacted_items": linked}


def _non_integer_examples(series: pd.Series, n: int) -> list[str]:
    s = series.dropna()
    num = pd.to_numeric(s, errors="coerce")
    bad = s[num.isna() | (num != np.floor(num))]
    return [f"row {i + 1}: {v!r}" for i, v in zip(bad.index[:n], bad.iloc[:n])]


def _show(v: Any) -> str:
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, float) and np.isnan(v):
        return "null"
    return str(v.item() if isinstance(v, np.generic) else v)


def _examples(result: dict[str, Any], table: str, column: str | None, n: int) -> list[str]:
    idx = result.get("partial_unexpected_index_list") or []
    index_cols = INDEX_COLUMNS[table]
    out = []
    for rec in idx[:n]:
        if not isinstance(rec, dict):
            continue
        where = ", ".join(f"{k} {rec[k]}" if k == "row" else f"{k}={rec[k]}" for k in index_cols if k in rec)
        vals = {k: v for k, v in rec.items() if k not in index_cols and k != "has_text"}
        shown = ", ".join(_show(v) if len(vals) == 1 else f"{k}={_show(v)}" for k, v in vals.items())
        out.append(f"{where}: {shown}" if shown else where)
    if not out:
        out = [_show(v) for v in (result.get("partial_unexpected_list") or [])[:n]]
    if not out and "observed_value" in result:
        out = [f"observed {_show(result['observed_value'])}"]
    return [x[:200] for x in out]


class _Fmt(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


# --------------------------------------------------------------------------- run


def _quiet_gx() -> None:
    # GX logs dozens of INFO lines about its own decorators at import time.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)


def _gx_context(project_dir: Path):
    _quiet_gx()
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="file", project_root_dir=str(project_dir))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def thresholds(cfg: Config, now: float | None = None) -> dict[str, Any]:
    v = cfg.validate
    now = time.time() if now is None else now
    return {
        "min_timestamp": v.min_timestamp,
        "max_timestamp": int(now) + v.future_slack_days * 86_400,
        "min_text_chars": v.min_text_chars,
        "max_text_chars": v.max_text_chars,
        "min_interactions_per_user": v.min_interactions_per_user,
    }


def validate_raw(
    cfg: Config,
    raw_dir: str | Path | None = None,
    report_dir: str | Path | None = None,
    source: str | None = None,
    data_docs: bool | None = None,
    raise_on_failure: bool = False,
) -> ValidationReport:
    """Validate the raw tables in ``raw_dir`` (default ``paths.raw_dir``); always writes the report.

    Returns the report (``report.passed``); with ``raise_on_failure`` a failed
    validation raises :class:`ValidationFailed` carrying it. A missing or
    unreadable raw file raises :class:`DataError`.
    """
    _quiet_gx()
    import great_expectations as gx
    from tqdm.auto import tqdm

    raw = Path(raw_dir or cfg.paths.raw_dir)
    out = Path(report_dir or Path(cfg.paths.reports_dir) / "validation")
    out.mkdir(parents=True, exist_ok=True)
    tables = read_raw(raw)
    fp = fingerprint(raw)
    v = cfg.validate
    params = thresholds(cfg)
    required_text = list(v.required_text_fields)
    frames = _frames(tables.interactions, tables.items, required_text)
    schema = tables.interactions.schema
    integer_cols = {f.name for f in schema if pa.types.is_integer(f.type)} | {"n_interactions"}

    ctx = _gx_context(out)
    ds = ctx.data_sources.add_or_update_pandas(name="raw")
    failures: list[Failure] = []
    summary: dict[str, dict[str, Any]] = {}
    # GX's own per-expectation bars are off (dozens of them); one bar over the suites instead:
    # minutes at 10M rows. disable=None: silent when stderr is not a terminal (CI, Prefect logs).
    bar = tqdm(SUITES, desc="validate", unit="suite", disable=None, dynamic_ncols=True)
    for name in bar:
        df = frames[name]
        bar.set_postfix(table=name, rows=len(df))
        spec = load_suite(name)
        exps = expand_suite(spec, list(df.columns), required_text, integer_cols)
        suite = ctx.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=exps, meta=spec.get("meta", {})))
        try:
            asset = ds.get_asset(name)
        except LookupError:
            asset = ds.add_dataframe_asset(name=name)
        try:
            bd = asset.get_batch_definition("all")
        except (KeyError, LookupError):
            bd = asset.add_batch_definition_whole_dataframe("all")
        vd = ctx.validation_definitions.add_or_update(gx.ValidationDefinition(name=name, data=bd, suite=suite))
        cp = ctx.checkpoints.add_or_update(
            gx.Checkpoint(
                name=name,
                validation_definitions=[vd],
                result_format={
                    "result_format": "SUMMARY",
                    "partial_unexpected_count": v.max_examples,
                    "unexpected_index_column_names": INDEX_COLUMNS[name],
                },
            )
        )
        res = next(iter(cp.run(batch_parameters={"dataframe": df}, expectation_parameters=params).run_results.values()))
        faults.point("validate:suite-checked")  # mid validation: GX's project files written for one suite
        n_failed = 0
        for r in res.results:
            if r.success:
                continue
            n_failed += 1
            cfg_e = r.expectation_config
            column = cfg_e.kwargs.get("column") or (",".join(cfg_e.kwargs.get("column_list", [])) or None)
            result = r.result or {}
            exc = r.exception_info or {}
            why = str((cfg_e.meta or {}).get("notes", cfg_e.type)).format_map(_Fmt(params))
            if isinstance(exc, dict) and exc.get("raised_exception"):
                why += f" (could not be evaluated: {exc.get('exception_message')})"
            examples = _examples(result, name, column, v.max_examples)
            if cfg_e.type == "expect_column_values_to_be_of_type" and column in df.columns:
                expected = cfg_e.kwargs.get("type_")
                why += f"; expected {expected}, found {result.get('observed_value')}"
                examples = _non_integer_examples(df[column], v.max_examples) if expected == "int64" else examples
            failures.append(
                Failure(
                    name, cfg_e.type, column, why, result.get("unexpected_count"), result.get("element_count"), examples
                )
            )
        summary[name] = {
            "rows": len(df),
            "expectations": len(res.results),
            "failed": n_failed,
            "success": bool(res.success),
        }
    bar.close()

    docs = None
    if cfg.validate.data_docs if data_docs is None else data_docs:
        sites = ctx.build_data_docs()
        url = next(iter(sites.values()), None)
        docs = url.replace("file://", "") if url else None
    order = {n: i for i, n in enumerate(SUITES)}
    failures.sort(key=lambda f: order[f.table])
    report = ValidationReport(
        passed=not failures,
        raw_dir=str(raw),
        source=source or str(raw),
        fingerprint=fp,
        thresholds={**params, "required_text_fields": required_text},
        tables=summary,
        failures=failures,
        validated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        report_path=str(out / REPORT),
        data_docs=docs,
    )
    report.write()
    if report.passed:
        log.info("validation passed: %s (report %s)", report.source, report.report_path)
    else:
        log.warning("validation failed: %d expectation(s) (report %s)", len(failures), report.report_path)
    if raise_on_failure and not report.passed:
        raise ValidationFailed(report)
    return report


def load_report(cfg: Config, report_dir: str | Path | None = None) -> dict[str, Any] | None:
    p = Path(report_dir or Path(cfg.paths.reports_dir) / "validation") / REPORT
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


def require_passed(cfg: Config, raw_dir: str | Path | None = None) -> dict[str, Any]:
    """The latest report must have passed on the bytes now in ``raw_dir``; else DataError."""
    raw = Path(raw_dir or cfg.paths.raw_dir)
    rep = load_report(cfg)
    where = Path(cfg.paths.reports_dir) / "validation" / REPORT
    if rep is None:
        raise DataError(f"{where}: no validation report; run `hllm data validate` before `hllm data build`")
    if not rep.get("passed"):
        raise DataError(
            f"{where}: the last validation FAILED; fix the data and run `hllm data validate` "
            "(nothing is built from data that failed validation)"
        )
    now = fingerprint(raw)
    if rep.get("fingerprint") != now:
        raise DataError(f"{raw}: changed since it was validated ({where}); run `hllm data validate` again")
    return rep
