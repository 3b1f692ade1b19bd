"""The A/B service end to end: a real SQLite MLflow store with registered tiny models, a real uvicorn
server on 127.0.0.1, real HTTP requests; plus the Parquet logs and the registry -> experiment rule."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pandas as pd
import pytest

from hllm.abtest import logs as ablogs
from hllm.abtest.assignment import Experiment, assign
from hllm.abtest.service import DEFAULT_LAYER, ServeOptions, create_app, experiment_from_tags
from hllm.config import Config
from hllm.ops import tracking

# --------------------------------------------------------------------------- fast: the experiment rule


def test_share_becomes_balanced_arms_bound_to_versions():
    e = experiment_from_tags(
        "m", "1", "2", {"ab.share": "0.1", "ab.start": "2026-01-01T00:00:00+00:00"}, default_share=0.2
    )
    assert (e.exposure, e.split, e.champion_version, e.challenger_version) == (0.2, 0.5, "1", "2")
    assert e.experiment_id.startswith("m-v1-v2-") and e.layer == DEFAULT_LAYER
    assert experiment_from_tags("m", "1", "2", {"ab.share": "0.7"}, default_share=0.1).exposure == 1.0
    assert experiment_from_tags("m", "1", "2", {"ab.share": "0.7"}, default_share=0.1).split == 0.7
    assert experiment_from_tags("m", "1", "2", {}, default_share=0.25).exposure == 0.5  # registry default
    # another pair or another start is another experiment (new salts)
    other = experiment_from_tags(
        "m", "1", "3", {"ab.share": "0.1", "ab.start": "2026-01-01T00:00:00+00:00"}, default_share=0.2
    )
    later = experiment_from_tags(
        "m", "1", "2", {"ab.share": "0.1", "ab.start": "2026-02-01T00:00:00+00:00"}, default_share=0.2
    )
    assert len({e.experiment_id, other.experiment_id, later.experiment_id}) == 3
    with pytest.raises(ValueError):
        experiment_from_tags("m", "1", "2", {"ab.share": "1.5"}, default_share=0.1)


# --------------------------------------------------------------------------- fast: the logs


def _exposure(i: int) -> dict[str, Any]:
    return {
        "exposure_id": f"e{i}",
        "ts": datetime.now(UTC),
        "unit_id": f"u{i}",
        "in_experiment": True,
        "intended_arm": "challenger",
        "served_arm": "champion",
        "model_name": "m",
        "model_version": "1",
        "model_uri": "models:/m/1",
        "request_kind": "user",
        "k": 2,
        "items": ["a", "b"],
        "scores": [0.5, 0.25],
        "latency_ms": 1.5,
        "fallback": True,
        "mode": "ab",
    }


def test_logs_batch_by_count_and_time_and_flush_on_close(tmp_path):
    w = ablogs.PartWriter(tmp_path, ablogs.EXPOSURES, flush_every=3, flush_s=0.2)
    for i in range(3):
        w.append(_exposure(i))
    assert len(ablogs.part_files(tmp_path, ablogs.EXPOSURES)) == 1  # the count flushed synchronously
    w.append(_exposure(3))
    deadline = time.monotonic() + 5
    while len(ablogs.part_files(tmp_path, ablogs.EXPOSURES)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(ablogs.part_files(tmp_path, ablogs.EXPOSURES)) == 2  # the timer flushed the 4th
    w.flush_s = 3600
    w.close()
    w.close()  # idempotent
    with pytest.raises(RuntimeError):
        w.append(_exposure(9))
    df = ablogs.read_exposures(tmp_path)
    assert sorted(df["exposure_id"]) == ["e0", "e1", "e2", "e3"]
    assert list(df["items"].iloc[0]) == ["a", "b"] and bool(df["fallback"].iloc[0])
    assert df["experiment_id"].isna().all()  # optional fields default to null
    names = [p.name for p in (tmp_path / "exposures").iterdir()]
    assert all(n.startswith("part-") and n.endswith(".parquet") for n in names)  # no temp file left behind


def test_logs_close_writes_the_last_batch_and_reader_skips_temp_files(tmp_path):
    logs = ablogs.LogWriter(tmp_path, flush_every=1000, flush_s=3600)
    logs.exposures.append(_exposure(0))
    logs.outcomes.append(
        {
            "exposure_id": "e0",
            "ts": datetime.now(UTC),
            "event": "click",
            "item_id": "a",
            "position": 0,
            "known_exposure": True,
        }
    )
    assert ablogs.read_exposures(tmp_path).empty and ablogs.read_outcomes(tmp_path).empty
    (tmp_path / "exposures" / ".part-torn.parquet.tmp").write_bytes(b"PAR1 torn")  # a crash mid-write
    logs.close()
    assert len(ablogs.read_exposures(tmp_path)) == 1
    out = ablogs.read_outcomes(tmp_path)
    assert out.to_dict("records")[0]["event"] == "click" and out["position"].iloc[0] == 0


def test_logs_through_an_fsspec_filesystem(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    w = ablogs.PartWriter(str(tmp_path / "remote"), ablogs.EXPOSURES, filesystem=fs, flush_every=2, flush_s=3600)
    w.append(_exposure(0))
    w.append(_exposure(1))
    w.close()
    assert len(ablogs.read_exposures(str(tmp_path / "remote"), filesystem=fs)) == 2


# --------------------------------------------------------------------------- the registry and the server


def _set_challenger(cfg: Config, version: str, share: float) -> None:
    client = tracking.client(cfg)
    name = cfg.registry.model_name
    for k, v in {"ab.share": str(share), "ab.start": datetime.now(UTC).isoformat(), "ab.status": "running"}.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_alias(name, "challenger", version)


def _registry(store: Path, tiny: dict, name: str) -> SimpleNamespace:
    from tests.helpers.reghelpers import log_trained

    c = Config()
    c.tracking.tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
    c.tracking.experiment = f"{name}-runs"
    c.registry.model_name = name
    c.registry.audit_experiment = f"{name}-audit"
    versions = [log_trained(c, tiny, kind)[1] for kind in ("hllm", "pop", "hllm")]
    tracking.client(c).set_registered_model_alias(name, "champion", versions[0])
    _set_challenger(c, versions[1], 0.3)
    export = Path(tiny["hllm"]["export"])
    users = pd.read_parquet(export / "users.parquet")["user_id"].astype(str).tolist()
    items = pd.read_parquet(export / "items.parquet")["item_id"].astype(str).tolist()
    return SimpleNamespace(cfg=c, v1=versions[0], v2=versions[1], v3=versions[2], users=users, items=items)


@pytest.fixture(scope="module")
def reg(store, tiny):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(store)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.setenv("HLLM_ACTOR", "tester")
        yield _registry(store, tiny, "ab-serve")


class Server:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a thread; stopping it runs the shutdown."""

    def __init__(self, app: Any) -> None:
        import socket

        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def service(self) -> Any:
        return self.app.state.service

    def start(self, timeout: float = 60) -> Server:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready: {self.service.status()}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def _serve(cfg: Config, tmp: Path, **opts: Any) -> Server:
    base = {"log_dir": str(tmp / "logs"), "poll_s": 0.1, "challenger_timeout_s": 0.3, "max_history": 20}
    return Server(create_app(cfg, ServeOptions(**{**base, **opts}))).start()


