"""The fault matrix: kill the real nightly flow at each failpoint, run it again, check nothing is half-written.

Each case arms one failpoint (:mod:`hllm.faults`, env ``HLLM_FAILPOINTS``) for a real
``hllm flows run nightly`` process (the embedded default: a temporary Prefect API on the SQLite file
under one ``$PREFECT_HOME`` shared by every run, MLflow on a SQLite file, DVC with a local remote,
tiny settings), which SIGKILLs itself there. Then a plain run follows, which must recover and
complete, and :meth:`Lab.check` verifies the invariants of issue 12:

- the rerun took the slot within ``flows.slot.CHECK_S`` + 5 s and completed;
- no MLflow run is left ``RUNNING`` (the audit run aside), no Prefect flow run ``RUNNING``, no slot held;
- the registry holds exactly one version per run that got past registration, never the same run
  twice; every alias agrees with the audit log's last move of it; every aliased version's artefacts
  download; every version either went through the gate (alias, alias tags or refusal) or is
  tagged ``hllm.incomplete``;
- ``data/raw``, ``data.dvc`` and the remote agree: ``dvc status`` and ``dvc status -c`` clean, the
  files of ``data/raw`` are exactly those of the ``.dir`` manifest ``data.dvc`` names, and every
  ``.dir`` on the remote has all of its files there;
- what was left behind (staging folders, old folders, pending markers, half-written exports).

Cases run one after another in one project, as nights follow each other, so later cases meet a
registry with a champion and data versions that change every night (a new synthetic seed per run,
so a killed night's snapshot always differs from what ``data.dvc`` names and is new to the remote). ``group`` > 1 chains
that many kills before the plain run (each rerun recovers the previous kill and is killed at the
next point): fewer runs, coarser attribution. Used by ``tests/flows/test_fault_matrix.py`` and
``benchmarks/faults.py``.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.flowkit import make_project, store_client

MODEL = "hllm-recommender"
LIMIT = "hllm-nightly-retrain"
RUN_TIMEOUT_S = 600
SEED = 15  # run i generates the synthetic shop with seed SEED + i: every night's data is new


@dataclass(frozen=True)
class Case:
    point: str  # the failpoint armed
    where: str  # what the kill interrupts, for the table
    registers: bool = False  # the killed run has created its model version by then
    baselines: bool = False  # the point needs the popularity baseline (flow.baselines=[pop])


# in flow order; every stage boundary's ":start" and the points inside the dangerous operations.
# A stage's ":end" is the next stage's ":start" with nothing in between, so ALL_CASES adds them.
CASES: list[Case] = [
    Case("promote:alias-set", "first promotion: alias champion set, no tags, no audit record", registers=True),
    Case("recover:start", "before crash recovery"),
    Case("mlflow:start", "before the MLflow parent run"),
    Case("snapshot:start", "before staging the snapshot"),
    Case("validate:start", "snapshot staged, before validation"),
    Case("validate:suite-checked", "mid validation: one GX suite checked, no report yet"),
    Case("publish:start", "validated, before the swap into data/raw"),
    Case("publish:between-renames", "mid publish: old data/raw renamed away, new not yet in"),
    Case("dvc:start", "data/raw swapped, data.dvc still old"),
    Case("dvc-add:cache-written", "mid dvc add: cache written, data.dvc not (dvc child killed too)"),
    Case("dvc-push:files-uploaded", "mid dvc push: files uploaded, .dir manifest not (child killed too)"),
    Case("build:start", "data version pushed, before build"),
    Case("train-hllm:start", "built, before training HLLM"),
    Case("train:checkpoint-saved", "mid training: a checkpoint saved, no result.json yet"),
    Case("evaluate-hllm:start", "trained, before evaluating HLLM"),
    Case("train-pop:start", "HLLM done, before the popularity baseline", baselines=True),
    Case("evaluate-champion:start", "before re-evaluating the champion on the night's data"),
    Case("export:start", "before the export"),
    Case("export:files-written", "mid export: files written, manifest not"),
    Case("register:start", "exported, before registration"),
    Case("register:artifacts-logged", "mid registration: pyfunc logged to the run, no version yet"),
    Case("promotion-gate:start", "registered, before the promotion gate", registers=True),
    Case("prune-old-runs:start", "promoted, before pruning old run folders", registers=True),
    Case("prune-old-runs:end", "everything done but the summary and closing the runs", registers=True),
]
_STAGES = ["recover", "mlflow", "snapshot", "validate", "publish", "dvc", "build", "train-hllm", "evaluate-hllm",
           "evaluate-champion", "export", "register", "promotion-gate"]  # fmt: skip
ALL_CASES: list[Case] = CASES + [
    Case(f"{s}:end", f"after stage {s}", registers=s in ("register", "promotion-gate")) for s in _STAGES
]


def case(point: str) -> Case:
    for c in ALL_CASES:
        if c.point == point:
            return c
    raise KeyError(f"no fault case {point!r}; known: {', '.join(c.point for c in ALL_CASES)}")


@dataclass
class Run:
    name: str
    rc: int
    seconds: float
    log: str
    fired: list[str]  # failpoints that fired (from the trail file)
    report: dict[str, Any] | None  # reports/nightly/<run>.json (a killed run writes none)


@dataclass
class Outcome:
    points: list[str]
    where: str
    fired: bool
    recovered: bool
    recover_s: float | None  # the rerun's wait for the slot + its recovery stage
    rerun_s: float | None  # the whole rerun, process start to exit
    left: list[str]  # what stayed behind after the rerun
    problems: list[str] = field(default_factory=list)
    recovery: list[str] = field(default_factory=list)  # what the recoveries of the group's runs did
    kill_s: list[float] = field(default_factory=list)  # wall time of each killed run
    check_s: float = 0.0  # the checks after the rerun


def _env(prefect_home: Path, failpoints: list[str], trail: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_") and k != "HLLM_FAILPOINTS"}
    env.update(
        {
            "PREFECT_HOME": str(prefect_home),  # one Prefect database for all runs, as on a user's machine
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
            "HLLM_FAILPOINTS_TRAIL": str(trail),
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )
    if failpoints:
        env["HLLM_FAILPOINTS"] = ",".join(failpoints)
    return env


class Lab:
    """One project (git + DVC + local remote + tiny params.yaml) and its Prefect home."""

    def __init__(self, root: Path, item_model: Path):
        self.root = Path(root)
        self.project = make_project(self.root / "proj", Path(item_model))
        self.prefect_home = self.root / "prefect-home"
        self.remote = self.project / "dvc-remote"
        self.runs: list[Run] = []
        self.expected_versions = 0  # runs that got past registration

    # ------------------------------------------------------------------ running

    def run(self, name: str, failpoints: list[str] = (), baselines: bool = False) -> Run:  # type: ignore[assignment]
        seed = SEED + len(self.runs)
        args = [str(Path(sys.executable).parent / "hllm"), "flows", "run", "nightly", "--set", f"synth.seed={seed}"]
        args += ["--set", "flow.baselines=[pop]"] if baselines else ["--no-baselines"]
        trail = self.root / f"{name}.trail"
        log = self.root / f"{name}.log"
        t0 = time.monotonic()
        with log.open("w") as f:
            p = subprocess.Popen(args, cwd=self.project, env=_env(self.prefect_home, list(failpoints), trail),
                                 stdout=f, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            try:
                rc = p.wait(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rc = -999
            finally:
                # what a killed run leaves in its session (its temporary Prefect API, a DVC child) is
                # killed only after its exit: recovery must cope with a dead flow, not the harness
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        seconds = time.monotonic() - t0
        text = log.read_text(errors="replace")
        fired = [ln.split()[0] for ln in trail.read_text().splitlines()] if trail.exists() else []
        report = None
        for line in text.splitlines():
            if "summary: reports/nightly/" in line:
                rep = self.project / line.split("summary: ", 1)[1].strip().replace(".md", ".json")
                if rep.exists():
                    report = json.loads(rep.read_text())
        run = Run(name, rc, seconds, text, fired, report)
        self.runs.append(run)
        return run

    def case(self, cases: list[Case], tag: str = "") -> Outcome:
        """Kill runs at ``cases``' points one after another, then one plain run; check everything."""
        problems: list[str] = []
        fired_all = True
        kill_s = []
        for i, c in enumerate(cases):
            r = self.run(f"{tag or c.point.replace(':', '_')}-kill{i}", [c.point], baselines=c.baselines)
            kill_s.append(round(r.seconds, 1))
            fired = c.point in r.fired and r.rc == -signal.SIGKILL
            if not fired:
                fired_all = False
                problems.append(f"{c.point}: did not fire (exit {r.rc}): {r.log[-1500:]}")
                if r.rc == 0:
                    self.expected_versions += 1
            elif c.registers:
                self.expected_versions += 1
        rerun = self.run(f"{tag or cases[-1].point.replace(':', '_')}-rerun", baselines=any(c.baselines for c in cases))
        rep = rerun.report or {}
        recover_s = None
        if rerun.rc != 0 or rep.get("status") != "COMPLETED":
            problems.append(f"rerun exited {rerun.rc}, status {rep.get('status')}: {rerun.log[-3000:]}")
        else:
            self.expected_versions += 1
            st = rep.get("stage_seconds", {})
            recover_s = round(st.get("wait-for-slot", 0.0) + st.get("recover", 0.0), 1)
            from flows.slot import CHECK_S

            if st.get("wait-for-slot", 0.0) > CHECK_S + 5:
                problems.append(f"rerun waited {st['wait-for-slot']} s for the slot (bound {CHECK_S + 5} s)")
        t0 = time.monotonic()
        more, left = self.check()
        problems += more
        check_s = round(time.monotonic() - t0, 1)
        return Outcome(
            points=[c.point for c in cases],
            where="; ".join(c.where for c in cases),
            fired=fired_all,
            recovered=not problems,
            recover_s=recover_s,
            rerun_s=round(rerun.seconds, 1),
            left=left,
            problems=problems,
            recovery=[ln for r in self.runs[-len(cases) - 1 :] for ln in _recovery_lines(r.log)],
            kill_s=kill_s,
            check_s=check_s,
        )

    # ------------------------------------------------------------------ checking

    def dvc(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DVC_NO_ANALYTICS": "1", "ITERATIVE_DO_NOT_TRACK": "1"}
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=self.project, env=env,
                              capture_output=True, text=True)  # fmt: skip

    def check(self) -> tuple[list[str], list[str]]:
        """Every invariant after a completed rerun; returns (problems, what was left behind)."""
        problems = self._check_runs() + self._check_registry() + self._check_data()
        return problems, self._left_behind()

    def _check_runs(self) -> list[str]:
        out = []
        client = store_client(self.project)
        exps = [e.experiment_id for e in client.search_experiments()]
        running = [r for r in client.search_runs(exps, max_results=5000) if r.info.status == "RUNNING"
                   and r.data.tags.get("hllm.kind") != "audit"]  # fmt: skip
        if running:
            out.append(f"MLflow runs left RUNNING: {[(r.info.run_name, r.info.run_id) for r in running]}")
        db = self.prefect_home / "prefect.db"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
            flows = con.execute("SELECT name, state_type FROM flow_run WHERE state_type IN ('RUNNING', 'PENDING')")
            live = flows.fetchall()
            slots = con.execute("SELECT active_slots FROM concurrency_limit_v2 WHERE name = ?", (LIMIT,)).fetchall()
        if live:
            out.append(f"Prefect flow runs left running: {live}")
        if slots and slots[0][0] != 0:
            out.append(f"slot {LIMIT} still held ({slots[0][0]} active)")
        return out

    def _check_registry(self) -> list[str]:
        import mlflow

        out = []
        client = store_client(self.project)
        try:
            rm = client.get_registered_model(MODEL)
        except Exception:  # noqa: BLE001 - nothing registered
            return [f"expected {self.expected_versions} versions, none registered"] if self.expected_versions else []
        versions = list(client.search_model_versions(f"name='{MODEL}'"))
        if len(versions) != self.expected_versions:
            out.append(f"{len(versions)} versions registered, expected {self.expected_versions}")
        runs = [v.run_id for v in versions]
        if len(set(runs)) != len(runs):
            out.append(f"a run registered twice: {sorted(runs)}")
        aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
        audited = self._audited_aliases()
        for alias in set(aliases) | {a for a, v in audited.items() if v}:
            if aliases.get(alias) != audited.get(alias):
                out.append(f"alias {alias} -> v{aliases.get(alias)} but the audit log says v{audited.get(alias)}")
        uri = f"sqlite:///{self.project / 'mlflow' / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        for alias, v in aliases.items():
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{v}", dst_path=tmp))
                    if not (local / "MLmodel").is_file() or not any((local / "artifacts").rglob("*")):
                        out.append(f"alias {alias} -> v{v}: its model folder lacks MLmodel or artifacts")
                except Exception as e:  # noqa: BLE001
                    out.append(f"alias {alias} -> v{v}: artefacts not downloadable: {e}")
        for v in versions:
            t = v.tags or {}
            gated = (str(v.version) in aliases.values() or "hllm.gate.refused" in t
                     or any(k.startswith("alias.") and k.endswith(".set_at") for k in t))  # fmt: skip
            if not gated and "hllm.incomplete" not in t:
                out.append(f"v{v.version}: neither gated nor tagged hllm.incomplete")
        return out

    def _audited_aliases(self) -> dict[str, str | None]:
        """Each alias's last move in the audit log (read straight from the artifacts, not the library)."""
        client = store_client(self.project)
        audit = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                               filter_string="tags.`hllm.kind` = 'audit'")]  # fmt: skip
        state: dict[str, str | None] = {}
        if not audit:
            return state
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(client.download_artifacts(audit[0].info.run_id, "audit", tmp))
            events = sorted((json.loads(p.read_text()) for p in local.glob("*.json")), key=lambda e: e.get("ts", ""))
        for e in events:
            if e.get("alias") and e.get("action") != "refused":
                state[e["alias"]] = str(e["version"]) if e.get("version") else None
        return state

    def _check_data(self) -> list[str]:
        out = []
        dvc_file = self.project / "data.dvc"
        if not dvc_file.exists():
            return ["no data.dvc after a completed run"]
        md5 = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
        for args, what in ((("status", "--json", "data.dvc"), "workspace"), (("status", "-c", "--json", "data.dvc"),
                                                                               "remote")):  # fmt: skip
            p = self.dvc(*args)
            if p.returncode != 0 or json.loads(p.stdout or "{}"):
                out.append(f"dvc {' '.join(args)} ({what}) not clean: {p.stdout.strip()} {p.stderr.strip()[-500:]}")
        manifest = self.project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
        if not manifest.exists():
            return [*out, f"data.dvc names {md5}, not in the local cache"]
        want = {e["relpath"]: e["md5"] for e in json.loads(manifest.read_text())}
        raw = self.project / "data" / "raw"
        have = {str(p.relative_to(raw)): _md5(p) for p in sorted(raw.rglob("*")) if p.is_file()} if raw.is_dir() else {}
        if have != want:
            out.append(f"data/raw ({sorted(have)}) is not the version data.dvc names ({md5}: {sorted(want)})")
        objs = self.remote / "files" / "md5"
        if not (objs / md5[:2] / md5[2:]).exists():
            out.append(f"the remote lacks data.dvc's version {md5}")
        for d in sorted(objs.glob("*/*.dir")) if objs.is_dir() else []:
            missing = [e["relpath"] for e in json.loads(d.read_text())
                       if not (objs / e["md5"][:2] / e["md5"][2:]).exists()]  # fmt: skip
            if missing:
                out.append(f"the remote lists version {d.parent.name}{d.name} with files missing: {missing}")
        return out

    def _left_behind(self) -> list[str]:
        p = self.project
        pats = ["data/.raw-*", "data/.snapshot-download-*", "data/.publish-pending.json*", "exports/.*", "runs/*/.tmp*",
                "runs/*/*/.tmp*", "runs/.tmp*"]  # fmt: skip
        found = sorted({str(x.relative_to(p)) for pat in pats for x in p.glob(pat)})
        return found


