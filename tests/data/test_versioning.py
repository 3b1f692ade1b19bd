"""DVC versioning in throw-away git repos (never the project's own .dvc state): the committed data.dvc
is what a fresh `hllm data synth` produces, and any pushed version comes back byte-identical with
`dvc pull`, through a local-folder remote and through an S3 remote served by moto over HTTP."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hllm.cli import app
from hllm.data.raw import fingerprint
from hllm.data.versioning import add, add_and_push, dvc, pull, read_version

REPO = Path(__file__).resolve().parents[2]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}

pytestmark = pytest.mark.slow


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, text=True, capture_output=True, env={**os.environ, **GIT_ENV}
    ).stdout.strip()


def new_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q")
    dvc("init", "-q", repo=path)
    return path


def synth(repo: Path, *sets: str) -> None:
    """`hllm data synth` in its own process (a fresh interpreter: no state shared with this one)."""
    cmd = [str(Path(sys.executable).parent / "hllm")]
    args = [*cmd, "data", "synth", "--params", str(repo / "params.yaml")]
    for s in sets:
        args += ["--set", s]
    subprocess.run(args, cwd=repo, check=True, capture_output=True, text=True)


def test_committed_data_dvc_is_what_a_fresh_synth_produces(tmp_path):
    repo = new_repo(tmp_path / "clone")
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    synth(repo)
    assert add(repo=repo).md5 == read_version(REPO / "data.dvc").md5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_remote():
    """A real HTTP S3 endpoint on loopback: moto's server (moto is the S3 implementation; boto3 and
    DVC's s3fs talk to it over HTTP exactly as to AWS or MinIO)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    s3 = boto3.client(
        "s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    s3.create_bucket(Bucket="hllm-dvc")
    yield url, s3
    server.stop()


def configure_remote(repo: Path, kind: str, s3_remote=None) -> str:
    if kind == "local":
        dvc("remote", "add", "-d", "store", str(repo.parent / "remote"), repo=repo)
    else:
        url, _ = s3_remote
        dvc("remote", "add", "-d", "store", "s3://hllm-dvc/store", repo=repo)
        dvc("remote", "modify", "store", "endpointurl", url, repo=repo)
        dvc("remote", "modify", "store", "region", "us-east-1", repo=repo)
        # credentials never go to the committed config
        dvc("remote", "modify", "--local", "store", "access_key_id", "testing", repo=repo)
        dvc("remote", "modify", "--local", "store", "secret_access_key", "testing", repo=repo)
    git(repo, "add", ".dvc/config")
    git(repo, "commit", "-q", "-m", "remote")
    return "store"


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_reproduce_version_a_after_version_b(kind, tmp_path, request):
    s3 = request.getfixturevalue("s3_remote") if kind == "s3" else None
    repo = new_repo(tmp_path / "repo")
    remote = configure_remote(repo, kind, s3)
    assert "secret_access_key" not in (repo / ".dvc" / "config").read_text()
    tiny = ["synth.n_users=40", "synth.n_items=50"]
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")

    synth(repo, *tiny, "synth.seed=1")
    a_bytes = fingerprint(repo / "data" / "raw")
    a = add_and_push(repo=repo, remote=remote)
    git(repo, "add", "data.dvc", "data/.gitignore")
    git(repo, "commit", "-q", "-m", "version A")
    rev_a = git(repo, "rev-parse", "HEAD")

    synth(repo, *tiny, "synth.seed=2")
    b = add_and_push(repo=repo, remote=remote)
    git(repo, "commit", "-q", "-m", "version B", "data.dvc")
    assert a.md5 != b.md5 and fingerprint(repo / "data" / "raw") != a_bytes

    if kind == "s3":
        keys = [o["Key"] for o in s3[1].list_objects_v2(Bucket="hllm-dvc").get("Contents", [])]
        digest = a.md5.removesuffix(".dir")
        assert f"store/files/md5/{digest[:2]}/{digest[2:]}.dir" in keys

    # The user's recipe: check out A's data.dvc, pull. Empty the cache so the bytes must come from the remote.
    git(repo, "checkout", rev_a, "--", "data.dvc")
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "raw")
    v = pull(repo=repo, remote=remote)
    assert v.md5 == a.md5
    assert fingerprint(repo / "data" / "raw") == a_bytes


