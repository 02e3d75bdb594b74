"""Prometheus metrics (prometheus-client), one registry per app so tests can build many apps.

Task calls by outcome and the duration histogram are plain counts updated on each call (a dict
entry and a list slot: no lock, no `.labels()` lookup; only the loop's thread updates and scrapes
them) and exposed at scrape time; pool state (pending, workers by state, restarts, size and scaling)
is read at scrape time from the pool and its shared-memory table, so the hot path pays nothing for
it. Event-loop lag is measured by a periodic timer: how late it fires. Webhook deliveries are counted by the webhook
sender into `Metrics.webhooks` (a `WebhookDeliveries`), read at scrape time like the rest. The same
per-call step also counts the call in the current second of `Metrics.series`, the dashboard's calls/s
and latency series (service/dashboard/series.py: two list slots more, no clock read).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from service.dashboard.series import CallSeries
from workers.executor import Executor
from workers.memory import MemoryUse
from workers.stats import STATE_NAMES

disable_created_metrics()  # the *_created series only double the scrape size

_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_CALLS = len(_DURATION_BUCKETS) + 1  # where a CallSeries row keeps its call count
LAG_INTERVAL = 0.1
RESTART_REASONS = ("crashed", "timeout", "cancelled", "max_tasks", "max_memory", "start_failed", "start_timeout")


class _PoolCollector(Collector):
    def __init__(self, pool: Callable[[], Executor | None]) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Any]:
        pool = self._pool()
        pending = GaugeMetricFamily("procbridge_pending_tasks", "Tasks admitted and waiting for a worker")
        workers = GaugeMetricFamily("procbridge_workers", "Worker processes by state", labels=["state"])
        restarts = CounterMetricFamily(
            "procbridge_worker_restarts", "Worker processes replaced, by reason", labels=["reason"]
        )
        cpu = CounterMetricFamily("procbridge_worker_cpu_seconds", "CPU seconds used by live workers", labels=["slot"])
        started = GaugeMetricFamily(
            "procbridge_worker_task_started_at_seconds",
            "Unix time the task a worker is running now started (busy workers only)", labels=["slot"],
        )
        memory = GaugeMetricFamily(
            "procbridge_worker_memory_bytes",
            'Memory of each live worker (slot) and of the worker parent (slot="parent"): rss (resident), '
            "private (resident in that process only) and pss (shared pages divided among their users)",
            labels=["slot", "kind"],
        )
        size = GaugeMetricFamily("procbridge_pool_size", "Worker processes the pool keeps now (starting ones included)")
        fewest = GaugeMetricFamily("procbridge_pool_min_size", "The fewest workers (--workers MIN..MAX; fixed: size)")
        most = GaugeMetricFamily("procbridge_pool_max_size", "The most workers (--workers MIN..MAX; fixed: size)")
        scaled = CounterMetricFamily(
            "procbridge_pool_scaled", "Times an elastic pool grew (up) or shrank (down) by one worker; not restarts",
            labels=["direction"],
        )
        if pool is not None:
            pending.add_metric([], pool.pending)
            size.add_metric([], pool.size)
            fewest.add_metric([], pool.min_size)
            most.add_metric([], pool.max_size)
            for direction in ("up", "down"):
                scaled.add_metric([direction], pool.scaled.get(direction, 0))
            sample = pool.memory()
            counts = dict.fromkeys(("starting", "idle", "busy"), 0)
            for row in pool.rows():
                if STATE_NAMES.get(row.state) in counts:
                    counts[STATE_NAMES[row.state]] += 1
                if row.pid:
                    cpu.add_metric([str(row.slot)], row.cpu_seconds)
                    _add_memory(memory, str(row.slot), sample.get(row.pid))
                    started_at = row.task_started_at()
                    if started_at is not None:
                        started.add_metric([str(row.slot)], started_at)
            parent = pool.parent_pid
            if parent is not None:
                _add_memory(memory, "parent", sample.get(parent))
            for state, n in counts.items():
                workers.add_metric([state], n)
            for reason in sorted({*RESTART_REASONS, *pool.restarts}):
                restarts.add_metric([reason], pool.restarts.get(reason, 0))
        yield pending
        yield workers
        yield restarts
        yield size
        yield fewest
        yield most
        yield scaled
        yield cpu
        yield started
        yield memory
        yield from _shm_metrics(pool.payload_stats() if pool is not None else None)
        yield from _output_metrics(pool.output_stats() if pool is not None else None)
        yield from _batch_metrics(pool.batcher.sent if pool is not None else {})


def _batch_metrics(sent: dict[str, list[int]]) -> Iterator[Any]:
    """Batches of `batch=` tasks sent to the workers, and the calls in them (workers/batching.py)."""
    batches = CounterMetricFamily("procbridge_batches", "Invocations of batch tasks sent", labels=["task"])
    calls = CounterMetricFamily("procbridge_batched_calls", "Calls gathered into those invocations", labels=["task"])
    for task, (n, size) in sorted(sent.items()):
        batches.add_metric([task], n)
        calls.add_metric([task], size)
    yield batches
    yield calls


def _add_memory(family: GaugeMetricFamily, slot: str, use: MemoryUse | None) -> None:
    if use is not None:
        for kind, value in (("rss", use.rss), ("private", use.private), ("pss", use.pss)):
            family.add_metric([slot, kind], value)


def _output_metrics(stats: dict[str, Any] | None) -> Iterator[Any]:
    """Task output lines (stdout, stderr) logged by the service, and dropped over the rate limit."""
    if stats is None:
        return
    lines = CounterMetricFamily(
        "procbridge_task_output_lines", "Lines tasks printed, logged or dropped (over the rate)",
        labels=["stream", "outcome"],
    )
    for outcome in ("logged", "dropped"):
        for stream, n in sorted(stats.get(outcome, {}).items()):
            lines.add_metric([stream, outcome], n)
    yield lines


def _shm_metrics(stats: dict[str, Any] | None) -> Iterator[Any]:
    """The shared-memory payload pool (workers/shm.py), when the executor has one."""
    if stats is None:
        return
    count = GaugeMetricFamily("procbridge_shm_segments", "Shared-memory payload segments", labels=["state"])
    size = GaugeMetricFamily("procbridge_shm_bytes", "Bytes of shared-memory payload segments", labels=["state"])
    for state in ("leased", "free"):
        count.add_metric([state], stats[f"{state}_segments"])
        size.add_metric([state], stats[f"{state}_bytes"])
    budget = GaugeMetricFamily("procbridge_shm_budget_bytes", "Bytes of /dev/shm payload segments may use")
    budget.add_metric([], stats["budget"])
    payloads = CounterMetricFamily(
        "procbridge_large_payloads",
        "Binary payloads above --shm-threshold, by direction (in: to a worker, out: results) and the path they took "
        "(shm, or pipe when shared memory had no room)", labels=["direction", "path"],
    )
    for direction in ("in", "out"):
        for path in ("shm", "pipe"):
            payloads.add_metric([direction, path], stats["payloads"].get((direction, path), 0))
    yield count
    yield size
    yield budget
    yield payloads


class _TaskCollector(Collector):
    """`procbridge_tasks_total{task,outcome}` and `procbridge_task_duration_seconds{task}` from
    plain counts kept by `Metrics.observe`."""

    _LE = [floatToGoString(b) for b in _DURATION_BUCKETS] + ["+Inf"]

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], int] = {}
        self.buckets: dict[str, list[int]] = {}  # per task: observations per bucket (not cumulative), +Inf last
        self.sums: dict[str, float] = {}

    def collect(self) -> Iterator[Any]:
        calls = CounterMetricFamily("procbridge_tasks", "Task calls by outcome", labels=["task", "outcome"])
        for (task, outcome), n in self.calls.items():
            calls.add_metric([task, outcome], n)
        duration = HistogramMetricFamily(
            "procbridge_task_duration_seconds", "Seconds a task ran in its worker", labels=["task"]
        )
        for task, counts in self.buckets.items():
            duration.add_metric(
                [task], list(zip(self._LE, itertools.accumulate(counts), strict=True)), sum_value=self.sums[task]
            )
        yield calls
        yield duration


class RejectedRequests(Collector):
    """`procbridge_rejected_requests_total{reason}`: requests refused for a missing or wrong key
    (`unauthorized`) or over the rate (`rate-limited`). Plain counts, read at scrape time."""

    def __init__(self) -> None:
        self.counts = {"unauthorized": 0, "rate-limited": 0}

    def unauthorized(self) -> None:
        self.counts["unauthorized"] += 1

    def rate_limited(self) -> None:
        self.counts["rate-limited"] += 1

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily("procbridge_rejected_requests", "Requests refused by API keys or rate limits",
                                     labels=["reason"])
        for reason, n in self.counts.items():
            family.add_metric([reason], n)
        yield family


WEBHOOK_OUTCOMES = ("delivered", "failed", "gave_up")


class WebhookDeliveries(Collector):
    """`procbridge_webhook_deliveries_total{outcome}` (each delivery attempt once: `delivered`, `failed`
    with a retry to come, `gave_up` when none is left) and `procbridge_webhooks_pending`: plain numbers
    the webhook sender (service/jobs/webhooks.py) keeps, read at scrape time (the store is not asked)."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(WEBHOOK_OUTCOMES, 0)
        self.pending = 0

    def count(self, outcome: str) -> None:
        self.counts[outcome] += 1

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily("procbridge_webhook_deliveries", "Webhook delivery attempts by outcome",
                                     labels=["outcome"])
        for outcome, n in self.counts.items():
            family.add_metric([outcome], n)
        yield family
        yield GaugeMetricFamily(
            "procbridge_webhooks_pending",
            "Webhook deliveries this process is making, or has scheduled a retry of", value=self.pending,
        )


