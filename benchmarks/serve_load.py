"""Load benchmark of the A/B service: `hllm serve` as a subprocess, driven from this process over loopback.

Builds a throw-away SQLite MLflow store in a temp folder, trains a tiny HLLM (tiny BERT item tower,
tiny Llama user tower, 2 steps) on a synthetic dataset, registers it three times (v1, v2, v3: the same
weights, so the registry gate lets each one in), promotes v1 to champion and v2 to challenger
(``registry.promote``, share 0.5: everyone is in the experiment, half on each arm), starts
``hllm serve`` (one uvicorn worker) on 127.0.0.1 and drives it with an asyncio load generator
(raw HTTP/1.1 over ``--connections`` keep-alive sockets, one request in flight per socket, closed loop;
every phase is bounded by ``--seconds`` and ``--max-requests``).

Phases:

1. ``known``: ``POST /recommend {"user_id", "k": 10}`` for users of the export (their exported vector).
2. ``history``: ``POST /recommend {"user_id": <new user>, "history": [...], "k": 10}`` (the user tower).
3. ``swap``: known-user load; after ``--swap-at`` seconds ``registry.promote(v3, to="challenger")``
   moves the alias under load; errors and responses per model version before and after are counted,
   and each connection is checked never to see v2 again once it has seen v3.

Run from the repository root (the tests' helpers are imported as ``tests.helpers``)::

    PYTHONPATH=. .venv/bin/python benchmarks/serve_load.py [--users 2000] [--items 1000] [--seconds 10]

The goals of issue 13 (2-core machine, server and load generator together): known-user >= 1,000 req/s
with p99 <= 20 ms; history >= 100 req/s with p99 <= 50 ms; 0 errors during the swap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.helpers
GOALS = {"known": (1000.0, 20.0), "history": (100.0, 50.0)}

# --------------------------------------------------------------------------- the store


def build_store(root: Path, n_users: int, n_items: int, share: float) -> dict[str, Any]:
    """Tiny HLLM trained and registered three times; v1 champion, v2 challenger (registry.promote)."""
    import pandas as pd

    from hllm import testing
    from hllm.config import Config
    from hllm.evaluation.evaluate import evaluate
    from hllm.models.loading import load_model
    from hllm.ops import registry
    from hllm.serving.export import export
    from hllm.training.trainer import train
    from tests.helpers.reghelpers import log_trained

    t0 = time.perf_counter()
    items, seqs = testing.synthetic_lists(n_users=n_users, n_items=n_items)
    built = testing.write_built(root / "built", items, seqs)
    bert = testing.tiny_bert(root / "bert")
    c = testing.tiny_config(
        root,
        bert,
        built,
        **{"model.kind": "hllm", "train.max_steps": 2, "train.checkpoint_every": 0, "train.run_name": "hllm"},
    )
    res = train(c, progress=False)
    ckpt = res.best_checkpoint or res.last_checkpoint
    export(ckpt, root / "exports" / "hllm", c, progress=False)
    model, _, b = load_model(ckpt)
    tiny = {
        "hllm": {
            "cfg": c,
            "checkpoint": ckpt,
            "export": root / "exports" / "hllm",
            "eval": evaluate(model, b, c, split="test", progress=False),
        }
    }
    cfg = Config()
    cfg.tracking.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg.tracking.experiment = "serve-load"
    cfg.registry.model_name = "serve-load"
    cfg.registry.audit_experiment = "serve-load-audit"
    cfg.registry.bootstrap_samples = 200
    versions = [str(log_trained(cfg, tiny, "hllm")[1]) for _ in range(3)]
    registry.promote(cfg, versions[0], to="champion", reason="benchmark", actor="serve-load")
    registry.promote(cfg, versions[1], to="challenger", reason="benchmark", actor="serve-load", share=share)
    export_dir = Path(tiny["hllm"]["export"])
    users = pd.read_parquet(export_dir / "users.parquet")["user_id"].astype(str).tolist()
    item_ids = pd.read_parquet(export_dir / "items.parquet")["item_id"].astype(str).tolist()
    print(
        f"store: {len(users)} users, {len(item_ids)} items, versions {versions} "
        f"(v{versions[0]} champion, v{versions[1]} challenger, share {share}) in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return {"cfg": cfg, "versions": versions, "users": users, "items": item_ids}


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(root: Path, cfg: Any, port: int, poll_s: float, extra_env: dict[str, str]) -> subprocess.Popen:
    cmd = [
        str(Path(sys.executable).with_name("hllm")),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-dir",
        str(root / "logs"),
        "--poll-s",
        str(poll_s),
        "--set",
        f"tracking.tracking_uri={cfg.tracking.tracking_uri}",
        "--set",
        f"registry.model_name={cfg.registry.model_name}",
    ]
    log = open(root / "server.log", "w")  # noqa: SIM115  (closed with the process)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra_env}
    print("server: " + " ".join(cmd[1:]), flush=True)
    return subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hllm serve exited with {proc.returncode}")
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            if r.status_code == 200:
                return dict(r.json())
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("hllm serve not ready in time")


# --------------------------------------------------------------------------- the load generator

_CL = re.compile(rb"content-length:\s*(\d+)", re.I)
_VERSION = re.compile(rb'"model_version":"([^"]*)"')


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request in flight."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        m = _CL.search(self.buf, 0, end)
        n = int(m.group(1)) if m else 0
        if len(self.buf) < end + 4 + n:
            return
        status = int(self.buf[9:12])
        body = bytes(self.buf[end + 4 : end + 4 + n])
        del self.buf[: end + 4 + n]
        w, self.waiter = self.waiter, None
        if not w.done():
            w.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    async def request(self, data: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


def http_post(path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n\r\n"
    ).encode()
    return head + payload


@dataclass
class Phase:
    name: str
    t_start: float = 0.0
    t_end: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, 200s only
    samples: list[tuple[int, float, str]] = field(default_factory=list)  # (connection, t_done, version)
    statuses: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != 200) + self.transport_errors

    @property
    def seconds(self) -> float:
        return self.t_end - self.t_start

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000.0


async def drive(
    port: int,
    phase: Phase,
    bodies: list[bytes],
    *,
    connections: int,
    seconds: float,
    max_requests: int,
    warmup_s: float = 1.0,
    during: Any = None,
) -> Phase:
    """Closed-loop load; the first ``warmup_s`` seconds are not counted. ``during(loop_t0)`` is an optional
    coroutine run beside the load (the swap)."""
    loop = asyncio.get_running_loop()
    count = 0
    stop_at = loop.time() + warmup_s + seconds
    measuring_from = loop.time() + warmup_s

    async def connect() -> Conn:
        _, proto = await loop.create_connection(Conn, "127.0.0.1", port)
        return proto

    async def worker(n: int) -> None:
        nonlocal count
        conn = await connect()
        i = n * 7919
        while loop.time() < stop_at and count < max_requests:
            data = bodies[i % len(bodies)]
            i += 1
            t0 = time.perf_counter()
            try:
                status, body = await conn.request(data)
            except (ConnectionError, OSError):
                if loop.time() >= measuring_from:
                    phase.transport_errors += 1
                if conn.transport is not None:
                    conn.transport.close()
                conn = await connect()
                continue
            t1 = time.perf_counter()
            if loop.time() < measuring_from:
                continue
            count += 1
            phase.statuses[status] = phase.statuses.get(status, 0) + 1
            if status == 200:
                phase.latencies.append(t1 - t0)
                m = _VERSION.search(body)
                phase.samples.append((n, t1, m.group(1).decode() if m else "?"))
        if conn.transport is not None:
            conn.transport.close()

    async def clock() -> None:
        await asyncio.sleep(max(0.0, measuring_from - loop.time()))
        phase.t_start = time.perf_counter()

    tasks = [asyncio.create_task(worker(n)) for n in range(connections)]
    extra = [asyncio.create_task(clock())]
    if during is not None:
        extra.append(asyncio.create_task(during(measuring_from)))
    await asyncio.gather(*tasks)
    phase.t_end = time.perf_counter()
    await asyncio.gather(*extra)
    return phase


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=2000, help="synthetic users (the export's known users)")
    ap.add_argument("--items", type=int, default=1000, help="synthetic catalogue size")
    ap.add_argument("--connections", type=int, default=8, help="keep-alive connections of the known/swap phases")
    ap.add_argument("--history-connections", type=int, default=4, help="keep-alive connections of the history phase")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase")
    ap.add_argument("--max-requests", type=int, default=100_000, help="cap per phase")
    ap.add_argument("--swap-at", type=float, default=3.0, help="seconds into the swap phase to move the alias")
    ap.add_argument("--history-len", type=int, default=10)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--share", type=float, default=0.5, help="challenger share (0.5: all users in the test)")
    ap.add_argument("--poll-s", type=float, default=1.0, help="the server's registry poll period")
    ap.add_argument("--server-threads", type=int, default=1, help="OMP/MKL/torch threads of the server process")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the store here (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="hllm-serve-load-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data/raw\n")
    os.chdir(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("HLLM_ACTOR", "serve-load")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    st = build_store(root, args.users, args.items, args.share)
    cfg, versions = st["cfg"], st["versions"]
    v1, v2, v3 = versions

    port = free_port()
    threads = str(args.server_threads)
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    proc = start_server(root, cfg, port, args.poll_s, env)
    try:
        t0 = time.perf_counter()
        ready = wait_ready(port, proc)
        print(
            f"server ready in {time.perf_counter() - t0:.1f} s: champion v{ready['champion']}, "
            f"challenger v{ready['challenger']}, experiment {ready['experiment']['experiment_id']}",
            flush=True,
        )
        rng = random.Random(0)
        known = [http_post("/recommend", {"user_id": u, "k": args.k}) for u in st["users"]]
        rng.shuffle(known)
        hist = [
            http_post(
                "/recommend",
                {"user_id": f"new-{j}", "history": rng.sample(st["items"], args.history_len), "k": args.k},
            )
            for j in range(2000)
        ]
        run = {"connections": args.connections, "seconds": args.seconds, "max_requests": args.max_requests}
        phases: dict[str, Phase] = {}
        phases["known"] = asyncio.run(drive(port, Phase("known"), known, **run))
        print(f"known: {phases['known'].ok} ok in {phases['known'].seconds:.1f} s", flush=True)
        hrun = {**run, "connections": args.history_connections}
        phases["history"] = asyncio.run(drive(port, Phase("history"), hist, **hrun))
        print(f"history: {phases['history'].ok} ok in {phases['history'].seconds:.1f} s", flush=True)

        swap_t: dict[str, float] = {}

        async def swap(measuring_from: float) -> None:
            from hllm.ops import registry

            loop = asyncio.get_running_loop()
            await asyncio.sleep(max(0.0, measuring_from - loop.time()) + args.swap_at)
            swap_t["call"] = time.perf_counter()
            await asyncio.to_thread(
                registry.promote,
                cfg,
                v3,
                to="challenger",
                reason="benchmark swap",
                actor="serve-load",
                share=args.share,
            )
            swap_t["moved"] = time.perf_counter()

        srun = {**run, "seconds": max(args.seconds, args.swap_at + 5.0)}  # the new version answers before the end
        phases["swap"] = asyncio.run(drive(port, Phase("swap"), known, during=swap, **srun))
        import httpx

        final = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()

    sw = phases["swap"]
    first_v3 = min((t for _, t, v in sw.samples if v == v3), default=float("inf"))

    def per_version(rows: list[tuple[int, float, str]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, _, v in rows:
            out[v] = out.get(v, 0) + 1
        return dict(sorted(out.items()))

    before = per_version([x for x in sw.samples if x[1] < swap_t.get("call", 0)])
    between = per_version([x for x in sw.samples if swap_t.get("call", 0) <= x[1] < first_v3])
    after = per_version([x for x in sw.samples if x[1] >= first_v3])
    mixed = 0  # a connection that got v2 after it had seen v3
    seen: set[int] = set()
    for n, _, v in sorted(sw.samples, key=lambda x: x[1]):
        if v == v3:
            seen.add(n)
        elif v == v2 and n in seen:
            mixed += 1

    print()
    print(
        f"hllm serve, 1 uvicorn worker (h11, asyncio loop), 127.0.0.1; load generator: asyncio raw HTTP/1.1, "
        f"{args.connections} keep-alive connections ({args.history_connections} for histories), closed loop, "
        f"{args.seconds:g} s per phase after 1 s warm-up; "
        f"{len(st['users'])} users, {len(st['items'])} items, k={args.k}, history length {args.history_len}; "
        f"server OMP threads {threads}; {os.cpu_count()} CPUs shared by server and client"
    )
    print()
    print("| phase | requests | req/s | p50 ms | p99 ms | errors | goal | met |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    out: dict[str, Any] = {"settings": vars(args) | {"workdir": str(root), "json": str(args.json)}}
    for name, ph in phases.items():
        if name in GOALS:
            rps_goal, p99_goal = GOALS[name]
            goal = f">= {rps_goal:,.0f} req/s, p99 <= {p99_goal:g} ms"
            met = ph.rps >= rps_goal and ph.pct(0.99) <= p99_goal and ph.errors == 0
        else:
            goal = "0 errors"
            met = ph.errors == 0 and mixed == 0
        print(
            f"| {name} | {ph.ok + ph.errors} | {ph.rps:,.0f} | {ph.pct(0.5):.1f} | {ph.pct(0.99):.1f} | "
            f"{ph.errors} | {goal} | {'yes' if met else 'NO'} |"
        )
        out[name] = {
            "requests": ph.ok + ph.errors,
            "rps": ph.rps,
            "p50_ms": ph.pct(0.5),
            "p99_ms": ph.pct(0.99),
            "errors": ph.errors,
            "statuses": ph.statuses,
            "met": met,
        }
    call = swap_t.get("call", float("nan")) - sw.t_start
    moved = swap_t.get("moved", float("nan")) - sw.t_start
    lag = first_v3 - swap_t.get("moved", float("nan"))
    print()
    print(
        f"swap: registry.promote(v{v3} -> challenger) called at {call:.2f} s, returned at {moved:.2f} s; "
        f"first v{v3} response {lag:.2f} s after that (poll period {args.poll_s:g} s)"
    )
    print(f"  responses per model version before the call: {before}")
    print(f"  between the call and the first v{v3} response: {between}")
    print(f"  after the first v{v3} response: {after}")
    print(f"  errors during the swap phase: {sw.errors}; v{v2} after v{v3} on one connection: {mixed}")
    print(f"  the server now serves champion v{final['champion']}, challenger v{final['challenger']}")
    swaps = re.search(r"^hllm_model_swaps_total (\d+)", metrics, re.M)
    print(f"  server swaps: {swaps.group(1) if swaps else '?'}")
    out["swap"].update(
        {"before": before, "between": between, "after": after, "mixed": mixed, "promote_s": moved - call, "lag_s": lag}
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    threading.excepthook = lambda a: print(f"thread error: {a.exc_value}", file=sys.stderr)
    main()
