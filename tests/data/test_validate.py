"""Great Expectations validation: suites from the repo, thresholds from params, reports + Data Docs."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from hllm.cli import app
from hllm.data.errors import DataError
from hllm.data.ingest import read_source
from hllm.data.raw import INTERACTIONS, fingerprint, read_raw, write_raw
from hllm.data.validate import SUITES, ValidationFailed, load_suite, validate_raw
from tests.helpers.datakit import FORMATS, make_cfg


@pytest.fixture
def good(cfg):
    write_raw(read_source("hllm", [FORMATS / "hllm"]), cfg.paths.raw_dir)
    return cfg


def test_suites_live_in_the_repo_and_use_params():
    names = {s: load_suite(s) for s in SUITES}
    assert all(names[s]["name"] == s and names[s]["expectations"] for s in SUITES)
    text = json.dumps(names)
    for p in ("min_timestamp", "max_timestamp", "min_text_chars", "max_text_chars", "min_interactions_per_user"):
        assert f'{{"$PARAMETER": "{p}"}}' in text


def test_good_data_passes_with_report_and_data_docs(good):
    rep = validate_raw(good, data_docs=True)
    assert rep.passed and rep.failures == []
    saved = json.loads(Path(rep.report_path).read_text())
    assert saved["passed"] is True
    assert saved["fingerprint"] == fingerprint(good.paths.raw_dir)
    assert saved["thresholds"]["min_interactions_per_user"] == 3
    assert saved["tables"]["interactions"]["rows"] == 21 and saved["tables"]["users"]["rows"] == 6
    assert all(saved["tables"][t]["failed"] == 0 for t in SUITES)
    docs = Path(rep.data_docs)
    assert docs.name == "index.html" and docs.exists()
    pages = {p.parent.parent.parent.name for p in (docs.parent / "validations").rglob("*.html")}
    assert pages == set(SUITES)


def test_thresholds_come_from_params(tmp_path):
    cfg = make_cfg(
        tmp_path, "validate.min_interactions_per_user=4", "validate.max_text_chars=30", "validate.data_docs=false"
    )
    write_raw(read_source("hllm", [FORMATS / "hllm"]), cfg.paths.raw_dir)
    rep = validate_raw(cfg)
    assert not rep.passed and rep.data_docs is None
    by = {(f.table, f.column): f for f in rep.failures}
    users = by[("users", "n_interactions")]
    assert users.unexpected_count == 3
    assert sorted(users.examples) == ["user_id=u3: 3", "user_id=u4: 3", "user_id=u6: 3"]
    assert "at least 4 interactions" in users.why
    desc = by[("items", "description")]
    assert desc.examples == [
        "row 2: 'Folds small; boils a litre in 3 minutes.'",
        "row 3: 'Dark roast with notes of chocolate.'",
        "row 9: 'Nobody interacted with this item.'",
    ]


def test_missing_column_in_raw_parquet_is_reported_once(good):
    raw = read_raw(good.paths.raw_dir)
    import pyarrow.parquet as pq

    pq.write_table(raw.interactions.drop_columns(["timestamp"]), Path(good.paths.raw_dir) / INTERACTIONS)
    rep = validate_raw(good, data_docs=False)
    ts = [f for f in rep.failures if f.column == "timestamp" or "timestamp" in (f.column or "")]
    assert [(f.table, f.expectation) for f in ts] == [("interactions", "expect_column_to_exist")]
    with pytest.raises(ValidationFailed, match="required column timestamp"):
        validate_raw(good, data_docs=False, raise_on_failure=True)


def test_unreadable_or_missing_raw_names_the_file(cfg, tmp_path):
    with pytest.raises(DataError, match="interactions.parquet: missing"):
        validate_raw(cfg)
    write_raw(read_source("hllm", [FORMATS / "hllm"]), cfg.paths.raw_dir)
    (Path(cfg.paths.raw_dir) / INTERACTIONS).write_bytes(b"not parquet")
    with pytest.raises(DataError, match="interactions.parquet: not a readable parquet file"):
        validate_raw(cfg)


def test_cli_exit_codes(good, tmp_path):
    sets = ["--set", f"paths.raw_dir={good.paths.raw_dir}", "--set", f"paths.reports_dir={good.paths.reports_dir}"]
    ok = CliRunner().invoke(app, ["data", "validate", "--no-docs", *sets])
    assert ok.exit_code == 0 and "validation PASSED" in ok.output
    t = read_raw(good.paths.raw_dir)
    ts = t.interactions.column("timestamp").to_pylist()
    ts[0] = -1
    inter = t.interactions.set_column(2, "timestamp", pa.array(ts, pa.int64()))
    import pyarrow.parquet as pq

    pq.write_table(inter, Path(good.paths.raw_dir) / INTERACTIONS)
    bad = CliRunner().invoke(app, ["data", "validate", "--no-docs", *sets])
    assert bad.exit_code == 1
    assert "validation FAILED" in bad.output and "row 1: -1" in bad.output


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_over_the_suites_on_a_terminal_only(good, monkeypatch):
    """Long validations (minutes at 10M rows) show one bar over the suites on a terminal; none in logs/CI."""
    tty = _Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    assert validate_raw(good, data_docs=False).passed
    shown = tty.getvalue()
    assert "validate: 100%" in shown and f"{len(SUITES)}/{len(SUITES)}" in shown
    assert "table=interacted_items" in shown  # the postfix names the table being checked
    pipe = io.StringIO()  # not a terminal: silent
    monkeypatch.setattr(sys, "stderr", pipe)
    assert validate_raw(good, data_docs=False).passed
    assert "validate: " not in pipe.getvalue().replace("hllm.data.validate: ", "")  # log lines may go there
