"""What the handlers share: one app's `Service` record, stored under the app key `SERVICE`.

A module of its own so that the handlers and the app factory both import it and neither imports the
other: app.py imports the handler modules to add their routes, and a handler reads
`request.app[SERVICE]`, never service.app.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from service.access_log import AccessLogSink, AuditLog, JsonAccessLogger
from service.concurrency import TaskGates
from service.config import Config
from service.jobs.runner import JobRunner
from service.jobs.store.base import JobStore
from service.jobs.webhooks import WebhookPolicy
from service.metrics import Metrics, RejectedRequests
from service.validation import TaskCatalog
from workers.executor import Executor
from workers.serving import ServingProcesses


@dataclass
class Service:
    """Settings, the task catalog and metrics (from the start), the resources the app opens at start-up
    (None until then: service/app.py), and the drain state."""

    config: Config
    catalog: TaskCatalog
    metrics: Metrics
    executor: Executor | None = None
    executor_start: asyncio.Future[None] | None = None  # the executor's start, running in the background
    store: JobStore | None = None
    jobs: JobRunner | None = None
    draining: bool = False
    openapi_doc: bytes | None = None  # built on first request, then served as is
    access_log: AccessLogSink | None = None  # None: --access-log off
    audit: AuditLog | None = None  # refused API keys; None without --api-keys
    gates: TaskGates = field(init=False)  # @task(concurrency=N): service/concurrency.py
    webhook_policy: WebhookPolicy = field(init=False)  # which webhook hosts a job may name
    on_drain: list[Callable[[], None]] = field(default_factory=list)  # called when a drain starts (dashboard streams)
    rejected: RejectedRequests = field(default_factory=RejectedRequests)  # 401s and 429s, for /metrics
    serving: ServingProcesses | None = None  # --http-processes N ≥ 2: the serving processes (service/serving.py)

    def __post_init__(self) -> None:
        limits = ((e.name, e.spec.concurrency) for e in self.catalog if e.spec.concurrency is not None)
        self.gates = TaskGates(limits, lambda: self.executor)
        self.webhook_policy = WebhookPolicy.from_config(self.config)

    def runner_options(self) -> dict[str, Any]:
        """The keyword arguments of web.AppRunner that belong to the app: its access log."""
        if self.access_log is None:
            return {"access_log": None}
        # aiohttp hands `access_log` to `access_log_class` unchanged (one logger per connection).
        return {"access_log_class": JsonAccessLogger, "access_log": self.access_log}

    def log_sinks(self) -> list[AccessLogSink]:
        """The log sinks to start and close: the access log, and the audit log's when it has its own
        (stderr, with --access-log off)."""
        sinks = (self.access_log, self.audit.sink if self.audit is not None else None)
        return [sink for sink in dict.fromkeys(sinks) if sink is not None]

    def stop_taking_work(self) -> None:
        """The start of a drain: /readyz turns 503, new calls and jobs get 503 `draining`, the job runner
        claims no more jobs (queued ones stay in the store for the next start), and the `on_drain`
        hooks run (the dashboard's event streams end). Once: a second call does nothing."""
        if self.draining:
            return
        self.draining = True
        if self.jobs is not None:
            self.jobs.stop_claiming()
        for hook in self.on_drain:
            hook()


SERVICE = web.AppKey("service", Service)
