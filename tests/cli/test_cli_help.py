"""`hllm --help` and every sub-command's `--help`: each command listed with a one-line description."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


def _commands():
    """(path, click command) of the whole `hllm` tree, groups included."""
    import typer

    from hllm.cli import app

    out, todo = [], [((), typer.main.get_command(app))]
    while todo:
        path, cmd = todo.pop()
        out.append((path, cmd))
        todo += [((*path, name), sub) for name, sub in getattr(cmd, "commands", {}).items()]
    return out


def test_every_command_has_a_one_line_description_and_every_option_a_help():
    found = _commands()
    assert {" ".join(p) for p, _ in found} >= {
        "train",
        "evaluate",
        "export",
        "recommend",
        "data import",
        "data build",
        "registry promote",
        "flows serve",
        "flows run nightly",
    }
    for path, cmd in found:
        summary = (cmd.help or "").strip().split("\n\n")[0]
        assert summary and len(summary.splitlines()) == 1, f"hllm {' '.join(path)}: first paragraph {summary!r}"
        for p in cmd.params:
            assert p.name == "help" or getattr(p, "help", None), f"hllm {' '.join(path)}: {p.name} has no help"


@pytest.mark.usefixtures("keep_root_logging")
def test_help_pages_list_each_sub_command_with_its_description():
    from hllm.cli import app

    for path, cmd in _commands():
        subs = getattr(cmd, "commands", {})
        if not subs:
            continue
        res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})  # no wrapping
        assert res.exit_code == 0, res.output
        for name, sub in subs.items():
            first = sub.help.strip().split("\n\n")[0]
            assert f"│ {name} " in res.output and first[:60] in res.output, (path, name, res.output)
