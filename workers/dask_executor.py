"""`--executor dask://HOST:PORT`: the executor interface (`workers/executor.py`) on a Dask cluster.

The service above does not change: it calls `await executor.call(name, kwargs, ...)` as it does on
the local pool, and gets the same Outcome or the same errors. Here each call becomes one Dask task,
`workers.dask_remote.run`, which runs the registered task by name on a Dask worker: the task modules
(built-ins and `--tasks`) must be importable there (same image or checkout; a worker plugin imports
them on every worker, and start-up refuses a cluster whose workers cannot).

- Data: arguments and results travel as Dask data (msgpack frames; bytes out of band, never
  base64). A binary argument of `scatter_threshold` bytes or more is scattered first and passed
  as a Dask future, so it moves once, directly, and the task graph stays small.
- Progress and start: the worker logs events on a topic of this executor (`Worker.log_event`); the
  scheduler forwards them to this client (`Client.subscribe_topic`), where they reach the call's
  `on_progress` on the loop. The start event also tells a queued call from a running one
  (`pending`) and starts the client-side timeout clock.
- Timeout and cancel really stop the work (see `dask_remote.py`): with isolate="process" (the
  default) the task runs in a runner child of the Dask worker that the worker kills at the deadline
  or as soon as Dask cancels the task; with isolate="thread" the client restarts that Dask worker
  through its nanny. A client-side deadline (timeout + slack) backs both.
- Lost workers: a Dask worker that dies mid-task has its task rescheduled by the scheduler (Dask's
  retry, up to `distributed.scheduler.allowed-failures`, then KilledWorker: 502). A call never
  hangs: with the scheduler unreachable or no worker at all for `unavailable_grace` seconds it is
  answered 502, and a lost scheduler connection fails calls in flight with 502 at once.
- Readiness: a monitor asks the scheduler for its identity every `refresh` seconds; `alive` is the
  number of running Dask workers while the scheduler answers, else 0 (so /readyz answers 503), and
  it reconnects a client the scheduler dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import hashlib
import itertools
import logging
import os
import pickle
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from workers import dask_remote, registry
from workers.errors import Overloaded, PoolClosed, TaskFailed, TaskTimeout, WorkerCrashed
from workers.executor import LoopBoundExecutor, ProgressCallback
from workers.pool import Outcome
from workers.protocol import (
    CALL_FUNCTION,
    CALL_MAP,
    CALL_TASK,
    RESULT_CHUNK,
    RESULT_ERROR,
    RESULT_JSON,
    RESULT_VALUE,
    RUNNER_CANCELLED,
    RUNNER_CRASHED,
    RUNNER_TIMED_OUT,
)
from workers.stats import BUSY, IDLE, WorkerRow

try:  # the plugin base class; dask is a runtime dependency, but keep the import error readable
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - reported by make_executor
    WorkerPlugin = object  # type: ignore[assignment,misc]

log = logging.getLogger("procbridge.dask")

ISOLATION_MODES = ("process", "thread")
_TICK = 0.1


class _ClusterFailure(WorkerCrashed):
    """A call the cluster failed (502, like a crashed worker), told in a sentence: no pid, no signal."""

    def __init__(self, detail: str) -> None:
        super().__init__(0, None)
        self.args = (detail,)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class DaskUnavailable(_ClusterFailure):
    """The cluster cannot run the call: the scheduler is unreachable, or it has had no worker for
    too long. Answered 502 like a crashed worker (the upstream failed), never left hanging."""


class DaskWorkerLost(_ClusterFailure):
    """Dask gave up on the task: the workers running it died `allowed-failures` times."""


def parse_address(url: str) -> tuple[str, str]:
    """`dask://HOST:PORT[?isolate=process|thread]` -> ("tcp://HOST:PORT", isolate)."""
    parts = urlsplit(url)
    if parts.scheme != "dask" or not parts.hostname or not parts.port:
        raise ValueError("must be dask://HOST:PORT")
    query = parse_qs(parts.query)
    isolate = query.pop("isolate", ["process"])[-1]
    if isolate not in ISOLATION_MODES or query:
        raise ValueError("the only option of dask://HOST:PORT is ?isolate=process or ?isolate=thread")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"tcp://{host}:{parts.port}", isolate


@dataclass(frozen=True)
class DaskOptions:
    address: str  # tcp://HOST:PORT of the scheduler
    modules: tuple[str, ...] = ()
    isolate: str = "process"
    task_timeout: float = 60.0
    max_pending: int = 0  # calls waiting beyond the cluster's threads; at least 4 per thread
    cancel_running: bool = False  # stop a running call when its caller goes away
    scatter_threshold: int = 1024 * 1024  # bytes arguments this large are scattered first
    connect_timeout: float = 10.0
    refresh: float = 0.5  # how often the scheduler is asked for its workers (readiness)
    unavailable_grace: float = 10.0  # a call waits this long at most for a cluster with no worker
    timeout_slack: float = 2.0  # process mode: the worker enforces timeouts; the client only backs it up


class ProcbridgeTasks(WorkerPlugin):
    """Dask worker plugin: import the task modules on every worker (present and joining later) and
    stop procbridge's runner children when the worker closes."""

    name = "procbridge-tasks"

    def __init__(self, modules: tuple[str, ...], isolate: str = "process") -> None:
        self.modules = modules
        self.isolate = isolate

    def setup(self, worker: Any) -> None:
        registry.load(self.modules)
        if self.isolate == "process":  # one runner child per worker thread, ready before the first call
            dask_remote.prestart(self.modules, int(getattr(worker.state, "nthreads", 1) or 1))

    def teardown(self, worker: Any) -> None:
        dask_remote.stop_runners()


