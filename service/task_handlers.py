"""HTTP handlers for tasks: list them, and call one synchronously.

They only translate: HTTP in (content type, body, query) -> a validated call on the executor ->
HTTP out (JSON envelope, raw bytes, or a problem). No process, pipe or segment is touched here.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp import web

from service.app import SERVICE, Service
from service.body import OCTET_STREAM, body_kind, parse_object, read_body
from service.problems import Problem, from_pool_error
from workers.errors import PoolError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JSON_TYPE = "application/json"


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/tasks", list_tasks)
    app.router.add_post("/v1/tasks/{name}", call_task)


async def list_tasks(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    tasks = [{"name": e.name, "doc": e.spec.doc, "params": e.schema} for e in service.catalog]
    return json_response({"tasks": tasks})


async def call_task(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    entry = service.catalog.get(request.match_info["name"])
    try:
        return await _call_task(request, service, entry.name)
    except Problem as problem:  # every refused or failed call of a known task is counted
        service.metrics.observe(entry.name, problem.slug)
        raise


async def _call_task(request: web.Request, service: Service, name: str) -> web.Response:
    entry = service.catalog.get(name)
    timeout = parse_timeout(request.query.get("timeout"))
    kind = body_kind(request)
    admit_or_refuse(service)  # before reading the body: a refused call costs no buffering
    body = await read_body(request, service.config.max_body)
    if kind == "json":
        extra = sorted(set(request.query) - {"timeout"})
        if extra:
            raise Problem(
                422, "invalid-arguments",
                f"{extra[0]}: with a JSON body, arguments go in the body, not the query string",
                errors=[{"field": f, "message": "given in the query string"} for f in extra],
            )
        kwargs = service.catalog.validate_json(entry, parse_object(body))
    else:
        query = {k: v for k, v in request.query.items() if k != "timeout"}
        kwargs = service.catalog.validate_binary(entry, query, body)
    outcome = await run_task(service, entry.name, kwargs, timeout)
    if outcome.json:
        envelope = b"".join((
            b'{"task":', orjson.dumps(entry.name), b',"result":', outcome.value,
            b',"worker":', str(outcome.pid).encode(), b',"elapsed_ms":',
            orjson.dumps(round(outcome.elapsed * 1000, 3)), b"}",
        ))
        return web.Response(body=envelope, content_type=JSON_TYPE)
    value = outcome.value
    ctype = "image/png" if value[:8] == PNG_SIGNATURE else OCTET_STREAM
    headers = {"X-Procbridge-Worker": str(outcome.pid), "X-Procbridge-Elapsed-Ms": f"{outcome.elapsed * 1000:.3f}"}
    return web.Response(body=value, content_type=ctype, headers=headers)


def admit_or_refuse(service: Service) -> None:
    """503 at once while draining or when the admission queue is already full."""
    executor = service.executor
    if service.draining or executor is None or executor.closing:
        raise Problem(503, "draining", "the service is shutting down and takes no new work",
                      headers={"Retry-After": "5"})
    if executor.pending >= executor.max_pending:
        raise Problem(503, "overloaded", f"{executor.pending} tasks are already waiting for a worker; retry later",
                      headers={"Retry-After": "1"})


async def run_task(service: Service, name: str, kwargs: dict[str, Any], timeout: float | None) -> Any:
    """Call the executor; count a success (the caller counts problems); pool errors become problems."""
    assert service.executor is not None
    try:
        outcome = await service.executor.call(name, kwargs, timeout=timeout, encode_json=True)
    except PoolError as exc:
        raise from_pool_error(exc, debug=service.config.debug) from None
    service.metrics.observe(name, "ok", outcome.elapsed)
    return outcome


def parse_timeout(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise Problem(422, "invalid-arguments", f"timeout: must be a number of seconds > 0, got {raw!r}",
                      errors=[{"field": "timeout", "message": "must be a number of seconds > 0"}])
    return value


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON_TYPE, headers=headers)