class Metrics:
    def __init__(self, pool: Callable[[], Executor | None], clock: Callable[[], float] = time.monotonic) -> None:
        self.series = CallSeries(_DURATION_BUCKETS, clock)  # per second, the last 5 minutes: the dashboard's
        self.registry = CollectorRegistry()
        self._tasks = _TaskCollector()
        self.registry.register(self._tasks)
        self.webhooks = WebhookDeliveries()
        self.registry.register(self.webhooks)
        self.loop_lag = Gauge(
            "procbridge_event_loop_lag_seconds", "How late the event loop ran a timer (highest in the last second)",
            registry=self.registry,
        )
        self.registry.register(_PoolCollector(pool))
        self._lag_task: asyncio.Task[None] | None = None

    def observe(self, task: str, outcome: str, seconds: float | None = None) -> None:
        """Count one call of `task` with its outcome ("ok" or a problem slug), and, given, the
        seconds it ran. Called on the loop's thread only (as is the scrape)."""
        stats = self._tasks
        key = (task, outcome)
        stats.calls[key] = stats.calls.get(key, 0) + 1
        second = self.series.row  # this second's counts (CallSeries: buckets, then the calls)
        second[_CALLS] += 1
        if seconds is not None:
            counts = stats.buckets.get(task)
            if counts is None:
                counts = stats.buckets[task] = [0] * (len(_DURATION_BUCKETS) + 1)
                stats.sums[task] = 0.0
            bucket = bisect.bisect_left(_DURATION_BUCKETS, seconds)
            counts[bucket] += 1
            second[bucket] += 1
            stats.sums[task] += seconds

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def start(self) -> None:
        self._lag_task = asyncio.ensure_future(self._measure_lag())

    async def stop(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task

    async def _measure_lag(self) -> None:
        """Sleep LAG_INTERVAL, see how late we woke; publish the worst over the last second. Each
        wake-up also moves the per-second call counts on to the current second."""
        worst, window_start = 0.0, time.monotonic()
        while True:
            before = time.monotonic()
            await asyncio.sleep(LAG_INTERVAL)
            now = time.monotonic()
            self.series.advance()
            worst = max(worst, now - before - LAG_INTERVAL)
            if now - window_start >= 1.0:
                self.loop_lag.set(max(0.0, worst))
                worst, window_start = 0.0, now