@dataclass(eq=False)
class _Call:
    id: int
    kind: int
    name: str
    timeout: float
    done: asyncio.Future[Any]
    progress: ProgressCallback | None = None
    kill_on_cancel: bool = False
    key: str = ""
    future: Any = None  # distributed.Future
    collector: asyncio.Task[None] | None = None
    started_at: float | None = None
    worker: str | None = None
    pid: int = 0
    reports: int = 0  # progress events received
    reports_wanted: int = 0  # progress events the worker says it sent (known once the result is in)
    all_reports: asyncio.Event = field(default_factory=asyncio.Event)
    scattered: list[Any] = field(default_factory=list)


class DaskExecutor(LoopBoundExecutor):
    """Runs registered tasks on a Dask cluster. Create, `await start()`, use, `await aclose()`."""

    def __init__(self, options: DaskOptions) -> None:
        if options.isolate not in ISOLATION_MODES:
            raise ValueError(f"isolate must be one of {ISOLATION_MODES}")
        self.options = options
        self.modules = tuple(options.modules)
        self.restarts: Counter[str] = Counter()
        self._topic = f"procbridge-{uuid.uuid4().hex}"
        self._plugin_name = "procbridge-tasks-" + hashlib.sha1(
            f"{','.join(self.modules)}/{options.isolate}".encode()).hexdigest()[:12]
        self._client: Any = None
        self._scheduler_id: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._workers: dict[str, dict[str, Any]] = {}
        self._pids: dict[str, int] = {}
        self._done_by: Counter[str] = Counter()
        self._reachable = False
        self._unavailable_since: float | None = time.monotonic()
        self._last_error = "not connected yet"
        self._quiet = asyncio.Event()
        self._monitor: asyncio.Task[None] | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._close_task: asyncio.Future[None] | None = None
        self._closing = False
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the scheduler and check that its workers can import the task modules.
        A scheduler that cannot be reached within `connect_timeout` is an error; a cluster with no
        worker yet is not (/readyz says 503 until one joins)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._quiet.set()
        try:
            await self._connect(self.options.connect_timeout)
        except Exception as exc:  # noqa: BLE001 - any failure to connect or probe stops the start
            await self._drop_client()
            raise RuntimeError(f"cannot use the Dask scheduler at {self.options.address}: {exc}") from None
        self._monitor = asyncio.ensure_future(self._watch())
        self._tick_handle = self._loop.call_later(_TICK, self._tick)

    async def _connect(self, timeout: float) -> None:
        from distributed import Client

        client = await Client(
            self.options.address, asynchronous=True, timeout=timeout, set_as_default=False,
            name=f"procbridge-{os.getpid()}",
        )
        self._client = client
        await self._introduce(client)
        await self._refresh()

    async def _introduce(self, client: Any) -> None:
        """Subscribe to our event topic, install the worker plugin, probe the workers' imports."""
        client.subscribe_topic(self._topic, self._on_event)
        await client.register_plugin(ProcbridgeTasks(self.modules, self.options.isolate), name=self._plugin_name)
        probes = await client.run(dask_remote.probe, self.modules)
        bad = {addr: p["error"] for addr, p in probes.items() if p["error"]}
        if bad:
            addr, error = next(iter(bad.items()))
            raise RuntimeError(
                f"{len(bad)} Dask worker(s) cannot import the task modules ({addr}: {error}); "
                "the workers need the same code as the service"
            )
        self._pids.update({addr: p["pid"] for addr, p in probes.items()})
        ident = await client.scheduler.identity()
        self._scheduler_id = ident.get("id")

    async def drain(self, grace: float) -> None:
        """Take no new calls, let admitted ones finish for up to `grace` seconds, then close."""
        self._closing = True
        if self._calls:
            self._quiet.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), grace)
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel what is still running on the cluster (its callers get PoolClosed), disconnect.
        The cluster itself is not ours: it keeps running. Idempotent."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self._closing = self._closed = True
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        calls = list(self._calls.values())
        for st in calls:
            self._settle(st, error=PoolClosed())
            if st.collector is not None:
                st.collector.cancel()
        futures = [st.future for st in calls if st.future is not None]
        if futures and self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.cancel(futures, reason="procbridge-shutdown"), 5.0)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._drop_client()
        self._quiet.set()

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._reachable = False
        if client is not None:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic(self._topic)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 5.0)

    # -- calling --------------------------------------------------------------------------------

    async def call(
        self,
        task: str,
        kwargs: dict[str, Any],
        *,
        timeout: float | None = None,
        encode_json: bool = False,
        on_progress: ProgressCallback | None = None,
        kill_on_cancel: bool = False,
    ) -> Outcome:
        """Run registered task `task` on a Dask worker; same contract as WorkerPool.call."""
        st = self._admit(CALL_TASK, task, timeout if timeout is not None else self.options.task_timeout)
        st.progress = on_progress
        st.kill_on_cancel = kill_on_cancel
        result: Outcome = await self._run(st, kwargs, encode_json, on_progress is not None)
        return result

    async def call_chunk(
        self, task: str, items: list[dict[str, Any]], *, timeout: float | None = None
    ) -> list[Outcome | TaskFailed]:
        """Run a task over several argument sets in one Dask task (a map chunk)."""
        st = self._admit(
            CALL_MAP, task, timeout if timeout is not None else self.options.task_timeout * max(1, len(items))
        )
        result: list[Outcome | TaskFailed] = await self._run(st, items, True, False)
        return result

    def _admit(self, kind: int, name: str, timeout: float) -> _Call:
        if self._closing or self._loop is None:
            raise PoolClosed()
        if self._client is None or not self._reachable:
            raise DaskUnavailable(
                f"the Dask scheduler at {self.options.address} is unreachable ({self._last_error})"
            )
        if self.pending >= self.max_pending:
            raise Overloaded(self.pending)
        st = _Call(next(self._ids), kind, name, timeout, self._loop.create_future())
        st.key = f"procbridge-{name}-{uuid.uuid4().hex}"
        self._calls[st.id] = st
        self._quiet.clear()
        return st

    async def _run(self, st: _Call, payload: Any, encode: bool, want_progress: bool) -> Any:
        client = self._client
        try:
            if st.kind == CALL_TASK:
                payload = await self._prepare(st, payload)
            spec = (st.id, st.kind, st.name, encode, want_progress, st.timeout, self._topic, self.modules,
                    self.options.isolate)
            st.future = client.submit(dask_remote.run, spec, payload, key=st.key, pure=False)
            st.collector = asyncio.ensure_future(self._collect(st))
            return await st.done
        except asyncio.CancelledError:
            self._abandon(st)
            raise
        finally:
            self._forget(st)

    async def _prepare(self, st: _Call, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Binary arguments go as Dask data: a handle on a shared-memory body (or any buffer) is read
        into bytes here, since Dask workers do not share this machine's /dev/shm; large ones are
        scattered to the cluster first and passed as a future."""
        out: dict[str, Any] = {}
        for name, value in kwargs.items():
            value = _as_plain(value)
            if type(value) is bytes and len(value) >= self.options.scatter_threshold:
                future = await self._client.scatter(value, hash=False)
                st.scattered.append(future)
                value = future
            out[name] = value
        return out

    async def _collect(self, st: _Call) -> None:
        """Await the Dask future and settle the call from what `dask_remote.run` returned."""
        try:
            status, value, pid, elapsed, reports = await st.future
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we stopped collecting (the caller went away, or close)
            reason = getattr(exc, "reason", "cancelled")
            self._settle(st, error=DaskUnavailable(
                f"the Dask cluster dropped the task ({reason}): the connection to the scheduler at "
                f"{self.options.address} was lost"
            ))
            return
        except Exception as exc:  # noqa: BLE001 - whatever Dask raised becomes this call's answer
            if type(exc).__name__ == "KilledWorker":
                self.restarts["crashed"] += 1
                self._settle(st, error=DaskWorkerLost(
                    f"the Dask workers running the task died ({exc}); Dask gave up retrying it"
                ))
            else:
                self._settle(st, error=TaskFailed(type(exc).__name__, f"the Dask task failed: {exc}"))
            return
        st.pid = pid
        if st.worker is not None:
            self._done_by[st.worker] += 1
        if st.progress is not None and st.reports < reports:
            # Progress travels worker -> scheduler -> here, the result worker -> here: let the last
            # reports (often "100%") arrive before the answer, so a job stores its final progress.
            st.reports_wanted = reports
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(st.all_reports.wait(), 1.0)
        if status == RESULT_ERROR:
            self._settle(st, error=TaskFailed(*value))
        elif status == RUNNER_TIMED_OUT:
            self.restarts["timeout"] += 1
            self._settle(st, error=TaskTimeout(st.timeout))
        elif status == RUNNER_CRASHED:
            self.restarts["crashed"] += 1
            self._settle(st, error=WorkerCrashed(pid, value))
        elif status == RUNNER_CANCELLED:
            self._settle(st, error=PoolClosed())
        elif status == RESULT_CHUNK:
            self._settle(st, [
                TaskFailed(*item) if item_status == RESULT_ERROR
                else Outcome(item, pid, item_elapsed, item_status == RESULT_JSON)
                for item_status, item, item_elapsed in value
            ])
        else:
            assert status in (RESULT_VALUE, RESULT_JSON)
            self._settle(st, Outcome(value, pid, elapsed, status == RESULT_JSON))

    def _settle(self, st: _Call, value: Any = None, error: BaseException | None = None) -> bool:
        if st.done.done():
            return False
        if error is not None:
            st.done.set_exception(error)
        else:
            st.done.set_result(value)
        return True

    def _abandon(self, st: _Call) -> None:
        """The caller stopped waiting: drop the task if it has not started; stop it if it runs and
        the caller asked for that (or the service is told to); otherwise let it finish on Dask."""
        if not st.done.done():
            st.done.cancel()
        if st.collector is not None:
            st.collector.cancel()
        if st.future is None:
            return
        if st.started_at is None or st.kill_on_cancel or self.options.cancel_running:
            self._spawn(self._stop_remote(st, "cancelled"))
        else:
            from distributed import fire_and_forget

            fire_and_forget(st.future)

    async def _stop_remote(self, st: _Call, reason: str) -> None:
        """Cancel the Dask task. A runner child notices within ~50 ms and is killed; in thread mode a
        started task's worker process is killed, and its nanny starts a new one (the only way to
        stop Python code running in a thread)."""
        client = self._client
        if client is None or st.future is None:
            return
        started = st.started_at is not None
        try:
            await asyncio.wait_for(client.cancel([st.future], reason=f"procbridge-{reason}"), 10.0)
            if started and self.options.isolate == "thread" and st.worker:
                log.warning("restarting Dask worker %s to stop %s (%s)", st.worker, st.name, reason)
                with contextlib.suppress(Exception):  # it dies before it can answer
                    await asyncio.wait_for(
                        client.run(dask_remote.kill_worker, workers=[st.worker], on_error="ignore"), 5.0
                    )
        except Exception as exc:  # noqa: BLE001 - logged: the client-side answer was already given
            log.warning("could not stop %s on Dask worker %s: %s", st.name, st.worker, exc)
        if started and reason == "cancelled":
            self.restarts["cancelled"] += 1

    def _forget(self, st: _Call) -> None:
        self._calls.pop(st.id, None)
        for future in st.scattered:
            with contextlib.suppress(Exception):
                future.release()
        st.scattered.clear()
        if not self._calls:
            self._quiet.set()

    def _on_event(self, event: tuple[float, Any]) -> None:
        """An event from a worker, forwarded by the scheduler: a call started, or reported progress."""
        msg = event[1]
        if not isinstance(msg, dict):
            return
        st = self._calls.get(msg.get("id", -1))
        if st is None or st.done.done():
            return
        kind = msg.get("kind")
        if kind == "start":
            st.started_at = time.monotonic()
            st.worker = msg.get("worker")
            st.pid = int(msg.get("pid") or 0)
        elif kind == "progress" and st.progress is not None:
            st.reports += 1
            try:
                st.progress(msg["done"], msg.get("total"), msg.get("message"))
            except Exception:
                log.exception("a progress callback failed")
            if st.reports_wanted and st.reports >= st.reports_wanted:
                st.all_reports.set()

    def _tick(self) -> None:
        """Client-side deadlines: a started call past timeout (+ slack in process mode, where the
        worker enforces it first), and calls waiting on a cluster that has no worker or no scheduler."""
        try:
            now = time.monotonic()
            slack = 0.0 if self.options.isolate == "thread" else self.options.timeout_slack
            no_cluster = (
                self._unavailable_since is not None and now - self._unavailable_since > self.options.unavailable_grace
            )
            for st in list(self._calls.values()):
                if st.done.done() or st.future is None:
                    continue
                if st.started_at is not None and now - st.started_at > st.timeout + slack:
                    self.restarts["timeout"] += 1
                    self._settle(st, error=TaskTimeout(st.timeout))
                    self._spawn(self._stop_remote(st, "timeout"))
                elif no_cluster and (st.started_at is None or not self._reachable):
                    self._settle(st, error=DaskUnavailable(
                        f"the Dask cluster at {self.options.address} has had no usable worker for "
                        f"{self.options.unavailable_grace:g} s ({self._last_error})"
                    ))
                    self._spawn(self._stop_remote(st, "unavailable"))
        finally:
            if not self._closed and self._loop is not None:
                self._tick_handle = self._loop.call_later(_TICK, self._tick)

    # -- watching the cluster -------------------------------------------------------------------

    async def _watch(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.options.refresh)
            try:
                await self._refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("watching the Dask cluster failed")

    async def _refresh(self) -> None:
        client = self._client
        try:
            if client is None or client.status in ("closing", "closed", "failed"):
                await self._drop_client()
                await self._connect(min(2.0, self.options.connect_timeout))
                return
            ident = await asyncio.wait_for(client.scheduler.identity(), 2.0)
            if ident.get("id") != self._scheduler_id:  # a new scheduler the client reconnected to
                await asyncio.wait_for(self._introduce(client), 10.0)
        except Exception as exc:  # noqa: BLE001 - unreachable for whatever reason: not ready
            if self._reachable:
                log.warning("the Dask scheduler at %s is unreachable: %s", self.options.address, exc or type(exc))
            self._reachable = False
            self._last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if self._unavailable_since is None:
                self._unavailable_since = time.monotonic()
            return
        workers = {
            addr: info for addr, info in ident.get("workers", {}).items()
            if info.get("status", "running") in ("running", "paused")
        }
        if not self._reachable:
            log.info("the Dask scheduler at %s answers; %d workers", self.options.address, len(workers))
        self._reachable = True
        self._workers = workers
        if workers:
            self._unavailable_since = None
        else:
            self._last_error = "the scheduler has no workers"
            if self._unavailable_since is None:
                self._unavailable_since = time.monotonic()
        unknown = [addr for addr in workers if addr not in self._pids]
        if unknown:
            self._pids.update(dict.fromkeys(unknown, 0))
            self._spawn(self._fetch_pids(unknown))
        for addr in [a for a in self._pids if a not in workers]:
            del self._pids[addr]
        for st in self._calls.values():
            if st.worker is not None and st.worker not in workers:
                # Its worker left: the scheduler holds the task for another (Dask's retry); it waits again.
                st.started_at = st.worker = None

    async def _fetch_pids(self, addresses: list[str]) -> None:
        with contextlib.suppress(Exception):
            pids = await asyncio.wait_for(self._client.run(os.getpid, workers=addresses, on_error="ignore"), 5.0)
            for addr, pid in pids.items():
                if addr in self._pids and isinstance(pid, int):
                    self._pids[addr] = pid

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- introspection --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Worker threads in the cluster (parallel lanes); at least 1."""
        return max(1, sum(int(info.get("nthreads", 1)) for info in self._workers.values()))

    @property
    def max_pending(self) -> int:
        return max(self.options.max_pending, 4 * self.size)

    @property
    def pending(self) -> int:
        """Calls submitted to the cluster that have not started on a worker yet."""
        return sum(1 for st in self._calls.values() if st.started_at is None and not st.done.done())

    @property
    def alive(self) -> int:
        """Dask workers while the scheduler answers; 0 when it does not."""
        return len(self._workers) if self._reachable and self._client is not None else 0

    @property
    def closing(self) -> bool:
        return self._closing

    def readiness(self) -> dict[str, Any]:
        """Extra fields for /readyz."""
        out: dict[str, Any] = {
            "executor": "dask", "scheduler": self.options.address, "scheduler_reachable": self._reachable,
            "threads": self.size if self._workers else 0,
        }
        if not self.alive:
            out["reason"] = self._last_error
        return out

    def _running_by_worker(self) -> dict[str, list[_Call]]:
        running: dict[str, list[_Call]] = {}
        for st in self._calls.values():
            if st.started_at is not None and st.worker and not st.done.done():
                running.setdefault(st.worker, []).append(st)
        return running

    def rows(self) -> list[WorkerRow]:
        """One row per Dask worker, as /metrics and /v1/workers read it."""
        running = self._running_by_worker()
        rows = []
        for slot, addr in enumerate(sorted(self._workers)):
            calls = running.get(addr, [])  # ours only: the scheduler's task counts lag by a heartbeat
            rows.append(WorkerRow(
                slot=slot, pid=self._pids.get(addr, 0), state=BUSY if calls else IDLE,
                call_id=calls[0].id if calls else 0, started_at=calls[0].started_at or 0.0 if calls else 0.0,
                cpu_seconds=0.0, tasks_done=self._done_by.get(addr, 0), retire_reason=0,
                task=calls[0].name if calls else None,
            ))
        return rows

    def describe_workers(self) -> list[dict[str, Any]]:
        """/v1/workers: the contract's fields plus the Dask worker's address, name and threads."""
        running = self._running_by_worker()
        out = []
        for row, addr in zip(self.rows(), sorted(self._workers), strict=True):
            info = self._workers[addr]
            out.append({
                "slot": row.slot, "pid": row.pid or None, "state": "busy" if row.state == BUSY else "idle",
                "task": row.task, "tasks_done": row.tasks_done, "cpu_seconds": None,
                "address": addr, "name": str(info.get("name", addr)), "nthreads": int(info.get("nthreads", 1)),
                "running": len(running.get(addr, [])),
                "memory_bytes": info.get("metrics", {}).get("memory"),
            })
        return out

    # -- concurrent.futures.Executor ------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Run a picklable module-level function on a Dask worker (in the worker's thread: no
        timeout, no isolation). The future gets its value, or TaskFailed / PoolClosed / Overloaded."""
        future: cf.Future[Any] = cf.Future()
        if self._loop is None:
            raise RuntimeError("start() the executor before submitting work")
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        try:
            blob = pickle.dumps((fn, args, kwargs), protocol=5)
        except Exception as exc:  # noqa: BLE001 - this call fails, nothing else
            future.set_exception(TaskFailed(type(exc).__name__, f"the call cannot be sent to a worker: {exc}"))
            return future

        def begin() -> None:
            if not future.set_running_or_notify_cancel():
                return
            task = asyncio.ensure_future(self._run_function(blob))

            def done(t: asyncio.Task[Any]) -> None:
                if t.cancelled():
                    future.set_exception(PoolClosed())
                elif t.exception() is not None:
                    future.set_exception(t.exception())
                else:
                    future.set_result(t.result())

            task.add_done_callback(done)

        if threading.get_ident() == self._loop_thread:
            begin()
        else:
            self._loop.call_soon_threadsafe(begin)
        return future

    async def _run_function(self, blob: bytes) -> Any:
        st = self._admit(CALL_FUNCTION, "function", self.options.task_timeout)
        try:
            st.future = self._client.submit(dask_remote.run_function, blob, key=st.key, pure=False)
            status, value, _pid, _elapsed = await st.future
        finally:
            self._forget(st)
        if status == RESULT_ERROR:
            raise TaskFailed(*value)
        return value


def _as_plain(value: Any) -> Any:
    """Bytes-like arguments as bytes: buffers, and handles that can read themselves out (the
    shared-memory body handle of the local path has `tobytes()` or `read()`)."""
    if type(value) is bytes or value is None or isinstance(value, str | int | float | bool | list | dict):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    for method in ("tobytes", "to_bytes", "read_bytes", "read"):
        reader = getattr(value, method, None)
        if callable(reader):
            data = reader()
            if isinstance(data, bytes | bytearray | memoryview):
                return bytes(data)
    return value
