"""HTTP handlers for operators: health, readiness, metrics, the worker table, the OpenAPI document."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from service.openapi import build_openapi
from service.responses import JSON_TYPE, json_response
from service.state import SERVICE, Service
from workers.memory import MemoryUse
from workers.stats import BUSY, IDLE, STATE_NAMES


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/workers", workers)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 once a worker is ready; else 503 with a `reason`: `starting` (the first workers are not ready
    yet), `worker-start-failed` (they cannot start: `detail` says why), `no-workers` or `draining`."""
    service = request.app[SERVICE]
    executor = service.executor
    alive = executor.alive if executor is not None else 0
    # An executor may add fields of its own (the Dask one: scheduler address, reachable, threads).
    extra = executor.readiness() if executor is not None else {}
    if service.draining or executor is None or executor.closing:
        return not_ready("draining", alive, extra)
    if alive + executor.replacing < 1:  # a worker being replaced still takes calls
        problem = executor.start_error
        if problem is not None:
            return not_ready("worker-start-failed", alive, {**extra, "detail": problem})
        return not_ready("no-workers" if executor.started else "starting", alive, extra)
    if service.serving is not None and not service.serving.listening:  # --http-processes: until all listen
        return not_ready("starting", alive, extra)
    return json_response({"status": "ready", "workers_alive": alive, **extra})


def not_ready(reason: str, alive: int, extra: dict[str, object]) -> web.Response:
    return json_response({"status": reason, "reason": reason, "workers_alive": alive, **extra}, status=503)


async def metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if service.executor is not None:
        await service.executor.sample_memory()  # the workers' memory, read off the loop
    body = service.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if service.openapi_doc is None:
        service.openapi_doc = build_openapi(service.catalog, keys_required=bool(service.config.api_keys))
    return web.Response(body=service.openapi_doc, content_type=JSON_TYPE)


async def workers(request: web.Request) -> web.Response:
    """The shared-memory worker table, as the workers last wrote it (or the Dask workers, as the
    scheduler last listed them, when the executor describes its workers itself). `size` is the workers
    now, `min` and `max` the bounds an elastic pool moves between (a fixed one: both `size`)."""
    service = request.app[SERVICE]
    executor = service.executor
    if executor is None:
        return json_response({"size": 0, "min": 0, "max": 0, "workers": []})
    sizes = {"size": executor.size, "min": executor.min_size, "max": executor.max_size}
    described = executor.describe_workers()
    if described is not None:
        return json_response({**sizes, "workers": described, **_serving(service)})
    await executor.sample_memory()
    memory = executor.memory()
    rows = executor.rows()
    listing = [
        {
            "slot": row.slot,
            "pid": row.pid or None,
            "state": STATE_NAMES[row.state] if row.state in (IDLE, BUSY) else "starting",
            "task": row.task,
            "tasks_done": row.tasks_done,
            "cpu_seconds": round(row.cpu_seconds, 6),
            "task_started_at": _rounded(row.task_started_at()),
            **_memory_fields(memory.get(row.pid)),
        }
        for row in rows
    ]
    body: dict[str, object] = {**sizes, "workers": listing, **_serving(service)}
    parent = executor.parent_pid
    if parent is not None:
        body["parent"] = {"pid": parent, **_memory_fields(memory.get(parent))}
    return json_response(body)


def _serving(service: Service) -> dict[str, object]:
    """With --http-processes N ≥ 2: the serving processes (their pids now, and how many were replaced)."""
    serving = service.serving
    if serving is None:
        return {}
    return {"http_processes": {"count": serving.count, "pids": serving.pids(), "restarts": serving.restarts}}


def _memory_fields(use: MemoryUse | None) -> dict[str, int | None]:
    """Resident, private (this process only) and proportional bytes; None where /proc cannot say."""
    if use is None:
        return {"rss_bytes": None, "private_bytes": None, "pss_bytes": None}
    return {"rss_bytes": use.rss, "private_bytes": use.private, "pss_bytes": use.pss}


def _rounded(when: float | None) -> float | None:
    return None if when is None else round(when, 3)
