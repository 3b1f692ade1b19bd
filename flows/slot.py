"""The nightly run's global concurrency slot, made crash-proof.

A run takes the one slot of the Prefect global concurrency limit ``flow.concurrency_limit`` with a
lease, and records who holds it in a Prefect variable next to the limit (``<limit>-holder``: flow run
id and name, host, pid and the process's start time, the lease id, when it took the slot, a heartbeat
it refreshes every :data:`HEARTBEAT_S`). A run that finds the slot taken checks that record every
:data:`CHECK_S` seconds:

- the holder's process is gone (same host: no such pid, or the pid now belongs to a process started
  at another time), or its Prefect flow run is in a final state, or (another host) its heartbeat is
  older than :data:`STALE_S`: the slot is recovered at once (the holder's lease released, the
  limit's active slots set back, its flow run marked Crashed, the temporary API it leaves behind
  stopped) and the waiting run takes it;
- otherwise it waits, saying who holds the slot, since when and until when it waits, at once and
  every :data:`LOG_EVERY_S` seconds, and fails with :class:`SlotBusy` after ``timeout_s``.

The same record lets :func:`fail_orphans` close the MLflow runs (and the Prefect flow run) of a
nightly run that died without closing them. :func:`graceful_stop` bounds how long a run may take to
stop on SIGTERM / SIGINT (:data:`GRACE_S`).

Everything goes through one synchronous Prefect client, one request per check: nothing retries in
the background, so a run stopped while it waits never keeps calling an API that has gone away.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

    from hllm.config import Config

log = logging.getLogger("hllm.flows")

CHECK_S = 5.0  # a waiting run re-checks the holder this often: a dead holder on this host is recovered within it
LOG_EVERY_S = 60.0  # ... and says who holds the slot this often
HEARTBEAT_S = 30.0  # the holder refreshes its record (and renews its lease) this often
STALE_S = 120.0  # a holder on another host whose heartbeat is older than this is taken for dead
LEASE_S = 300.0  # the Prefect lease; a Prefect server's repossessor frees the slot of a holder gone this long
GRACE_S = 30.0  # SIGTERM / SIGINT: the process ends within this, cleanly or not

TAG_HOST = "hllm.host"  # on the MLflow runs of a flow run: the process that runs it
TAG_PID = "hllm.pid"
TAG_PID_STARTED = "hllm.pid_started"


class SlotBusy(RuntimeError):
    """Another nightly-retrain run holds the concurrency slot."""


class SlotUnavailable(RuntimeError):
    """The Prefect API went away while this run waited for the slot: fail now, do not retry."""


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def process_start(pid: int) -> float | None:
    """The start time (epoch seconds) of process ``pid`` on this host, or None when there is none."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(p.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def process_gone(host: str, pid: int, started: float) -> str | None:
    """Why the process (host, pid, start time) is known to be dead, or None (alive, or another host)."""
    if host != socket.gethostname():
        return None
    now_started = process_start(pid)
    if now_started is None:
        return f"process {pid} on {host} is gone"
    if abs(now_started - started) > 1.0:
        return f"process {pid} on {host} is gone (the pid now belongs to a process started later)"
    return None


def process_tags() -> dict[str, str]:
    """The MLflow tags naming this process (what :func:`fail_orphans` checks)."""
    pid = os.getpid()
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(pid), TAG_PID_STARTED: f"{process_start(pid) or 0.0:.3f}"}


@dataclasses.dataclass
class Holder:
    """Who holds the slot (the value of the ``<limit>-holder`` Prefect variable)."""

    flow_run_id: str | None
    flow_run_name: str
    host: str
    pid: int
    pid_started: float
    lease_id: str
    since: str
    heartbeat: str
    api_pid: int | None = None  # the temporary Prefect API this process started, if any

    @classmethod
    def this_process(cls, flow_run_id: str | None, flow_run_name: str, lease_id: str) -> Holder:
        pid = os.getpid()
        now = _iso(_now())
        return cls(
            flow_run_id,
            flow_run_name,
            socket.gethostname(),
            pid,
            process_start(pid) or 0.0,
            lease_id,
            now,
            now,
            _temporary_api_pid(),
        )

    def describe(self) -> str:
        who = f"flow run {self.flow_run_name or '?'} ({self.flow_run_id})" if self.flow_run_id else "a process"
        return f"{who}, pid {self.pid} on {self.host}, since {self.since} (heartbeat {self.heartbeat})"

    def is_this_process(self) -> bool:
        return self.host == socket.gethostname() and self.pid == os.getpid()


