"""README and docs/ stay true: every relative link resolves, every `hllm ...` command they show exists
in the CLI, and the README stays a README (short; the manual lives in docs/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from hllm.cli import app

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```(?:bash|sh|console)\n(.*?)```", re.S)  # command blocks; untagged blocks are output


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not t.startswith(("http://", "https://", "mailto:"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def cli_commands(page: Path) -> list[list[str]]:
    out = []
    for block in FENCE.findall(page.read_text()):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("hllm "):
                out.append(line.split()[1:])
    return out


def resolve(words: list[str]) -> list[str]:
    """The command path a line names (``flows run nightly`` -> ``[flows, run]``); raises if unknown."""
    cmd = typer.main.get_command(app)
    path: list[str] = []
    for w in words:
        if not hasattr(cmd, "list_commands") or w.startswith("-"):
            break
        sub = cmd.get_command(cmd.context_class(cmd), w)
        if sub is None:
            raise LookupError(f"hllm {' '.join(path + [w])}: no such command")
        cmd, path = sub, path + [w]
    if hasattr(cmd, "list_commands"):
        raise LookupError(f"hllm {' '.join(path)}: a command group, not a command")
    return path


def test_readme_commands_exist() -> None:
    found = {p.name: cli_commands(p) for p in PAGES}
    assert found["README.md"], "the README shows no hllm command"
    problems = []
    for name, lines in found.items():
        for words in lines:
            try:
                resolve(words)
            except LookupError as e:
                problems.append(f"{name}: {e}")
    assert not problems


def test_resolve_refuses_an_unknown_command() -> None:
    assert resolve(["registry", "promote", "3"]) == ["registry", "promote"]
    with pytest.raises(LookupError):
        resolve(["registry", "promot", "3"])


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: move reference material to docs/"
    assert lines[2:6] and lines[3].startswith("make run") and lines[4].startswith("make test")