def _recovery_lines(log: str) -> list[str]:
    """What a run's crash recovery did, from its log (a killed run writes no report)."""
    marker = "crash recovery: "
    lines = [ln.split(marker, 1)[1].strip() for ln in log.splitlines() if marker in ln]
    return [ln for ln in lines if ln != "nothing to recover"]


def _md5(path: Path) -> str:
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def run_matrix(root: Path, item_model: Path, cases: list[Case], group: int = 1, progress=None) -> list[Outcome]:
    """All ``cases`` in one project, ``group`` kills per plain rerun; returns one outcome per group."""
    lab = Lab(root, item_model)
    outcomes = []
    for i in range(0, len(cases), max(1, group)):
        chunk = cases[i : i + max(1, group)]
        t0 = time.monotonic()
        o = lab.case(chunk)
        if progress:
            progress(o, time.monotonic() - t0)
        outcomes.append(o)
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    rows = [("fault", "where", "recovered", "recover s", "rerun s", "left behind")]
    for o in outcomes:
        rows.append(
            (
                " + ".join(o.points),
                o.where,
                ("yes" if o.recovered else "NO") + ("" if o.fired else " (did not fire)"),
                "-" if o.recover_s is None else f"{o.recover_s:.1f}",
                "-" if o.rerun_s is None else f"{o.rerun_s:.1f}",
                ", ".join(o.left) or "nothing",
            )
        )
    return "\n".join("| " + " | ".join(r) + " |" for r in [rows[0], tuple("---" for _ in rows[0]), *rows[1:]])
