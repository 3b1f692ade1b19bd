"""Crashes inside the data operations, for real: a subprocess runs the library call with a failpoint
armed (``HLLM_FAILPOINTS``, :mod:`hllm.faults`) and is SIGKILLed there; then recovery must leave
``data/raw``, ``data.dvc`` and the DVC remote in agreement (real DVC repo, local remote)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hllm.config import Config
from hllm.data import journal, versioning
from hllm.data.raw import recover_dir, replace_dir
from tests.helpers.flowkit import sh


def _in_child(code: str, cwd: Path, point: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python with ``point`` armed; it must die by SIGKILL there."""
    env = {**os.environ, "HLLM_FAILPOINTS": point, "HLLM_FAILPOINTS_TRAIL": str(cwd / "trail")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert (cwd / "trail").read_text().split()[0] == point
    return proc


def _write(d: Path, **files: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def _contents(d: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(d.iterdir()) if p.is_file()}


def test_failpoints_cost_nothing_unless_named(tmp_path):
    code = "from hllm import faults; faults.point('a:start'); print('alive')"
    env = {**os.environ, "HLLM_FAILPOINTS": "a:end, b:start"}  # exact names only
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "alive" in proc.stdout
    _in_child(code, tmp_path, "a:start")


def test_a_crash_between_the_renames_is_undone(tmp_path):
    raw = _write(tmp_path / "data" / "raw", **{"a.txt": "old"})
    new = _write(tmp_path / "data" / ".raw-staging-x", **{"a.txt": "new"})
    code = (
        "from pathlib import Path; from hllm.data.raw import replace_dir; "
        f"replace_dir(Path({str(new)!r}), Path({str(raw)!r}))"
    )
    _in_child(code, tmp_path, "publish:between-renames")
    assert not raw.exists()  # the crash left no data/raw at all
    assert recover_dir(raw) is not None
    assert _contents(raw) == {"a.txt": "old"} and not list(raw.parent.glob(".raw-old-*"))
    assert recover_dir(raw) is None  # idempotent


def test_a_completed_swap_only_loses_its_cleanup(tmp_path):
    raw = _write(tmp_path / "data" / "raw", **{"a.txt": "old"})
    replace_dir(_write(tmp_path / "data" / ".raw-staging-y", **{"a.txt": "new"}), raw)
    _write(tmp_path / "data" / ".raw-old-deadbeef", **{"a.txt": "older"})  # what a crash before rmtree leaves
    recover_dir(raw)
    assert _contents(raw) == {"a.txt": "new"} and not list(raw.parent.glob(".raw-old-*"))


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A git + DVC repo with a local remote and version A of data/raw recorded and pushed."""
    sh("git", "init", "-q", cwd=tmp_path)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=tmp_path)
    sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"), cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "data" / "raw", **{"interactions.txt": "A1", "items.txt": "A2"})
    versioning.add_and_push("data/raw")
    return tmp_path


def _md5() -> str:
    return yaml.safe_load(Path("data.dvc").read_text())["outs"][0]["md5"]


def _clean(repo: Path) -> None:
    for args in (["status", "--json", "data.dvc"], ["status", "-c", "--json", "data.dvc"]):
        out = versioning.dvc(*args, repo=repo).stdout
        assert json.loads(out or "{}") == {}, (args, out)


def _publish_b(cfg: Config, repo: Path) -> None:
    """What the flow does before a crash: marker, then the new version B swapped into data/raw."""
    journal.begin(cfg, "flow-run-1")
    staged = _write(repo / "data" / ".raw-staging-b", **{"interactions.txt": "B1", "items.txt": "B2", "new.txt": "B3"})
    journal.note(cfg, staged=str(staged))
    replace_dir(staged, repo / "data" / "raw")


def test_killed_between_cache_and_data_dvc_rolls_back_to_data_dvc(repo):
    cfg = Config()
    md5_a = _md5()
    _publish_b(cfg, repo)
    code = "from hllm.data import versioning; versioning.add('data/raw')"
    _in_child(code, repo, "dvc-add:cache-written")  # the dvc child kills this Python, then itself
    assert _md5() == md5_a  # data.dvc still names A, data/raw holds B: the mix the journal undoes
    done = journal.recover(cfg)
    assert any("rolled back" in d for d in done)
    assert _contents(repo / "data" / "raw") == {"interactions.txt": "A1", "items.txt": "A2"}
    assert journal.read(cfg) is None
    _clean(repo)


def test_killed_mid_push_leaves_no_incomplete_version_and_recovery_pushes_it(repo):
    cfg = Config()
    _publish_b(cfg, repo)
    versioning.add("data/raw")
    md5_b = _md5()
    _in_child("from hllm.data import versioning; versioning.push()", repo, "dvc-push:files-uploaded")
    objs = repo / "remote" / "files" / "md5"
    assert not (objs / md5_b[:2] / md5_b[2:]).exists()  # DVC uploads the .dir manifest last
    for d in objs.glob("*/*.dir"):  # what the remote lists is complete
        assert all((objs / e["md5"][:2] / e["md5"][2:]).exists() for e in json.loads(d.read_text()))
    journal.recover(cfg)
    assert (objs / md5_b[:2] / md5_b[2:]).exists()
    assert _contents(repo / "data" / "raw")["new.txt"] == "B3" and journal.read(cfg) is None
    _clean(repo)


def test_no_marker_no_recovery(repo):
    assert journal.recover(Config()) == []
