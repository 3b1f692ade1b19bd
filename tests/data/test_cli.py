"""`hllm data ...` end to end on a small synthetic dataset, and the help texts."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from hllm.cli import app
from hllm.data.dataset import load_built


def test_every_data_command_has_a_one_line_help():
    out = CliRunner().invoke(app, ["data", "--help"]).output
    for cmd in ("import", "synth", "validate", "build", "stats", "push", "pull"):
        assert f"│ {cmd} " in out, out


def test_synth_validate_build_stats(tmp_path: Path, tiny_synth):
    sets = []
    for s in [
        f"paths.raw_dir={tmp_path / 'raw'}",
        f"paths.built_dir={tmp_path / 'built'}",
        f"paths.reports_dir={tmp_path / 'reports'}",
        "validate.data_docs=false",
        "build.tokenize=false",
        *tiny_synth,
    ]:
        sets += ["--set", s]
    r = CliRunner()
    assert r.invoke(app, ["data", "build", *sets]).exit_code == 1  # nothing to build yet
    res = r.invoke(app, ["data", "synth", *sets])
    assert res.exit_code == 0 and "60 users, 80 items, seed 2024" in res.output
    built = r.invoke(app, ["data", "build", *sets])
    assert built.exit_code == 1 and "no validation report; run `hllm data validate`" in built.output
    val = r.invoke(app, ["data", "validate", *sets])
    assert val.exit_code == 0 and "validation PASSED" in val.output
    built = r.invoke(app, ["data", "build", *sets])
    assert built.exit_code == 0, built.output
    b = load_built(tmp_path / "built")
    assert b.n_users == b.stats["users"] and b.n_items == b.stats["items"] + 1
    st = r.invoke(app, ["data", "stats", *sets])
    assert st.exit_code == 0 and f"users         {b.n_users:>12,}" in st.output
    js = r.invoke(app, ["data", "stats", "--json", *sets])
    assert json.loads(js.output)["interactions"] == int(b.sequences.offsets[-1])
    bad = r.invoke(app, ["data", "import", "--format", "parquet", "x", *sets])
    assert bad.exit_code == 2 and "choose one of hllm, amazon, movielens, recbole" in bad.output
