"""The bad-input corpus (tests/fixtures/bad/<case>/): every case is rejected by `hllm data import`
with a message naming the file/row/column and an example bad value, exit code 1, no traceback,
and the raw data already in place is left byte-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hllm.cli import app
from hllm.data.ingest import read_source
from hllm.data.raw import fingerprint, write_raw
from tests.helpers.datakit import BAD, FORMATS

# case -> (stage that rejects it, substrings the message must contain)
CASES: dict[str, tuple[str, list[str]]] = {
    "missing_column": ("import", ["missing_column/interactions.csv: missing required column(s) ['timestamp']"]),
    "empty_file": ("import", ["empty_file/interactions.csv: file is empty"]),
    "non_utf8": ("import", ["non_utf8/items.csv: line 4, column 7: byte 0xe9 is not valid UTF-8"]),
    "truncated_csv": ("import", ["truncated_csv/interactions.csv: line 22: expected 3 fields, got 2: 'i2,u6'"]),
    "wrong_type": (
        "validate",
        [
            "interactions: column 'timestamp' expect_column_values_to_be_of_type failed",
            "expected int64, found str",
            "row 5: 'yesterday'",
        ],
    ),
    "null_user_id": (
        "validate",
        ["interactions: column 'user_id' expect_column_values_to_not_be_null failed", "(1 of 21 rows)", "row 3: null"],
    ),
    "duplicate_rows": (
        "validate",
        [
            "interactions: column 'user_id,item_id,timestamp' expect_compound_columns_to_be_unique failed",
            "row 9: user_id='u3', item_id='i5', timestamp=130",
            "row 10:",
        ],
    ),
    "negative_timestamp": (
        "validate",
        [
            "interactions: column 'timestamp' expect_column_values_to_be_between failed",
            "0 <= timestamp <=",
            "row 9: -5",
        ],
    ),
    "future_timestamp": (
        "validate",
        ["interactions: column 'timestamp' expect_column_values_to_be_between failed", "row 9: 4102444800"],
    ),
    "item_without_text": (
        "validate",
        ["interacted_items: column 'has_text'", "every interacted item has text", "item_id=i5"],
    ),
    "one_interaction_users": (
        "validate",
        ["users: column 'n_interactions'", "at least 3 interactions", "(4 of 4 rows)", "user_id=u1: 1"],
    ),
    "id_whitespace": (
        "validate",
        [
            "interactions: column 'user_id' expect_column_values_to_not_match_regex failed",
            "row 1: 'u1 '",
            "interactions: column 'item_id'",
            "row 12: ' i6'",
        ],
    ),
    "huge_text": (
        "validate",
        [
            "items: column 'description' expect_column_value_lengths_to_be_between failed",
            "at most 20000 characters",
            "row 2: 'very long text",
        ],
    ),
    "duplicate_item_ids": (
        "validate",
        ["items: column 'item_id' expect_column_values_to_be_unique failed", "row 2: 'i2', row 3: 'i2'"],
    ),
    "header_only": (
        "validate",
        ["interactions: expect_table_row_count_to_be_between failed", "at least one row", "observed 0"],
    ),
    "blank_title": (
        "validate",
        [
            "items: column 'title' expect_column_values_to_not_match_regex failed",
            "required text is not blank",
            "row 1: '   '",
        ],
    ),
}


def test_corpus_has_a_test_for_every_case():
    assert sorted(p.name for p in BAD.iterdir() if p.is_dir()) == sorted(CASES)
    assert len(CASES) >= 12


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_rejected_clearly_and_keeps_existing_data(case, tmp_path: Path):
    stage, expected = CASES[case]
    raw = tmp_path / "data" / "raw"
    reports = tmp_path / "reports"
    write_raw(read_source("hllm", [FORMATS / "hllm"]), raw)  # good data already in place
    before = fingerprint(raw)
    result = CliRunner().invoke(
        app,
        [
            "data",
            "import",
            "--format",
            "hllm",
            str(BAD / case),
            "--set",
            f"paths.raw_dir={raw}",
            "--set",
            f"paths.reports_dir={reports}",
            # Data Docs rendering (~0.5 s) is covered once in test_data_validate; the JSON report is checked here
            "--set",
            "validate.data_docs=false",
        ],
    )
    out = result.output
    assert result.exit_code == 1, out
    assert "Traceback" not in out and result.exception is None or isinstance(result.exception, SystemExit)
    for text in expected:
        assert text in out, f"{case}: {text!r} not in:\n{out}"
    assert "nothing was imported" in out
    assert fingerprint(raw) == before  # nothing already stored is lost or overwritten
    assert not list(raw.parent.glob(".raw-staging-*"))
    report = reports / "validation" / "report.json"
    if stage == "validate":
        rep = json.loads(report.read_text())
        assert rep["passed"] is False and rep["failures"]
        assert all(f["table"] and f["expectation"] for f in rep["failures"])
    else:
        assert not report.exists()  # could not be parsed: rejected before validation