@pytest.fixture(scope="module")
def srv(reg, tmp_path_factory):
    s = _serve(reg.cfg, tmp_path_factory.mktemp("srv"))
    yield s
    s.stop()


def _expected(reg: SimpleNamespace, experiment_id: str, champion: str, challenger: str) -> Experiment:
    """The experiment as the module docstring defines it: share 0.3 -> exposure 0.6, split 0.5."""
    return Experiment(experiment_id, DEFAULT_LAYER, champion, challenger, exposure=0.6, split=0.5)


@pytest.mark.slow
def test_arms_are_sticky_follow_assign_and_answer_k_items(reg, srv):
    c = httpx.Client(base_url=srv.url, timeout=10)
    first = c.post("/recommend", json={"user_id": reg.users[0], "k": 5}).json()
    eid = first["experiment_id"]
    assert eid.startswith(f"ab-serve-v{reg.v1}-v{reg.v2}-")
    exp = _expected(reg, eid, reg.v1, reg.v2)
    arms = {}
    for u in reg.users:
        r1, r2 = (c.post("/recommend", json={"user_id": u, "k": 5}) for _ in range(2))
        assert r1.status_code == r2.status_code == 200, r1.text
        a, b = r1.json(), r2.json()
        want = assign(exp, u).arm
        assert a["arm"] == b["arm"] == want  # sticky, and the split is assign()'s
        assert a["served_arm"] == ("challenger" if want == "challenger" else "champion")
        assert a["model_version"] == (reg.v2 if want == "challenger" else reg.v1) == b["model_version"]
        assert len(a["items"]) == len(a["scores"]) == 5 and a["items"] == b["items"]
        assert a["exposure_id"] != b["exposure_id"] and not a["fallback"]
        arms[u] = want
    assert set(arms.values()) == {"champion", "challenger", None}  # in both arms, and outside the experiment
    # an unknown user with a history is scored from it (and still assigned); an anonymous history gets the champion
    hist = reg.items[2:6]
    new = c.post("/recommend", json={"user_id": "brand-new-user", "history": hist, "k": 3}).json()
    assert len(new["items"]) == 3 and new["arm"] == assign(exp, "brand-new-user").arm
    anon = c.post("/recommend", json={"history": hist}).json()
    assert anon["arm"] is None and anon["served_arm"] == "champion" and len(anon["items"]) == 10
    assert c.get("/healthz").json()["challenger"] == reg.v2