def test_cli_push_and_pull_use_the_default_remote(tmp_path, monkeypatch):
    monkeypatch.delenv("HLLM_DVC_REMOTE_URL", raising=False)
    repo = new_repo(tmp_path / "repo")
    configure_remote(repo, "local")
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    synth(repo, "synth.n_users=30", "synth.n_items=40")
    before = fingerprint(repo / "data" / "raw")
    monkeypatch.chdir(repo)
    pushed = CliRunner().invoke(app, ["data", "push"])
    assert pushed.exit_code == 0, pushed.output
    md5 = read_version(repo / "data.dvc").md5
    assert f"dataset version {md5}" in pushed.output
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "raw")
    pulled = CliRunner().invoke(app, ["data", "pull"])
    assert pulled.exit_code == 0, pulled.output
    assert fingerprint(repo / "data" / "raw") == before
    # no data.dvc to pull from: a clear error, not a traceback
    (repo / "data.dvc").unlink()
    missing = CliRunner().invoke(app, ["data", "pull"])
    assert missing.exit_code == 1 and "data.dvc: no such DVC file" in missing.output


def test_cli_push_and_pull_follow_the_stack_remote_variable(tmp_path, monkeypatch):
    """On the shared stack $HLLM_DVC_REMOTE_URL names the store: `hllm data push|pull` use remote `s3`
    pointed there (in the git-ignored config.local), as the nightly flow does. A folder URL stands in
    for the bucket; the S3 path itself is covered by tests/flows/test_flow_io.py against moto."""
    repo = new_repo(tmp_path / "repo")
    configure_remote(repo, "local")
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    synth(repo, "synth.n_users=30", "synth.n_items=40")
    store = tmp_path / "team-store"
    monkeypatch.setenv("HLLM_DVC_REMOTE_URL", str(store))
    monkeypatch.chdir(repo)
    pushed = CliRunner().invoke(app, ["data", "push"])
    assert pushed.exit_code == 0, pushed.output
    md5 = read_version(repo / "data.dvc").md5
    assert (store / "files" / "md5" / md5[:2] / f"{md5[2:]}").is_file()
    assert str(store) in (repo / ".dvc" / "config.local").read_text()
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "raw")
    pulled = CliRunner().invoke(app, ["data", "pull"])
    assert pulled.exit_code == 0, pulled.output
    assert f"dataset version {md5}" in pulled.output


def test_bare_dvc_pull_in_a_clone_restores_the_dataset(tmp_path):
    """The user story as written: in a clone of a project whose data version was pushed, a bare
    `dvc pull` (no target) exits 0 and restores data/raw. The project's own dvc.yaml and dvc.lock
    name the pipeline outputs (data/built, runs/, exports/); they are never pushed, so they must be
    `cache: false`, or the bare pull fails on them."""
    origin = new_repo(tmp_path / "origin")
    for f in ("params.yaml", "dvc.yaml", "dvc.lock"):
        shutil.copy(REPO / f, origin / f)
    remote = configure_remote(origin, "local")
    synth(origin, "synth.n_users=40", "synth.n_items=50")
    pushed = add_and_push(repo=origin, remote=remote)
    raw = fingerprint(origin / "data" / "raw")
    git(origin, "add", "-A")
    git(origin, "commit", "-q", "-m", "data version")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    proc = subprocess.run([sys.executable, "-m", "dvc", "pull"], cwd=clone, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fingerprint(clone / "data" / "raw") == raw and read_version(clone / "data.dvc").md5 == pushed.md5
    assert not (clone / "data" / "built").exists()  # rebuilt by `dvc repro`, not pulled
