"""The executor's view of the cluster: one Dask client, what the scheduler says about its workers,
and whether the cluster can take a call now.

Connecting introduces this service to the scheduler (subscribe to the executor's event topic,
install the worker plugin, probe that every worker can import the task modules). A monitor then
asks the scheduler for its identity every `refresh` seconds: that list of workers is what readiness,
`size`, `/metrics` rows and `/v1/workers` are built from, and a failed answer is how an unreachable
scheduler is noticed (calls are then refused at once, and those waiting are failed after the grace).
A client the scheduler dropped is replaced; a scheduler that restarted is introduced to again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from workers.dask import remote as dask_remote
from workers.dask.calls import DaskCall
from workers.dask.options import DaskOptions
from workers.dask.plugin import ProcbridgeTasks, WorkerSetupFailed, plugin_name
from workers.stats import BUSY, IDLE, WorkerRow

log = logging.getLogger("procbridge.dask")

EventHandler = Callable[[tuple[float, Any]], None]


class DaskStartFailed(RuntimeError):
    """The Dask workers cannot run the tasks: the worker plugin's setup failed on one (with
    isolate=thread a `@preload` or `@on_worker_start` hook raised there; or a task module will not
    import). One line: the hook and its exception, and the worker; the traceback is logged."""


class Cluster:
    """The client, and the scheduler's workers as last seen. The executor owns the calls; this owns
    the connection, and is told by the executor what to do with each event and where to run its
    background steps (so they are cancelled with the executor's)."""

    def __init__(
        self,
        options: DaskOptions,
        topic: str,
        on_event: EventHandler,
        on_workers: Callable[[dict[str, dict[str, Any]]], None],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self.options = options
        self.modules = tuple(options.modules)
        self.client: Any = None  # distributed.Client, while connected
        self.workers: dict[str, dict[str, Any]] = {}  # address -> the scheduler's info, running or paused
        self.pids: dict[str, int] = {}  # address -> Dask worker pid (0 until known)
        self.tasks_done: Counter[str] = Counter()  # address -> calls of ours it answered
        self.reachable = False
        self.unavailable_since: float | None = time.monotonic()  # None while a worker is there
        self.last_error = "not connected yet"
        self._topic = topic
        self._on_event = on_event
        self._on_workers = on_workers
        self._spawn = spawn
        self._plugin_name = plugin_name(self.modules, options.isolate)
        self._scheduler_id: str | None = None
        self._monitor: asyncio.Task[None] | None = None

    # -- connection -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect to the scheduler and check that its workers can import the task modules.
        A scheduler that cannot be reached within `connect_timeout` is an error; a cluster with no
        worker yet is not (/readyz says 503 until one joins)."""
        try:
            await self._connect(self.options.connect_timeout)
        except DaskStartFailed:  # the scheduler answered; a worker could not start the tasks
            await self.disconnect()
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to connect or probe stops the start
            await self.disconnect()
            raise RuntimeError(f"cannot use the Dask scheduler at {self.options.address}: {exc}") from None
        self._monitor = asyncio.ensure_future(self._watch())

    async def stop_watching(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor

    async def disconnect(self) -> None:
        """Let go of the client (the cluster itself is not ours: it keeps running)."""
        client, self.client = self.client, None
        self.reachable = False
        if client is not None:
            try:
                client.unsubscribe_topic(self._topic)
                await asyncio.wait_for(client.close(), 5.0)
            except Exception:
                log.warning("closing the Dask client failed", exc_info=True)

    async def _connect(self, timeout: float) -> None:
        from distributed import Client

        client = await Client(
            self.options.address, asynchronous=True, timeout=timeout, set_as_default=False,
            name=f"procbridge-{os.getpid()}",
        )
        self.client = client
        await self._introduce(client)
        await self.refresh()

    async def _introduce(self, client: Any) -> None:
        """Subscribe to our event topic, install the worker plugin, probe the workers' imports."""
        client.subscribe_topic(self._topic, self._on_event)
        try:
            await client.register_plugin(ProcbridgeTasks(self.modules, self.options.isolate), name=self._plugin_name)
        except WorkerSetupFailed as exc:  # Dask re-raises the first worker's setup error as it was raised
            log.error("the task modules cannot start on Dask worker %s: %s\n%s",
                      exc.address or "?", exc.line, exc.details.rstrip())
            raise DaskStartFailed(str(exc)) from None
        probes = await client.run(dask_remote.probe, self.modules)
        bad = {addr: p["error"] for addr, p in probes.items() if p["error"]}
        if bad:
            addr, error = next(iter(bad.items()))
            raise RuntimeError(
                f"{len(bad)} Dask worker(s) cannot import the task modules ({addr}: {error}); "
                "the workers need the same code as the service"
            )
        self.pids.update({addr: p["pid"] for addr, p in probes.items()})
        ident = await client.scheduler.identity()
        self._scheduler_id = ident.get("id")

    # -- watching the scheduler -----------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.options.refresh)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("watching the Dask cluster failed")

    async def refresh(self) -> None:
        """Ask the scheduler for its workers (reconnecting or introducing ourselves again first if
        needed); on any failure the cluster is unreachable until the next answer."""
        client = self.client
        try:
            if client is None or client.status in ("closing", "closed", "failed"):
                await self.disconnect()
                await self._connect(min(2.0, self.options.connect_timeout))
                return
            ident = await asyncio.wait_for(client.scheduler.identity(), 2.0)
            if ident.get("id") != self._scheduler_id:  # a new scheduler the client reconnected to
                await asyncio.wait_for(self._introduce(client), 10.0)
        except Exception as exc:  # noqa: BLE001 - unreachable for whatever reason: not ready
            if self.reachable:
                log.warning("the Dask scheduler at %s is unreachable: %s", self.options.address, exc or type(exc))
            self.reachable = False
            self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if self.unavailable_since is None:
                self.unavailable_since = time.monotonic()
            return
        workers = {
            addr: info for addr, info in ident.get("workers", {}).items()
            if info.get("status", "running") in ("running", "paused")
        }
        if not self.reachable:
            log.info("the Dask scheduler at %s answers; %d workers", self.options.address, len(workers))
        self.reachable = True
        self.workers = workers
        if workers:
            self.unavailable_since = None
        else:
            self.last_error = "the scheduler has no workers"
            if self.unavailable_since is None:
                self.unavailable_since = time.monotonic()
        unknown = [addr for addr in workers if addr not in self.pids]
        if unknown:
            self.pids.update(dict.fromkeys(unknown, 0))
            self._spawn(self._fetch_pids(unknown))
        for addr in [a for a in self.pids if a not in workers]:
            del self.pids[addr]
        self._on_workers(workers)

    async def _fetch_pids(self, addresses: list[str]) -> None:
        """The pids of workers that joined after the probe (for /v1/workers); best effort, 0 if unknown."""
        client = self.client
        if client is None:
            return
        try:
            pids = await asyncio.wait_for(client.run(os.getpid, workers=addresses, on_error="ignore"), 5.0)
        except Exception:  # /v1/workers still lists them, with their pid unknown
            log.warning("could not ask Dask workers %s for their pids", addresses, exc_info=True)
            return
        for addr, pid in pids.items():
            if addr in self.pids and isinstance(pid, int):
                self.pids[addr] = pid

    # -- what the executor reports --------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Connected and the scheduler answered last time (a call may be submitted)."""
        return self.client is not None and self.reachable

    def unavailable_longer_than(self, grace: float, now: float) -> bool:
        """True once the scheduler has been unreachable, or without workers, for over `grace` s."""
        return self.unavailable_since is not None and now - self.unavailable_since > grace

    @property
    def size(self) -> int:
        """Worker threads in the cluster (parallel lanes); at least 1."""
        return max(1, sum(int(info.get("nthreads", 1)) for info in self.workers.values()))

    @property
    def alive(self) -> int:
        """Dask workers while the scheduler answers; 0 when it does not."""
        return len(self.workers) if self.usable else 0

    def readiness(self) -> dict[str, Any]:
        """Extra fields for /readyz."""
        out: dict[str, Any] = {
            "executor": "dask", "scheduler": self.options.address, "scheduler_reachable": self.reachable,
            "threads": self.size if self.workers else 0,
        }
        if not self.alive:
            out["reason"] = self.last_error
        return out

    def rows(self, calls: Iterable[DaskCall]) -> list[WorkerRow]:
        """One row per Dask worker, as /metrics and /v1/workers read it; busy from our own running
        `calls` (the scheduler's task counts lag by a heartbeat)."""
        running = _running_by_worker(calls)
        rows = []
        for slot, addr in enumerate(sorted(self.workers)):
            mine = running.get(addr, [])
            rows.append(WorkerRow(
                slot=slot, pid=self.pids.get(addr, 0), state=BUSY if mine else IDLE,
                call_id=mine[0].id if mine else 0, started_at=mine[0].started_at or 0.0 if mine else 0.0,
                cpu_seconds=0.0, tasks_done=self.tasks_done.get(addr, 0), retire_reason=0,
                task=mine[0].name if mine else None,
            ))
        return rows

    def describe_workers(self, calls: Iterable[DaskCall]) -> list[dict[str, Any]]:
        """/v1/workers: the contract's fields plus the Dask worker's address, name and threads."""
        calls = list(calls)
        running = _running_by_worker(calls)
        out = []
        for row, addr in zip(self.rows(calls), sorted(self.workers), strict=True):
            info = self.workers[addr]
            out.append({
                "slot": row.slot, "pid": row.pid or None, "state": "busy" if row.state == BUSY else "idle",
                "task": row.task, "tasks_done": row.tasks_done, "cpu_seconds": None,
                "address": addr, "name": str(info.get("name", addr)), "nthreads": int(info.get("nthreads", 1)),
                "running": len(running.get(addr, [])),
                "memory_bytes": info.get("metrics", {}).get("memory"),
            })
        return out


def _running_by_worker(calls: Iterable[DaskCall]) -> dict[str, list[DaskCall]]:
    running: dict[str, list[DaskCall]] = {}
    for st in calls:
        if st.running and st.worker:
            running.setdefault(st.worker, []).append(st)
    return running