@pytest.mark.slow
def test_bad_requests_are_4xx_naming_the_field(reg, srv):
    c = httpx.Client(base_url=srv.url, timeout=10)
    u, known = reg.users[0], reg.items[1:4]
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/recommend", {"content": b'{"user_id": ', "headers": {"content-type": "application/json"}}, "json"),
        ("/recommend", {"content": b"user_id=u1", "headers": {"content-type": "text/plain"}}, ""),
        ("/recommend", {"json": [1, 2]}, ""),
        ("/recommend", {"json": {"user_id": u, "colour": "red"}}, "colour"),
        ("/recommend", {"json": {"user_id": u, "k": 0}}, "k"),
        ("/recommend", {"json": {"user_id": u, "k": 101}}, "k"),
        ("/recommend", {"json": {"user_id": u, "k": "ten"}}, "k"),
        ("/recommend", {"json": {"user_id": 123}}, "user_id"),
        ("/recommend", {"json": {"history": "i0001"}}, "history"),
        ("/recommend", {"json": {}}, "user_id"),
        ("/recommend", {"json": {"user_id": "nobody-knows-me"}}, "user_id"),
        ("/recommend", {"json": {"user_id": "nobody", "history": [*known, "no-such-item"]}}, "no-such-item"),
        ("/recommend", {"json": {"history": reg.items[1:22]}}, "history"),  # 21 > max_history 20
        ("/feedback", {"json": {"exposure_id": "x", "event": "purchase", "item_id": "a"}}, "event"),
        ("/feedback", {"json": {"event": "click", "item_id": "a"}}, "exposure_id"),
    ]
    for path, kwargs, field in cases:
        r = c.post(path, **kwargs)
        assert 400 <= r.status_code < 500, (kwargs, r.status_code, r.text)
        assert field in r.text, (kwargs, r.text)
    assert c.post("/recommend", json={"user_id": "nobody-knows-me"}).status_code == 404
    assert "unknown user_id" in c.post("/recommend", json={"user_id": "nobody-knows-me"}).text
    metrics = c.get("/metrics").text
    assert (
        'status="500"' not in metrics
        and 'hllm_requests_total{endpoint="/recommend",arm="none",status="422"}' in metrics
    )
    assert c.post("/recommend", json={"user_id": u}).status_code == 200  # and the server is still fine


