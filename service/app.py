"""The application factory: `create_app(config)` wires the catalog, the metrics, the middlewares and
the routes into an aiohttp Application, and lists the resources the app holds while it runs.

Each resource is one of aiohttp's cleanup contexts: opened at start-up in the order of
`app.cleanup_ctx`, closed in the reverse order once the server has closed every connection
(service/server.py runs the phases around them):

    log sinks -> job store -> executor (starting in the background) -> job runner -> metrics timers
    -> dashboard hub

Log sinks first, so a log that cannot be opened stops start-up before any worker starts, and last to
close, so every response is logged; the runner needs both the store and the executor, and stops
before them; the dashboard's snapshots read all of them, so its hub stops first (its streams end
earlier still: at the drain, and at the app's shutdown, before aiohttp waits for open connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from service import map_handler, ops_handlers, task_handlers
from service.access_log import STDERR, AccessLogSink, AuditLog
from service.auth import KeyRing, auth_middleware
from service.concurrency import GatesCollector
from service.config import Config
from service.cors import CorsPolicy
from service.dashboard import handlers as dashboard
from service.jobs import handlers as job_handlers
from service.jobs.events import JobEvents
from service.jobs.runner import JobRunner
from service.jobs.store import open_store
from service.jobs.webhooks import WebhookSender
from service.metrics import Metrics
from service.problems import problem_middleware
from service.rate_limit import rate_limit_middleware
from service.state import SERVICE, Service
from service.validation import TaskCatalog
from workers import registry
from workers.backends import open_executor
from workers.executor import Executor

log = logging.getLogger("procbridge")




def create_app(config: Config, *, core: bool = False) -> web.Application:
    """Build the app. Task modules are imported here (so a bad module fails before anything starts);
    the resources open when the app starts (aiohttp's runner.setup()) and close at its cleanup.

    `core`: the app of the core behind serving processes (`--http-processes N`, service/serving.py),
    reached only over its private Unix socket: the serving processes are the edge (keys, rate,
    CORS, the access log: service/front.py), so it checks none of them again."""
    catalog = TaskCatalog(registry.load(config.tasks))
    service = Service(config=config, catalog=catalog, metrics=Metrics(lambda: service.executor))
    if not core:
        service.access_log = access_log_sink(config)
    app = web.Application(client_max_size=config.max_body + 1)
    app.middlewares.extend(_middlewares(service, app, edge=not core))  # after the app: CORS adds a signal to it
    app[SERVICE] = service
    task_handlers.setup(app)
    map_handler.setup(app)
    job_handlers.setup(app)
    ops_handlers.setup(app)
    dashboard.setup(app)
    app.cleanup_ctx.extend((log_sinks, job_store, task_executor, job_runner, metrics_timers, dashboard.hub))
    return app


def access_log_sink(config: Config) -> AccessLogSink | None:
    """The access log's sink as configured (None: `--access-log off`); with keys, lines name them."""
    if config.access_log == "off":
        return None
    sink = AccessLogSink(config.access_log)
    sink.with_keys = bool(config.api_keys)
    return sink


def _middlewares(service: Service, app: web.Application, *, edge: bool = True) -> list[Middleware]:
    """Middlewares only for what is configured, so the default path pays nothing: errors outermost
    (a 401 or 429 is a problem like any other), then, at the edge, CORS preflights (answered without
    a key or a token of the rate), then keys, then the rate (per key, so after keys)."""
    service.metrics.registry.register(service.rejected)
    service.metrics.registry.register(GatesCollector(service.gates))  # procbridge_task_waiting{task}
    return [problem_middleware, *(edge_middlewares(service, app) if edge else ())]


def edge_middlewares(
    service: Service, app: web.Application, take: Callable[[str], Awaitable[float]] | None = None
) -> list[Middleware]:
    """CORS, keys and the rate, as configured; `take`: spend rate tokens elsewhere (a serving
    process spends the core's, so the limit is the whole service's: service/front.py)."""
    config = service.config
    rejected = service.rejected
    middlewares: list[Middleware] = []
    if config.cors_origins:
        middlewares.append(CorsPolicy(config.cors_origins).install(app))
    if config.api_keys:
        # Refused keys are audited on the access-log stream, or on stderr when that is off.
        audit = service.audit = AuditLog(service.access_log or AccessLogSink(STDERR))

        def on_reject(request: web.Request, reason: str, key_id: str | None) -> None:
            rejected.unauthorized()
            audit(request, reason, key_id)

        middlewares.append(auth_middleware(KeyRing(config.api_keys), on_reject))
    if config.rate_limit is not None:
        middlewares.append(rate_limit_middleware(config.rate_limit, on_limited=rejected.rate_limited, take=take))
    return middlewares


# -- the resources, in the order they open ---------------------------------------------------------


async def log_sinks(app: web.Application) -> AsyncIterator[None]:
    """The access log's and the audit's writer threads. Closed after the server has closed its
    connections, so every response has been logged; a stuck stdout costs at most the deadline,
    never the exit."""
    service = app[SERVICE]
    sinks = service.log_sinks()
    for sink in sinks:
        sink.start()
    yield
    if service.audit is not None:
        service.audit.close()
    for sink in sinks:
        await sink.aclose(timeout=2.0)


async def job_store(app: web.Application) -> AsyncIterator[None]:
    """The job store named by --store (SQLite file or Redis), opened before any worker starts: an
    unreachable Redis stops start-up at once."""
    service = app[SERVICE]
    store = open_store(service.config.store_url)
    await store.open()
    service.store = store
    yield
    await store.close()


async def task_executor(app: web.Application) -> AsyncIterator[None]:
    """The executor named by --executor. Its start (the worker parent's imports and preloads, then the
    workers) runs in the background, so the server binds and /healthz answers at once while /readyz
    says `starting`; calls made meanwhile wait for the workers. `Service.executor_start` is that
    start: service/server.py stops the service (exit 1) if it fails. The workers stop at this
    context's close (after a drain, service/server.py)."""
    service = app[SERVICE]
    config = service.config
    executor = open_executor(config.executor_url, config)
    service.executor = executor
    async with starting_in_background(service, executor, _start(service, executor)):
        yield


@contextlib.asynccontextmanager
async def starting_in_background(
    service: Service, executor: Executor, start: Coroutine[Any, Any, None]
) -> AsyncIterator[None]:
    """`start` runs in the background as `service.executor_start` (the server reads it as the start);
    at the end, a start still running is cancelled and the executor closed."""
    service.executor_start = asyncio.ensure_future(start)
    try:
        yield
    finally:
        if not service.executor_start.done():
            service.executor_start.cancel()
        await asyncio.gather(service.executor_start, return_exceptions=True)
        await executor.aclose()


async def _start(service: Service, executor: Executor) -> None:
    config = service.config
    started = time.monotonic()
    await executor.start()
    where = f"Dask cluster {config.executor_url}" if config.executor_url.kind == "dask" else "local pool"
    log.info(
        "%d workers ready in %.2f s (%s); tasks: %s",
        executor.alive,
        time.monotonic() - started,
        where,
        ", ".join(e.name for e in service.catalog),
    )


async def job_runner(app: web.Application) -> AsyncIterator[None]:
    """The job runner: requeues jobs a crash left running, then claims queued jobs; it stops claiming
    when the drain starts and stops (its running jobs' calls cancelled) before the executor closes."""
    service = app[SERVICE]
    config = service.config
    store, executor = service.store, service.executor
    assert store is not None and executor is not None  # opened by the contexts before this one
    # The sender starts even without --webhook-allow: deliveries left pending by an earlier run are
    # then given up (the URL is checked again) instead of keeping their jobs from expiring.
    sender = WebhookSender.from_config(store, config, metrics=service.metrics.webhooks, policy=service.webhook_policy)
    runner = JobRunner(
        store, executor, service.catalog, JobEvents(store),
        concurrency=config.job_concurrency, ttl=config.job_ttl, lease=config.job_lease,
        shared_store=store.shared, debug=config.debug, gates=service.gates,
        retry_backoff=config.retry_backoff, webhooks=sender,
    )
    service.jobs = runner
    await runner.start()  # its recovery makes the deliveries a crash left leased due at once
    await sender.start()
    yield
    await runner.close()
    await sender.close()  # deliveries in flight go out again after the next start (at-least-once)


async def metrics_timers(app: web.Application) -> AsyncIterator[None]:
    """The event-loop lag timer behind procbridge_event_loop_lag_seconds."""
    metrics = app[SERVICE].metrics
    metrics.start()
    yield
    await metrics.stop()
