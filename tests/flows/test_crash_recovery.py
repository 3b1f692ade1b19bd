"""Fault injection: the real nightly flow (`hllm flows run nightly`, the embedded default: a temporary
Prefect API on the SQLite file under $PREFECT_HOME, shared by every run as on a user's machine) is
killed, and the next run must just work.

- SIGKILL while HLLM trains (what the OOM killer does): the rerun takes the slot over within one check
  interval (flows.slot.CHECK_S), closes the dead run's MLflow runs FAILED with the reason, marks its
  Prefect flow run Crashed, and registers exactly one version.
- SIGTERM to a run waiting for a slot that a live process holds: it ends within flows.slot.GRACE_S,
  non-zero, without touching the holder's slot.
- SIGTERM while HLLM trains: ends within the grace period, its MLflow runs KILLED, the slot released.

Real processes, real Prefect and MLflow, no mocks.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.slot import CHECK_S, GRACE_S
from tests.helpers.flowkit import make_project, registered_versions, store_client

pytestmark = [pytest.mark.slow, pytest.mark.faults]  # make test-faults

LIMIT = "hllm-nightly-retrain"
START_S = 120  # a subprocess starts Python, the temporary Prefect API and the flow within this (2 shared cores)


@pytest.fixture
def project(tmp_path: Path, bert: Path) -> Path:
    return make_project(tmp_path / "proj", bert)


def _env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(
        {
            "PREFECT_HOME": str(project.parent / "prefect-home"),  # one Prefect database for all runs
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


class Proc:
    """A process in its own session (so its temporary Prefect API can be cleaned up), output to a file."""

    def __init__(self, args: list[str], project: Path, name: str):
        self.log = project.parent / f"{name}.log"
        self._f = self.log.open("w")
        self.p = subprocess.Popen(
            args, cwd=project, env=_env(project), stdout=self._f, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: str, timeout: float = START_S) -> None:
        deadline = time.monotonic() + timeout
        while what not in self.output():
            assert self.p.poll() is None, f"exited {self.p.returncode} before '{what}':\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"no '{what}' after {timeout} s:\n{self.output()[-4000:]}"
            time.sleep(0.1)

    def cleanup(self) -> None:
        """Kill what is left of its session (the temporary API a killed run leaves behind)."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.p.poll() is None:
            self.p.wait(timeout=10)
        self._f.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.cleanup()


def nightly(*sets: str) -> list[str]:
    """`hllm flows run nightly` (HLLM only: the baselines add nothing to what is tested here)."""
    args = [str(Path(sys.executable).parent / "hllm"), "flows", "run", "nightly", "--no-baselines"]
    for s in sets:
        args += ["--set", s]
    return args


def mlflow_runs(project: Path) -> list:

    client = store_client(project)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, max_results=1000) if exps else []