@pytest.mark.slow
def test_feedback_is_logged_and_joins_by_exposure_id(reg, srv):
    c = httpx.Client(base_url=srv.url, timeout=10)
    rec = c.post("/recommend", json={"user_id": reg.users[1], "k": 4}).json()
    r = c.post("/feedback", json={"exposure_id": rec["exposure_id"], "event": "click", "item_id": rec["items"][2]})
    assert r.status_code == 202 and r.json() == {
        "exposure_id": rec["exposure_id"],
        "known_exposure": True,
        "position": 2,
    }
    r = c.post(
        "/feedback", json={"exposure_id": "not-served-here", "event": "consume", "item_id": "i0001", "user_id": "u9"}
    )
    assert r.status_code == 202 and r.json()["known_exposure"] is False  # accepted, flagged
    srv.service.logs.flush()
    out = ablogs.read_outcomes(srv.service.opts.log_dir).set_index("exposure_id")
    row = out.loc[rec["exposure_id"]]
    assert (row["event"], row["item_id"], row["unit_id"], row["position"], bool(row["known_exposure"])) == (
        "click",
        rec["items"][2],
        reg.users[1],
        2,
        True,
    )
    assert not out.loc["not-served-here"]["known_exposure"] and out.loc["not-served-here"]["unit_id"] == "u9"
    assert 'hllm_feedback_total{event="click",known_exposure="true"}' in c.get("/metrics").text


@pytest.mark.slow
def test_failing_or_slow_challenger_falls_back_to_the_champion(reg, srv):
    c = httpx.Client(base_url=srv.url, timeout=10)
    eid = c.get("/healthz").json()["experiment"]["experiment_id"]
    exp = _expected(reg, eid, reg.v1, reg.v2)
    user = next(u for u in reg.users if assign(exp, u).arm == "challenger")
    normal = c.post("/recommend", json={"user_id": user, "k": 5}).json()
    ids = []
    try:
        for fault, why in (("raise", "injected failure"), (2.0, "timeout")):
            srv.service.faults["challenger"] = fault
            r = c.post("/recommend", json={"user_id": user, "k": 5})
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["arm"], body["served_arm"], body["model_version"], body["fallback"]) == (
                "challenger",
                "champion",
                reg.v1,
                True,
            )
            assert body["items"] != normal["items"] or reg.v1 == reg.v2
            ids.append((body["exposure_id"], why))
    finally:
        srv.service.faults.clear()
    assert c.post("/recommend", json={"user_id": user, "k": 5}).json()["fallback"] is False
    srv.service.logs.flush()
    df = ablogs.read_exposures(srv.service.opts.log_dir).set_index("exposure_id")
    for eid_, why in ids:
        row = df.loc[eid_]
        assert (row["intended_arm"], row["served_arm"], bool(row["fallback"]), row["model_version"]) == (
            "challenger",
            "champion",
            True,
            reg.v1,
        )
        assert why in row["error"]
    m = c.get("/metrics").text
    assert 'hllm_fallbacks_total{arm="challenger",reason="error"} 1' in m
    assert 'hllm_fallbacks_total{arm="challenger",reason="timeout"} 1' in m
    assert 'hllm_request_latency_seconds_bucket{arm="champion",le="+Inf"}' in m


