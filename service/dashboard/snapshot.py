"""What the dashboard shows, as one JSON document: a snapshot of the service, built once a second
while someone watches (hub.py) and sent to every watcher as it is.

    {"at", "executor", "ready", "draining", "pending", "workers": [...], "restarts": {reason: n},
     "calls": {...} (series.py), "jobs": [the 20 newest], "job_counts": {status: n}}

It reads what /v1/workers and /metrics read, nothing else: the executor's worker rows (the local
pool's shared-memory table; the Dask executor's own description of its workers), its memory and
CPU sample (read off the loop, at most once per half second however many ask), its restart counts,
the per-second call counts kept by `Metrics`, and the job store (one `list` and one `counts` per
snapshot). docs/api.md ("Dashboard") documents every field; the page (static/) reads them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from service.jobs.model import STATUSES, Job
from service.metrics import RESTART_REASONS
from service.state import Service
from workers.executor import Executor
from workers.stats import STATE_NAMES

log = logging.getLogger("procbridge.dashboard")

RECENT_JOBS = 20
_SAMPLE_AGE = 0.5  # a memory and CPU sample younger than this is reused (snapshots come a second apart)


class SnapshotBuilder:
    """Builds the snapshots of one service. It remembers each slot's last CPU reading, so that a
    worker's `cpu_percent` is its CPU use between two snapshots (100: one core all the time)."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._cpu: dict[int, tuple[int, float, float]] = {}  # slot -> (pid, CPU seconds, monotonic time)
        self._jobs: tuple[list[dict[str, Any]], dict[str, int]] = ([], dict.fromkeys(STATUSES, 0))
        self._store_failing = False

    async def json(self) -> str:
        """The snapshot as JSON text, the `data:` of one SSE event (one line: orjson writes no newline)."""
        return orjson.dumps(await self.build()).decode()

    async def build(self) -> dict[str, Any]:
        service = self._service
        executor = service.executor
        workers = await self._workers(executor) if executor is not None else []
        jobs, job_counts = await self._recent_jobs()
        restarts: dict[str, int] = {}
        if executor is not None:
            restarts = {reason: executor.restarts.get(reason, 0) for reason in sorted({*RESTART_REASONS,
                                                                                      *executor.restarts})}
        return {
            "at": round(time.time(), 3),
            "executor": service.config.executor_url.kind,
            "ready": _ready(service),
            "draining": service.draining,
            "pending": executor.pending if executor is not None else 0,
            "workers": workers,
            "restarts": restarts,
            "calls": service.metrics.series.snapshot(),
            "jobs": jobs,
            "job_counts": job_counts,
        }

    async def _workers(self, executor: Executor) -> list[dict[str, Any]]:
        described = executor.describe_workers()
        if described is not None:  # the Dask executor: what the scheduler last said
            return [_described(worker, executor) for worker in described]
        await executor.sample_memory(_SAMPLE_AGE)
        memory, cpu = executor.memory(), executor.cpu_seconds()
        now = time.monotonic()
        listing = []
        for row in executor.rows():
            pid = row.pid or None
            use = memory.get(row.pid) if pid else None
            live = cpu.get(row.pid) if pid else None  # /proc: current even in the middle of a long task
            listing.append({
                "slot": row.slot,
                "pid": pid,
                "state": STATE_NAMES.get(row.state, "starting"),
                "task": row.task,
                "cpu_percent": self._cpu_percent(row.slot, row.pid, live, now),
                "cpu_seconds": round(live if live is not None else row.cpu_seconds, 3),
                "rss_bytes": use.rss if use is not None else None,
                "tasks_done": row.tasks_done,
                "restarts": executor.slot_restarts.get(row.slot, 0),
            })
        return listing

    def _cpu_percent(self, slot: int, pid: int, cpu: float | None, now: float) -> float | None:
        """CPU use since the previous snapshot, in percent of one core; None for a worker seen for the
        first time (or replaced since), and where /proc could not say."""
        if cpu is None:
            self._cpu.pop(slot, None)
            return None
        before = self._cpu.get(slot)
        self._cpu[slot] = (pid, cpu, now)
        if before is None or before[0] != pid or now <= before[2]:
            return None
        return round(max(0.0, cpu - before[1]) / (now - before[2]) * 100, 1)

    async def _recent_jobs(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The newest jobs and the counts by status; the last ones read while the store fails (said once)."""
        store = self._service.store
        if store is None:
            return self._jobs
        try:
            newest = await store.list(limit=RECENT_JOBS)
            counts = await store.counts()
        except Exception as exc:  # noqa: BLE001 - a store that fails leaves the rest of the snapshot
            if not self._store_failing:
                log.warning("dashboard: the job store cannot be read (%s); jobs shown as last read", exc)
            self._store_failing = True
            return self._jobs
        self._store_failing = False
        self._jobs = ([_job(job) for job in newest], {status: counts.get(status, 0) for status in STATUSES})
        return self._jobs


def _ready(service: Service) -> bool:
    """What /readyz says: 200 (a worker takes calls, or one being replaced will) and not draining."""
    executor = service.executor
    if service.draining or executor is None or executor.closing:
        return False
    return executor.alive + executor.replacing >= 1


def _described(worker: dict[str, Any], executor: Executor) -> dict[str, Any]:
    """A worker as an executor describes it (Dask): what it has, None for what it does not."""
    cpu = worker.get("cpu_seconds")
    return {
        "slot": worker.get("slot"),
        "pid": worker.get("pid"),
        "state": worker.get("state", "idle"),
        "task": worker.get("task"),
        "cpu_percent": worker.get("cpu_percent"),
        "cpu_seconds": float(cpu) if cpu is not None else None,
        "rss_bytes": worker.get("rss_bytes", worker.get("memory_bytes")),
        "tasks_done": worker.get("tasks_done", 0),
        "restarts": executor.slot_restarts.get(worker.get("slot", -1), 0),
    }


def _job(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "task": job.task,
        "status": job.status,
        "progress": job.progress,
        "priority": job.priority,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }
