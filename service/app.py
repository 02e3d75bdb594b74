"""The application factory: `create_app(config)` wires the catalog, the executor and the metrics
into an aiohttp Application, creating and closing resources in its startup and cleanup hooks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from service.config import Config
from service.metrics import Metrics
from service.problems import problem_middleware
from service.validation import TaskCatalog
from workers import registry
from workers.executor import Executor
from workers.pool import PoolOptions, WorkerPool

if TYPE_CHECKING:
    from service.job_runner import JobRunner

log = logging.getLogger("procbridge")


@dataclass
class Service:
    """What the handlers need: settings, the task catalog, the executor, metrics, drain state."""

    config: Config
    catalog: TaskCatalog
    metrics: Metrics
    executor: Executor | None = None
    jobs: JobRunner | None = None
    draining: bool = False
    openapi_doc: bytes | None = None  # built on first request, then served as is


SERVICE = web.AppKey("service", Service)


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
    from service import job_handlers, map_handler, ops_handlers, task_handlers
    from service.job_events import JobEvents
    from service.job_runner import JobRunner
    from service.store import open_store

    catalog = TaskCatalog(registry.load(config.tasks))
    service = Service(config=config, catalog=catalog, metrics=Metrics(lambda: service.executor))
    app = web.Application(middlewares=[problem_middleware], client_max_size=config.max_body + 1)
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
            concurrency=config.job_concurrency, ttl=config.job_ttl,
            shared_store=config.store.startswith(("redis://", "rediss://", "unix://")), debug=config.debug,
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

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app