@pytest.mark.slow
@pytest.mark.replay  # make test-replay
def test_hot_swap_under_load_loses_nothing_and_logs_flush_on_shutdown(store, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HLLM_ACTOR", "tester")
    r = _registry(store, tiny, "ab-swap")
    s = _serve(r.cfg, tmp_path, flush_every=100_000, flush_s=3600)
    results: list[list[dict[str, Any]]] = [[], []]
    stop = threading.Event()

    def client(n: int) -> None:
        with httpx.Client(base_url=s.url, timeout=10) as c:
            i = 0
            while not stop.is_set():
                u = r.users[(i * 2 + n) % len(r.users)]
                t0 = time.monotonic()  # when the request was sent: what the swap is compared with
                resp = c.post("/recommend", json={"user_id": u, "k": 5})
                body = resp.json() if resp.status_code == 200 else {}
                results[n].append({"status": resp.status_code, "user": u, "t0": t0, **body})
                if i % 5 == 0 and resp.status_code == 200:
                    c.post(
                        "/feedback",
                        json={"exposure_id": body["exposure_id"], "event": "click", "item_id": body["items"][0]},
                    )
                i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(2)]
    def served(since: float = 0.0) -> int:
        return sum(1 for res in results for x in list(res) if x["t0"] > since)

    def wait_for(n: int, since: float = 0.0) -> None:  # request counts, not sleeps: a loaded machine is slower
        deadline = time.monotonic() + 60
        while served(since) < n and time.monotonic() < deadline:
            time.sleep(0.02)

    for t in threads:
        t.start()
    wait_for(60)
    _set_challenger(r.cfg, r.v3, 0.3)  # the registry moves under load
    deadline = time.monotonic() + 30
    while s.service.status()["challenger"] != r.v3 and time.monotonic() < deadline:
        time.sleep(0.02)
    swapped_at = time.monotonic()
    wait_for(60, since=swapped_at)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert ablogs.part_files(tmp_path / "logs", ablogs.EXPOSURES) == []  # nothing flushed yet: all buffered
    s.stop()

    flat = [x for res in results for x in res]
    assert flat and all(x["status"] == 200 for x in flat)  # zero errors during the swap
    assert {x["model_version"] for x in flat} <= {r.v1, r.v2, r.v3}
    for res in results:  # per client: once the new challenger answers, the old one never does again
        seen_new = False
        for x in res:
            seen_new |= x["model_version"] == r.v3
            assert not (seen_new and x["model_version"] == r.v2)
    after = [x for x in flat if x["t0"] > swapped_at]  # sent once the service showed the new challenger
    assert after and all(x["model_version"] in (r.v1, r.v3) for x in after)
    assert any(x["model_version"] == r.v3 for x in after) and any(x["model_version"] == r.v2 for x in flat)
    assert len({x["experiment_id"] for x in flat}) == 2  # moving the alias started a new experiment

    # the logs, flushed on shutdown: one exposure per answered request, with the right fields
    df = ablogs.read_exposures(tmp_path / "logs")
    assert len(df) == len(flat) and set(df["exposure_id"]) == {x["exposure_id"] for x in flat}
    by_id = {row["exposure_id"]: row for row in ablogs.read_table(tmp_path / "logs", ablogs.EXPOSURES).to_pylist()}
    for x in flat[:: max(1, len(flat) // 25)]:
        row = by_id[x["exposure_id"]]
        exp = _expected(
            r, x["experiment_id"], r.v1, r.v3 if x["experiment_id"].startswith(f"ab-swap-v{r.v1}-v{r.v3}-") else r.v2
        )
        a = assign(exp, x["user"])
        assert row["experiment_id"] == x["experiment_id"] and row["unit_id"] == x["user"]
        assert (row["unit_hash"], row["exposure_bucket"], row["arm_bucket"]) == (
            a.unit_hash,
            a.exposure_bucket,
            a.arm_bucket,
        )
        assert row["intended_arm"] == x["arm"] and row["served_arm"] == x["served_arm"]
        assert (
            row["model_version"] == x["model_version"] and row["model_uri"] == f"models:/ab-swap/{x['model_version']}"
        )
        assert row["data_version"] and row["mode"] == "ab" and not row["fallback"]
        assert list(row["items"]) == x["items"] and len(row["scores"]) == 5 and row["latency_ms"] > 0
    out = ablogs.read_outcomes(tmp_path / "logs")
    assert len(out) == sum(1 for res in results for i, x in enumerate(res) if i % 5 == 0)
    assert set(out["exposure_id"]) <= set(df["exposure_id"]) and out["known_exposure"].all()


@pytest.mark.slow
def test_shadow_mode_serves_the_champion_and_logs_the_challenger(reg, tmp_path):
    s = _serve(reg.cfg, tmp_path, mode="shadow", flush_s=3600)
    try:
        c = httpx.Client(base_url=s.url, timeout=10)
        bodies = [c.post("/recommend", json={"user_id": u, "k": 5}).json() for u in reg.users[:10]]
    finally:
        s.stop()
    assert all(b["served_arm"] == "champion" and b["model_version"] == reg.v1 and b["arm"] is None for b in bodies)
    df = ablogs.read_exposures(tmp_path / "logs")
    assert len(df) == 10 and (df["mode"] == "shadow").all() and (df["shadow_version"] == reg.v2).all()
    assert df["shadow_overlap"].between(0, 1).all() and (df["shadow_latency_ms"] > 0).all()
    assert all(len(x) == 5 for x in df["shadow_items"])


@pytest.mark.slow
@pytest.mark.replay  # make test-replay
def test_hllm_serve_command_serves_and_flushes_on_sigint(reg, tmp_path):
    """`hllm serve` in its own process: ready, answers, and a Ctrl-C (SIGINT) writes the buffered logs."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        str(Path(sys.executable).with_name("hllm")),
        "serve",
        "--port",
        str(port),
        "--log-dir",
        str(tmp_path / "logs"),
        "--poll-s",
        "0.5",
        "--flush-s",
        "3600",
        "--set",
        f"tracking.tracking_uri={reg.cfg.tracking.tracking_uri}",
        "--set",
        f"registry.model_name={reg.cfg.registry.model_name}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = httpx.post(f"{url}/recommend", json={"user_id": reg.users[0], "k": 3}, timeout=10).json()
        assert len(body["items"]) == 3 and body["model_version"] in (reg.v1, reg.v2)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert list(ablogs.read_exposures(tmp_path / "logs")["exposure_id"]) == [body["exposure_id"]]


def test_team_draft_merges_two_rankings_fairly():
    from hllm.abtest.service import team_draft

    a, b = ["a1", "x", "a2", "a3"], ["x", "b1", "b2", "a1"]
    items, teams = team_draft(a, b, 4, seed="e1")
    assert len(items) == 4 and len(set(items)) == 4  # no duplicate: a picked item is taken
    assert team_draft(a, b, 4, seed="e1") == (items, teams)  # deterministic in the seed
    # each round both teams pick once: after every even position the teams are level
    for n in (2, 4):
        assert teams[:n].count("champion") == teams[:n].count("challenger")
    for item, team in zip(items, teams):
        assert item in (a if team == "champion" else b)  # every item came from its team's ranking
    # the coin decides who picks first in a round: over many exposures both teams lead about half the time
    first = [team_draft(a, b, 2, seed=f"e{i}")[1][0] for i in range(400)]
    assert 150 < first.count("champion") < 250
    items, teams = team_draft(["a"], ["a"], 5, seed="s")  # both lists exhausted: a short slate, no repeat
    assert items == ["a"] and len(teams) == 1


def test_interleave_mode_serves_one_merged_slate_and_credits_clicks(reg, tmp_path):
    s = _serve(reg.cfg, tmp_path, mode="interleave", flush_s=3600)
    try:
        c = httpx.Client(base_url=s.url, timeout=10)
        bodies = {u: c.post("/recommend", json={"user_id": u, "k": 6}).json() for u in reg.users[:20]}
        merged = {u: b for u, b in bodies.items() if b["served_arm"] == "interleaved"}
        assert merged, "no user of the experiment in the first 20"
        u, b = next(iter(merged.items()))
        assert len(b["items"]) == 6 == len(b["teams"]) and set(b["teams"]) == {"champion", "challenger"}
        clicked = b["items"][1]
        r = c.post("/feedback", json={"exposure_id": b["exposure_id"], "event": "click", "item_id": clicked})
        assert r.status_code == 202
        others = [x for x in bodies.values() if x["served_arm"] != "interleaved"]
        assert all(x["served_arm"] == "champion" and x["teams"] is None for x in others)  # outside: the champion
    finally:
        s.stop()
    ex = ablogs.read_exposures(tmp_path / "logs")
    row = ex[ex["exposure_id"] == b["exposure_id"]].iloc[0]
    assert row["mode"] == "interleave" and list(row["teams"]) == b["teams"] and row["interleave_version"] == reg.v2
    out = ablogs.read_outcomes(tmp_path / "logs")
    assert out.iloc[0]["position"] == 1 and out.iloc[0]["credit"] == b["teams"][1]