def wait_for_training(project: Path, proc: Proc, timeout: float = START_S) -> object:
    """The HLLM child run, once its training has started (its run folder exists)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            runs = [r for r in mlflow_runs(project) if r.data.tags.get("hllm.kind") == "train"]
        except Exception:  # noqa: BLE001 - the store is being created
            runs = []
        if runs and (project / "runs" / runs[0].info.run_name).is_dir():
            return runs[0]
        assert proc.p.poll() is None, f"exited {proc.p.returncode}:\n{proc.output()[-4000:]}"
        assert time.monotonic() < deadline, f"no training after {timeout} s:\n{proc.output()[-4000:]}"
        time.sleep(0.1)


def prefect_db(project: Path, sql: str, args: tuple = ()) -> list[tuple]:
    db = project.parent / "prefect-home" / "prefect.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        return con.execute(sql, args).fetchall()


def active_slots(project: Path) -> int:
    return prefect_db(project, "SELECT active_slots FROM concurrency_limit_v2 WHERE name = ?", (LIMIT,))[0][0]


def flow_run_state(project: Path, flow_run_id: str) -> str:
    rows = prefect_db(project, "SELECT state_type FROM flow_run WHERE id = ?", (flow_run_id,))
    if not rows:  # ids may be stored without dashes
        rows = prefect_db(project, "SELECT state_type FROM flow_run WHERE id = ?", (flow_run_id.replace("-", ""),))
    return rows[0][0]


def report_of(project: Path, proc: Proc) -> dict:
    reports = sorted((project / "reports" / "nightly").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(reports[-1].read_text())


def test_a_run_killed_while_training_does_not_wedge_the_next_one(project, procs):
    # long enough that the signal lands while it trains (the tiny set has ~11 steps per epoch), with
    # checkpoints along the way; the rerun has the same settings, so it trains on from them
    sets = ("train.max_steps=400", "train.epochs=1000", "train.checkpoint_every=5")
    killed = Proc(nightly(*sets), project, "killed")
    procs.append(killed)
    child = wait_for_training(project, killed)  # the HLLM child run: it trains now
    dead_fr = child.data.tags["prefect.flow_run_id"]
    ckpts = project / "runs" / child.info.run_name / "checkpoints"
    deadline = time.monotonic() + START_S
    while not (ckpts / "latest").exists():  # a first checkpoint
        assert time.monotonic() < deadline and killed.p.poll() is None, killed.output()[-4000:]
        time.sleep(0.05)
    os.kill(killed.p.pid, signal.SIGKILL)  # the flow process only; its temporary API lives on, as after an OOM kill
    killed.p.wait(timeout=30)
    assert not (project / "runs" / child.info.run_name / "result.json").exists(), "killed after training ended"
    assert active_slots(project) == 1  # the dead run's slot, as in the issue
    assert {r.info.status for r in mlflow_runs(project)} == {"RUNNING"}

    t0 = time.monotonic()
    rerun = Proc(nightly(*sets), project, "rerun")
    procs.append(rerun)
    rc = rerun.p.wait(timeout=300)
    seconds = time.monotonic() - t0
    out = rerun.output()
    assert rc == 0, out[-4000:]
    assert "recovered from flow run" in out and "process" in out and "is gone" in out
    rep = report_of(project, rerun)
    assert rep["status"] == "COMPLETED"
    waited = rep["stage_seconds"]["wait-for-slot"]
    assert waited < CHECK_S + 5, f"waited {waited} s for the dead holder's slot"
    print(f"\nrerun after SIGKILL: waited {waited} s for the slot, completed in {seconds:.1f} s")

    dead = [r for r in mlflow_runs(project) if r.data.tags.get("prefect.flow_run_id") == dead_fr]
    assert {r.data.tags["hllm.kind"] for r in dead} == {"flow", "train"}
    for r in dead:
        assert r.info.status == "FAILED", (r.info.run_id, r.info.status)
        assert f"flow run {dead_fr} died: process" in r.data.tags["hllm.failure_reason"]
        assert r.data.tags["mlflow.note.content"] == r.data.tags["hllm.failure_reason"]
    assert not [
        r for r in mlflow_runs(project) if r.info.status == "RUNNING" and r.data.tags.get("hllm.kind") != "audit"
    ]
    assert flow_run_state(project, dead_fr) == "CRASHED"
    assert [str(v.version) for v in registered_versions(project)] == ["1"]
    assert active_slots(project) == 0
    # the night's work was kept: the rerun trained on from the dead run's checkpoint to the same last step
    dead_ids = {r.info.run_id for r in dead}
    new = next(
        r for r in mlflow_runs(project) if r.data.tags.get("hllm.kind") == "train" and r.info.run_id not in dead_ids
    )
    origin = new.data.tags.get("hllm.resumed_from", "")
    assert origin.startswith(f"{child.info.run_name}/step-"), origin
    assert int(origin.rsplit("-", 1)[1]) >= 5
    assert json.loads((project / "runs" / new.info.run_name / "result.json").read_text())["steps"] == 400
    hllm_row = next(m for m in rep["models"] if m["kind"] == "hllm")
    assert f"resumed from {origin}" in hllm_row["note"]


HOLDER = """
import sys, time
from prefect import flow
from prefect.runtime import flow_run
from flows.slot import hold

@flow(name="slot-holder")
def holder():
    with hold(sys.argv[1], 5, str(flow_run.id), str(flow_run.name)):
        print("HOLDING", flush=True)
        time.sleep(600)

holder()
"""


def test_sigterm_while_waiting_for_a_live_holder_stops_at_once(project, procs):
    holder = Proc([sys.executable, "-c", HOLDER, LIMIT], project, "holder")
    procs.append(holder)
    holder.wait_for("HOLDING")
    waiter = Proc(nightly("flow.slot_timeout_s=600"), project, "waiter")
    procs.append(waiter)
    waiter.wait_for("waiting for concurrency slot")
    out = waiter.output()
    assert f"pid {holder.p.pid}" in out and "waiting until" in out  # who holds it, since when, until when
    time.sleep(CHECK_S + 1)  # at least one re-check: a live holder is never taken for dead
    t0 = time.monotonic()
    waiter.p.send_signal(signal.SIGTERM)
    rc = waiter.p.wait(timeout=GRACE_S + 30)
    stopped = time.monotonic() - t0
    print(f"\nSIGTERM while waiting: exited {rc} after {stopped:.1f} s")
    assert rc != 0
    assert stopped < GRACE_S, f"took {stopped:.1f} s to stop"
    assert "recovered" not in waiter.output()
    assert holder.p.poll() is None and active_slots(project) == 1  # the holder's slot is untouched
    assert not [
        r for r in mlflow_runs(project) if r.info.status == "RUNNING" and r.data.tags.get("hllm.kind") != "audit"
    ]


def test_sigterm_while_training_kills_the_runs_and_frees_the_slot(project, procs):
    run = Proc(nightly("train.max_steps=5000", "train.epochs=1000"), project, "stopped")
    procs.append(run)
    child = wait_for_training(project, run)
    t0 = time.monotonic()
    run.p.send_signal(signal.SIGTERM)
    rc = run.p.wait(timeout=GRACE_S + 30)
    stopped = time.monotonic() - t0
    print(f"\nSIGTERM while training: exited {rc} after {stopped:.1f} s")
    assert rc != 0 and stopped < GRACE_S, (rc, stopped)
    fr = child.data.tags["prefect.flow_run_id"]
    runs = [r for r in mlflow_runs(project) if r.data.tags.get("prefect.flow_run_id") == fr]
    assert {r.data.tags["hllm.kind"]: r.info.status for r in runs} == {"flow": "KILLED", "train": "KILLED"}
    assert active_slots(project) == 0
    assert registered_versions(project) == []