def _temporary_api_pid() -> int | None:
    """The pid of the temporary Prefect API server this process started (no PREFECT_API_URL)."""
    try:
        from prefect.server.api.server import SubprocessASGIServer

        for srv in SubprocessASGIServer._instances.values():
            if srv.server_process is not None and srv.server_process.poll() is None:
                return int(srv.server_process.pid)
    except Exception:  # noqa: BLE001 - private API: only used to clean up after a dead holder
        pass
    return None


def variable_name(limit: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in limit.lower())
    return f"{safe}-holder"


def read_holder(client: SyncPrefectClient, limit: str) -> Holder | None:
    var = client.read_variable_by_name(variable_name(limit))
    if var is None or not isinstance(var.value, dict) or not var.value:
        return None
    try:
        return Holder(**var.value)
    except TypeError:
        log.warning("variable %s is not a holder record: %s", variable_name(limit), var.value)
        return None


def _write_variable(client: SyncPrefectClient, name: str, value: dict[str, Any]) -> None:
    import httpx
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        client.update_variable(VariableUpdate(name=name, value=value))
        return
    except ObjectNotFound:
        pass
    except httpx.HTTPStatusError as e:
        if e.response.status_code != 404:
            raise
    try:
        client.create_variable(VariableCreate(name=name, value=value))
    except ObjectAlreadyExists:  # created by another run in between
        client.update_variable(VariableUpdate(name=name, value=value))


def write_holder(client: SyncPrefectClient, limit: str, holder: Holder | None) -> None:
    """One API call (a row update): other runs see the old record or the new one, never a mix."""
    _write_variable(client, variable_name(limit), dataclasses.asdict(holder) if holder else {})


def _flow_run_state(client: SyncPrefectClient, flow_run_id: str | None) -> Any:
    if not flow_run_id:
        return None
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_flow_run(UUID(flow_run_id)).state
    except (ObjectNotFound, ValueError):
        return None


def dead_reason(client: SyncPrefectClient, holder: Holder, now: datetime | None = None) -> str | None:
    """Why ``holder`` is dead, or None while it may be alive."""
    gone = process_gone(holder.host, holder.pid, holder.pid_started)
    if gone:
        return gone
    state = _flow_run_state(client, holder.flow_run_id)
    if state is not None and state.is_final():
        return f"its flow run is {state.name}"
    if holder.host != socket.gethostname():
        try:
            beat = datetime.fromisoformat(holder.heartbeat)
        except ValueError:
            return None
        age = ((now or _now()) - beat).total_seconds()
        if age > STALE_S:
            return f"no heartbeat from {holder.host} for {age:.0f} s (> {STALE_S:.0f} s)"
    return None


def mark_crashed(client: SyncPrefectClient, flow_run_id: str | None, reason: str) -> bool:
    """Set a flow run that is still Running/Pending to Crashed with ``reason``; True if it was changed."""
    state = _flow_run_state(client, flow_run_id)
    if flow_run_id is None or state is None or state.is_final():
        return False
    from prefect.states import Crashed

    try:
        client.set_flow_run_state(UUID(flow_run_id), Crashed(message=reason), force=True)
    except Exception as e:  # noqa: BLE001 - best effort: the slot and MLflow runs are what matter
        log.warning("could not mark flow run %s Crashed: %s", flow_run_id, e)
        return False
    return True


