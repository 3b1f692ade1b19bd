"""The nightly flow's I/O choices, each against the real thing: which DVC remote a data version is
pushed to (DVC and moto's S3 server over HTTP), which failures the I/O tasks retry (Prefect's test
API), and which snapshot a dated prefix names (a folder, and S3 through moto)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from hllm.config import ConfigError, load_config
from hllm.data.errors import DataError
from tests.helpers.flowkit import sh

REPO = Path(__file__).resolve().parents[2]


def _bucket(name: str) -> None:
    import boto3

    s3 = boto3.client("s3")
    try:
        s3.create_bucket(Bucket=name)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass


def _keys(bucket: str) -> set[str]:
    import boto3

    return {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])}


def _dvc(*args: str, cwd: Path) -> str:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd).strip()


@pytest.fixture
def clone(tmp_path, monkeypatch) -> Path:
    """A project with the repository's committed .dvc/config (default remote `local`, remote `s3`)
    and one data version recorded in data.dvc."""
    from hllm.data import versioning

    root = tmp_path / "clone"
    root.mkdir()
    sh("git", "init", "-q", cwd=root)
    _dvc("init", "-q", cwd=root)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "interactions.csv").write_text("user_id,item_id\nu1,i1\n")
    monkeypatch.chdir(root)
    monkeypatch.delenv("HLLM_DVC_REMOTE_URL", raising=False)
    versioning.add("data/raw")
    return root


@pytest.mark.slow
def test_the_data_version_goes_where_config_and_environment_say(clone, s3, monkeypatch):
    from flows import tasks as T
    from hllm.data.versioning import read_version

    md5 = read_version().md5
    obj = f"files/md5/{md5[:2]}/{md5[2:]}"
    committed = (clone / ".dvc" / "config").read_text()
    cfg = load_config(None, [])
    assert cfg.flow.dvc_remote == ""

    # 1. no stack variable: DVC's default remote of .dvc/config (`local`, ../dvc-storage)
    assert T.dvc_remote(cfg) is None
    assert T.dvc_push.fn(cfg) == "local"
    assert (clone / "dvc-storage" / obj).is_file()

    # 2. the stack's variable with the committed URL: remote `s3`, nothing written to the config
    committed_url = _dvc("config", "remote.s3.url", cwd=clone)
    _bucket(committed_url.removeprefix("s3://").split("/")[0])
    monkeypatch.setenv("HLLM_DVC_REMOTE_URL", committed_url)
    assert T.dvc_push.fn(cfg) == "s3"
    assert f"store/{obj}" in _keys("hllm-dvc")
    assert not (clone / ".dvc" / "config.local").exists()

    # 3. another bucket: the URL goes into the git-ignored config.local, .dvc/config stays as committed
    _bucket("team-dvc-other")
    monkeypatch.setenv("HLLM_DVC_REMOTE_URL", "s3://team-dvc-other/versions")
    assert T.dvc_push.fn(cfg) == "s3"
    assert f"versions/{obj}" in _keys("team-dvc-other")
    assert (clone / ".dvc" / "config").read_text() == committed
    assert "s3://team-dvc-other/versions" in (clone / ".dvc" / "config.local").read_text()
    assert sh("git", "status", "--porcelain", "--ignored", ".dvc/config.local", cwd=clone).startswith("!!")

    # 4. flow.dvc_remote names a remote: it wins over the environment
    assert T.dvc_remote(load_config(None, ["flow.dvc_remote=local"])) == "local"


def test_the_stack_remote_is_added_locally_when_the_repository_has_none(tmp_path, monkeypatch):
    from flows import tasks as T

    sh("git", "init", "-q", cwd=tmp_path)
    _dvc("init", "-q", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HLLM_DVC_REMOTE_URL", "s3://somewhere-else/store")
    assert T.dvc_remote(load_config(None, [])) == "s3"
    assert _dvc("config", "--local", "remote.s3.url", cwd=tmp_path) == "s3://somewhere-else/store"


@pytest.mark.usefixtures("prefect_api")
def test_io_tasks_retry_io_errors_but_not_bad_input(tmp_path):
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    from flows.tasks import io_retry

    cfg = load_config(None, ["flow.io_retries=2", "flow.io_retry_delay_s=0"])
    calls: list[str] = []

    @task(cache_policy=NO_CACHE)
    def fails_with(exc: Exception) -> None:
        calls.append(type(exc).__name__)
        raise exc

    for exc, attempts in (
        (DataError("s3://b/p: no objects under this prefix"), 1),
        (ConfigError("flow.snapshot_format: unknown"), 1),
        (ConnectionError("endpoint unreachable"), 3),
    ):
        calls.clear()
        with pytest.raises(type(exc)):
            fails_with.with_options(**io_retry(cfg))(exc)
        assert calls == [type(exc).__name__] * attempts


def test_a_folder_ending_in_slash_means_its_newest_dated_child(tmp_path):
    from hllm.data.snapshot import resolve

    for name in ("2026-11-22", "20261124", "2026-11-23T0200", "notes", "2026-1-30"):
        (tmp_path / name).mkdir()
    (tmp_path / "2026-12-31.csv").write_text("a file, not a snapshot folder")
    assert resolve(f"{tmp_path}/") == f"{tmp_path}/20261124"
    assert resolve(str(tmp_path)) == str(tmp_path)  # no "/": the location itself
    (tmp_path / "2026-12-01").mkdir()
    assert resolve(f"{tmp_path}/") == f"{tmp_path}/2026-12-01"  # dates compare as dates across formats
    assert resolve(f"{tmp_path / 'notes'}/") == f"{tmp_path / 'notes'}/"  # no dated children: itself
    assert resolve(None) is None and resolve("") == ""
    with pytest.raises(DataError, match="nowhere/: snapshot folder does not exist"):
        resolve(f"{tmp_path / 'nowhere'}/")


def test_the_flow_takes_the_newest_snapshot_under_a_prefix(tmp_path, s3, raw_snapshot):
    from flows import tasks as T
    from hllm.data.snapshot import resolve
    from tests.helpers.flowkit import upload

    # S3: dated "folders" under the prefix; the newest is taken, undated ones and loose objects are not
    for day in ("2026-11-21", "2026-11-23"):
        upload(raw_snapshot, "shop-logs", f"daily/{day}")
    upload(raw_snapshot, "shop-logs", "daily/misc")
    import boto3

    boto3.client("s3").put_object(Bucket="shop-logs", Key="daily/2026-12-31.txt", Body=b"x")
    assert resolve("s3://shop-logs/daily/") == "s3://shop-logs/daily/2026-11-23/"
    assert resolve("s3://shop-logs/daily/misc/") == "s3://shop-logs/daily/misc/"

    # the flow's snapshot task: a folder given with "/" stages its newest dated child and says which
    cfg = load_config(None, [f"paths.raw_dir={tmp_path / 'data' / 'raw'}"])
    assert raw_snapshot.name == "2026-11-23"
    out = T.stage_snapshot.fn(cfg, f"{raw_snapshot.parent}/", "raw")
    assert out["source"] == f"{raw_snapshot.parent}/{raw_snapshot.name}"
    assert {p.name for p in Path(out["staged"]).iterdir()} >= {"interactions.parquet", "items.parquet"}
    out = T.stage_snapshot.fn(cfg, "s3://shop-logs/daily/", "raw")
    assert out["source"] == "s3://shop-logs/daily/2026-11-23/"
