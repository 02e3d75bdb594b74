"""The application factory: `create_app(config)` wires the catalog, the executor and the metrics
into an aiohttp Application, creating and closing resources in its startup and cleanup hooks."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Middleware

from service import map_handler, ops_handlers, task_handlers
from service.access_log import STDERR, AccessLogSink, AuditLog
from service.auth import KeyRing, auth_middleware
from service.config import Config
from service.jobs import handlers as job_handlers
from service.jobs.events import JobEvents
from service.jobs.runner import JobRunner
from service.jobs.store import open_store
from service.metrics import Metrics, RejectedRequests
from service.problems import problem_middleware
from service.rate_limit import rate_limit_middleware
from service.state import SERVICE, Service
from service.validation import TaskCatalog
from workers import registry
from workers.executor import Executor
from workers.pool import PoolOptions, WorkerPool

log = logging.getLogger("procbridge")


def make_executor(config: Config) -> Executor:
    """The executor named by --executor: the local pool, or a Dask cluster (dask://HOST:PORT)."""
    if config.executor.startswith("dask://"):
        try:
            from workers.dask_executor import DaskExecutor, DaskOptions, parse_address
        except ImportError as exc:  # dask/distributed are in requirements.lock; a trimmed install may lack them
            raise RuntimeError(f"--executor {config.executor} needs the 'distributed' package: {exc}") from None
        address, isolate = parse_address(config.executor)
        return DaskExecutor(
            DaskOptions(
                address=address,
                modules=config.tasks,
                isolate=isolate,
                task_timeout=config.task_timeout,
                max_pending=config.max_pending,
                cancel_running=config.cancel_running_on_disconnect,
            )
        )
    return WorkerPool(
        PoolOptions(
            workers=config.workers,
            modules=config.tasks,
            max_pending=config.max_pending,
            task_timeout=config.task_timeout,
            max_tasks_per_worker=config.max_tasks_per_worker,
            max_worker_memory=config.max_worker_memory,
            nice=config.worker_nice,
            cancel_running=config.cancel_running_on_disconnect,
            debug=config.debug,
            shm_threshold=config.shm_threshold,
            shm_budget=config.shm_budget,
            shm_need=2 * config.max_body,  # one body of the largest size in, one result out
        )
    )


def create_app(config: Config) -> web.Application:
    """Build the app. Task modules are imported here (so a bad module fails before anything starts);
    the pool starts in the startup hook and stops in the cleanup hook."""
    catalog = TaskCatalog(registry.load(config.tasks))
    service = Service(config=config, catalog=catalog, metrics=Metrics(lambda: service.executor))
    access_log = AccessLogSink(config.access_log) if config.access_log != "off" else None
    service.access_log = access_log
    if access_log is not None:
        access_log.with_keys = bool(config.api_keys)
    # Middlewares only for what is configured, so the default path pays nothing: errors outermost
    # (a 401 or 429 is a problem like any other), then keys, then the rate (per key, so after keys).
    middlewares: list[Middleware] = [problem_middleware]
    rejected = RejectedRequests()
    service.metrics.registry.register(rejected)
    audit: AuditLog | None = None
    audit_sink: AccessLogSink | None = None
    if config.api_keys:
        # Refused keys are audited on the access-log stream, or on stderr when that is off.
        audit_sink = access_log if access_log is not None else AccessLogSink(STDERR)
        audit = log_rejection = AuditLog(audit_sink)

        def on_reject(request: web.Request, reason: str, key_id: str | None) -> None:
            rejected.unauthorized()
            log_rejection(request, reason, key_id)

        middlewares.append(auth_middleware(KeyRing(config.api_keys), on_reject))
    if config.rate_limit is not None:
        middlewares.append(rate_limit_middleware(config.rate_limit, on_limited=rejected.rate_limited))
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body + 1)
    app[SERVICE] = service
    task_handlers.setup(app)
    map_handler.setup(app)
    job_handlers.setup(app)
    ops_handlers.setup(app)

    async def start(app: web.Application) -> None:
        store = open_store(config.store)
        await store.open()
        try:
            executor = make_executor(config)
            await executor.start()
        except BaseException:
            await store.close()
            raise
        service.executor = executor
        service.jobs = JobRunner(
            store, executor, catalog, JobEvents(),
            concurrency=config.job_concurrency, ttl=config.job_ttl, lease=config.job_lease,
            shared_store=store.shared, debug=config.debug,
        )
        await service.jobs.start()
        service.metrics.start()
        where = f"Dask cluster {config.executor}" if config.executor != "local" else "local pool"
        log.info("%d workers ready (%s); tasks: %s", executor.alive, where, ", ".join(e.name for e in catalog))

    async def stop(app: web.Application) -> None:
        await service.metrics.stop()
        if service.jobs is not None:
            await service.jobs.close()
        if service.executor is not None:
            await service.executor.aclose()
        if service.jobs is not None:
            await service.jobs.store.close()

    sinks = [sink for sink in dict.fromkeys((access_log, audit_sink)) if sink is not None]

    async def open_logs(app: web.Application) -> None:
        for sink in sinks:
            sink.start()

    async def close_logs(app: web.Application) -> None:
        # After the server has closed its connections (aiohttp runs cleanup hooks last), so every
        # response has been logged; a stuck stdout costs at most the deadline, never the exit.
        if audit is not None:
            audit.close()
        for sink in sinks:
            await sink.aclose(timeout=2.0)

    app.on_startup.append(open_logs)  # first: a log that cannot be opened stops start-up before the pool
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.on_cleanup.append(close_logs)
    return app