def recover(client: SyncPrefectClient, limit: str, holder: Holder | None, reason: str) -> None:
    """Free the slot of a dead holder: release its lease (a Prefect server still has it), set the
    limit's active slots back where the lease was unknown (a temporary API that died with it), mark
    its flow run Crashed, stop the temporary API it left running, clear the record."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    who = holder.describe() if holder else "no holder record"
    log.warning("concurrency slot '%s' recovered from %s: %s", limit, who, reason)
    before = client.read_global_concurrency_limit_by_name(limit).active_slots
    if holder is not None:
        with contextlib.suppress(Exception):
            client.release_concurrency_slots_with_lease(UUID(holder.lease_id))
    after = client.read_global_concurrency_limit_by_name(limit).active_slots
    if after > 0 and after >= before:  # the lease was not known to this API: take the slot back by hand
        client.update_global_concurrency_limit(limit, GlobalConcurrencyLimitUpdate(active_slots=after - 1))
    if holder is not None:
        mark_crashed(client, holder.flow_run_id, f"flow run died: {reason}")
        if holder.api_pid and holder.host == socket.gethostname():
            _stop_orphaned_api(holder.api_pid)
    write_holder(client, limit, None)


def _stop_orphaned_api(pid: int) -> None:
    import psutil

    with contextlib.suppress(psutil.Error):
        p = psutil.Process(pid)
        if "prefect.server.api.server:create_app" in " ".join(p.cmdline()) and p.ppid() != os.getpid():
            p.terminate()
            log.info("stopped the temporary Prefect API (pid %d) the dead holder left behind", pid)


def _ensure_limit(client: SyncPrefectClient, limit: str) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        client.read_global_concurrency_limit_by_name(limit)
    except ObjectNotFound:
        with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))


def _other_running_flow_runs(client: SyncPrefectClient, flow_name: str, current: str | None) -> list[str]:
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
    )
    return [str(r.id) for r in runs if str(r.id) != current]


def _try_acquire(client: SyncPrefectClient, limit: str, flow_run_id: str | None) -> str | None:
    """One attempt: the lease id, or None when the slot is taken (423)."""
    import httpx
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder

    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(flow_run_id)) if flow_run_id else None
    try:
        resp = client.increment_concurrency_slots_with_lease(
            names=[limit], slots=1, mode="concurrency", lease_duration=LEASE_S, holder=holder
        )
    except httpx.HTTPStatusError as e:
        if e.response.status_code == 423:
            return None
        raise
    return str(resp.json()["lease_id"])


@contextlib.contextmanager
def _heartbeat(client_factory: Callable[[], Any], limit: str, holder: Holder) -> Iterator[None]:
    """Refresh the holder record and renew the lease every HEARTBEAT_S in a daemon thread."""
    stop = threading.Event()
    ctx = contextvars.copy_context()  # the Prefect settings (API URL) of this run

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                with client_factory() as c:
                    c.renew_concurrency_lease(UUID(holder.lease_id), LEASE_S)
                    holder.heartbeat = _iso(_now())
                    write_holder(c, limit, holder)
            except Exception as e:  # noqa: BLE001 - a missed beat; STALE_S allows several
                log.debug("slot heartbeat failed: %s", e)

    t = threading.Thread(target=ctx.run, args=(beat,), name="hllm-slot-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()


@contextlib.contextmanager
def hold(
    limit: str,
    timeout_s: float,
    flow_run_id: str | None = None,
    flow_run_name: str = "",
    flow_name: str = "nightly-retrain",
    on_recovered: Callable[[], Any] | None = None,
) -> Iterator[None]:
    """Hold the one slot of the global concurrency limit ``limit`` for the body (see the module doc).

    Raises :class:`SlotBusy` after ``timeout_s`` with a live holder, :class:`SlotUnavailable` when the
    API cannot be reached. ``on_recovered`` runs after a dead holder's slot was taken over (to close
    its MLflow runs). An empty ``limit`` disables the guard."""
    if not limit:
        yield
        return
    import httpx
    from prefect.client.orchestration import get_client

    def client_factory() -> Any:
        return get_client(sync_client=True)

    t0 = time.monotonic()
    deadline = t0 + timeout_s
    until = _iso(_now() + timedelta(seconds=timeout_s))
    last_log = -float("inf")
    recovered = False
    lease_id: str | None = None
    try:
        with client_factory() as client:
            _ensure_limit(client, limit)
            while True:
                lease_id = _try_acquire(client, limit, flow_run_id)
                if lease_id is not None:
                    break
                holder = read_holder(client, limit)
                if holder is not None:
                    reason = dead_reason(client, holder)
                elif not _other_running_flow_runs(client, flow_name, flow_run_id):
                    reason = "the slot is taken but no holder is recorded and no other flow run is Running"
                else:
                    reason = None
                if reason:
                    recover(client, limit, holder, reason)
                    recovered = True
                    continue
                now = time.monotonic()
                if now >= deadline:
                    who = holder.describe() if holder else "an unrecorded holder"
                    raise SlotBusy(
                        f"another {flow_name} run holds the '{limit}' concurrency slot ({who}; waited "
                        f"{timeout_s:.0f} s; see `prefect global-concurrency-limit inspect {limit}`); "
                        "this run changed nothing"
                    )
                if now - last_log >= LOG_EVERY_S:
                    who = holder.describe() if holder else "a run that has not recorded itself yet"
                    log.warning(
                        "waiting for concurrency slot '%s': held by %s; waiting until %s (flow.slot_timeout_s), "
                        "re-checking every %.0f s",
                        limit,
                        who,
                        until,
                        CHECK_S,
                    )
                    last_log = now
                time.sleep(max(0.0, min(CHECK_S, deadline - now)))
            me = Holder.this_process(flow_run_id, flow_run_name, lease_id)
            try:
                write_holder(client, limit, me)
            except BaseException:
                client.release_concurrency_slots_with_lease(UUID(lease_id))
                raise
            waited = time.monotonic() - t0
            if waited > 1.0 or recovered:
                log.info("took concurrency slot '%s' after %.1f s", limit, waited)
    except (httpx.TransportError, OSError) as e:
        raise SlotUnavailable(f"the Prefect API is unreachable while taking slot '{limit}': {e}") from e
    if recovered and on_recovered is not None:
        try:
            on_recovered()
        except Exception as e:  # noqa: BLE001 - the slot is ours; the next run retries the cleanup
            log.warning("cleaning up after the dead holder: %s", e)
    try:
        with _heartbeat(client_factory, limit, me):
            yield
    finally:
        try:
            with client_factory() as client:
                client.release_concurrency_slots_with_lease(UUID(lease_id))
                current = read_holder(client, limit)
                if current is not None and current.lease_id == lease_id:
                    write_holder(client, limit, None)
        except Exception as e:  # noqa: BLE001 - a stopped API: the next run recovers the slot from the record
            log.warning("could not release concurrency slot '%s': %s", limit, e)


# --------------------------------------------------------------------------- zombie runs


def orphan_check(limit: str, current: str | None) -> Callable[[str, Mapping[str, str]], str | None]:
    """The ``dead_reason(flow_run_id, tags)`` callable of :func:`hllm.ops.tracking.fail_orphaned_runs`.

    A flow run is dead when the process on its runs' tags is gone (same host), when it is the recorded
    slot holder and :func:`dead_reason` says so, or when its Prefect flow run is in a final state."""
    from prefect.client.orchestration import get_client

    def reason(flow_run_id: str, tags: Mapping[str, str]) -> str | None:
        if flow_run_id == current:
            return None
        host, pid = tags.get(TAG_HOST), tags.get(TAG_PID)
        if host and pid:
            gone = process_gone(host, int(pid), float(tags.get(TAG_PID_STARTED) or 0.0))
            if gone:
                return gone
            if host == socket.gethostname():
                return None  # its process lives
        with get_client(sync_client=True) as client:
            holder = read_holder(client, limit) if limit else None
            if holder is not None and holder.flow_run_id == flow_run_id:
                return dead_reason(client, holder)
            state = _flow_run_state(client, flow_run_id)
            if state is not None and state.is_final():
                return f"its flow run is {state.name}"
        return None

    return reason


def fail_orphans(cfg: Config, limit: str, current: str | None) -> list[str]:
    """Close the MLflow runs left RUNNING by dead nightly flow runs (FAILED, with the reason) and mark
    those flow runs Crashed in Prefect; returns the MLflow run ids closed."""
    from prefect.client.orchestration import get_client

    from hllm.ops import tracking

    dead: dict[str, str] = {}
    check = orphan_check(limit, current)

    def reason(flow_run_id: str, tags: Mapping[str, str]) -> str | None:
        why = check(flow_run_id, tags)
        if why:
            dead[flow_run_id] = why
        return why

    closed = tracking.fail_orphaned_runs(cfg, reason)
    if dead:
        with get_client(sync_client=True) as client:
            for fr, why in dead.items():
                mark_crashed(client, fr, f"flow run died: {why}")
    return closed


# --------------------------------------------------------------------------- stopping


@contextlib.contextmanager
def graceful_stop(grace_s: float = GRACE_S) -> Iterator[None]:
    """On SIGTERM / SIGINT, the handler in place (Prefect's: raise TerminationSignal; Python's:
    KeyboardInterrupt) unwinds the run, which releases the slot and marks its MLflow runs KILLED;
    a watchdog ends the process with status 128+signal if that takes longer than ``grace_s``.
    Outside the main thread (a flow run in a thread) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def watchdog(signum: int) -> None:
        time.sleep(grace_s)
        log.error("still running %.0f s after signal %d: exiting now", grace_s, signum)
        logging.shutdown()
        os._exit(128 + signum)

    def handler(signum: int, frame: FrameType | None) -> None:
        log.warning("signal %d: stopping this run (at most %.0f s)", signum, grace_s)
        if not any(t.name == "hllm-stop-watchdog" for t in threading.enumerate()):
            threading.Thread(target=watchdog, args=(signum,), name="hllm-stop-watchdog", daemon=True).start()
        prev = previous.get(signum)
        if prev == signal.SIG_IGN:
            return
        if callable(prev):
            prev(signum, frame)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for signum, prev in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, prev)


def holder_json(limit: str) -> str:
    """The holder record as JSON (for `hllm` diagnostics and tests)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        h = read_holder(client, limit)
    return json.dumps(dataclasses.asdict(h) if h else None)
