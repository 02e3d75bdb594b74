"""HTTP handlers for tasks: list them, and call one synchronously.

They only translate: HTTP in (content type, body, query) -> a validated call on the executor ->
HTTP out (JSON envelope, raw bytes, or a problem). No process or pipe is touched here. A large
binary body is read into a buffer the executor lends (`payload_buffer`: a shared-memory segment with
the local pool) and passed on as the argument; a large bytes result may come back as such a buffer
(`shared_result`), which is streamed to the client from where the worker wrote it. Who made the
buffer, and how a worker sees it, is the executor's business.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from service.admission import admit_or_refuse
from service.body import body_kind, expect_continue, parse_object, read_body, read_payload
from service.problems import Problem, from_pool_error, invalid_argument
from service.responses import JSON_TYPE, bytes_response, json_response
from service.state import SERVICE, Service
from service.stream_handler import stream_call
from service.validation import TaskEntry, call_timeout
from workers.errors import PoolError
from workers.executor import CallOptions

# A synchronous call: the result comes JSON-encoded by the worker, a large bytes result in a buffer.
SYNC_CALL = CallOptions(encode_json=True, shared_result=True)


def setup(app: web.Application) -> None:
    service = app[SERVICE]
    expect = expect_continue(service.config.max_body)
    app.router.add_get("/v1/tasks", list_tasks)
    app.router.add_get("/v1/tasks/{name}", get_task)
    add_call_routes(app, expect)
    app.router.add_post("/v1/tasks/{name}", task_caller(None), expect_handler=expect)


def add_call_routes(
    app: web.Application, expect: Callable[[web.Request], Awaitable[web.StreamResponse | None]], *, streams: bool = True
) -> None:
    """POST /v1/tasks/<name> for each task (without generator tasks when `streams` is False: a
    serving process passes those on to the core, service/front.py)."""
    service = app[SERVICE]
    # One plain route per task: aiohttp finds a plain path with one dict lookup, where the {name}
    # pattern costs a failed match against /v1/tasks, a regex match and a match-info dict on every
    # call (~3.5 µs of loop CPU per call, measured with wrk: docs/architecture.md, "Performance notes").
    # The pattern stays, for names no task has (404) and names that are not plain ASCII.
    for entry in service.catalog:
        if entry.name.isascii() and (streams or not entry.spec.streams):
            app.router.add_post(f"/v1/tasks/{entry.name}", task_caller(entry), expect_handler=expect)


async def list_tasks(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    tasks = [describe(e) for e in service.catalog]
    return json_response({"tasks": tasks})


async def get_task(request: web.Request) -> web.Response:
    """GET /v1/tasks/{name}: the task's entry, as in the list (404 unknown-task)."""
    return json_response(describe(request.app[SERVICE].catalog.get(request.match_info["name"])))


def describe(entry: TaskEntry) -> dict[str, Any]:
    """A task as GET /v1/tasks lists it."""
    return {"name": entry.name, "doc": entry.spec.doc, "params": entry.schema}


def task_caller(task: TaskEntry | None) -> Handler:
    """The handler of POST /v1/tasks/{name}: for `task`, or for the task the path names (None)."""

    # The envelope's head, `{"task":"<name>","result":`, encoded once per route instead of per call.
    head = None if task is None else envelope_head(task.name)

    async def call_task(request: web.Request) -> web.StreamResponse:
        service = request.app[SERVICE]
        entry = task or service.catalog.get(request.match_info["name"])
        try:
            return await _call_task(request, service, entry, head or envelope_head(entry.name))
        except Problem as problem:  # every refused or failed call of a known task is counted
            service.metrics.observe(entry.name, problem.slug)
            raise

    return call_task


def envelope_head(name: str) -> bytes:
    """The start of a call's JSON envelope, up to its result."""
    return b'{"task":' + orjson.dumps(name) + b',"result":'


async def _call_task(request: web.Request, service: Service, entry: TaskEntry, head: bytes) -> web.StreamResponse:
    has_query = bool(request.query_string)  # most calls have none: no query parsing for them
    own = entry.spec.timeout  # @task(timeout=...): replaces --task-timeout; ?timeout only shortens it
    timeout = call_timeout(request.query.get("timeout"), service.config.task_timeout, own=own, text=True) \
        if has_query else own
    kind = body_kind(request, binary_ok=entry.spec.bytes_param is not None, bare_ok=True)
    admit_or_refuse(service)  # before reading the body: a refused call costs no buffering
    if kind != "binary":
        extra = sorted(set(request.query) - {"timeout"}) if has_query else None
        if extra:
            raise invalid_argument(extra[0], "with a JSON body, arguments go in the body, not the query string",
                                   "given in the query string", more=extra[1:])
        if kind == "bare":  # no body, no Content-Type: a call without arguments
            kwargs = service.catalog.validate_bare(entry)
        else:
            body = buffered_body(request, service.config.max_body)
            if body is None:
                body = await read_body(request, service.config.max_body)
            kwargs = service.catalog.validate_json(entry, parse_object(body))
        if entry.spec.streams:  # a generator: its items as NDJSON, as they come
            return await stream_call(request, service, entry, kwargs, timeout)
        outcome = await run_task(service, entry.name, kwargs, timeout)
    else:
        query = {k: v for k, v in request.query.items() if k != "timeout"}
        kwargs = service.catalog.validate_binary(entry, query, b"")  # refuse bad arguments before the body
        executor = service.executor
        assert executor is not None  # admit_or_refuse() refused the call otherwise
        # The local pool lends shared memory for large bodies; an executor without it lends nothing.
        payload = await read_payload(
            request, service.config.max_body, executor.payload_buffer, executor.shm_threshold
        )
        try:
            kwargs[entry.spec.bytes_param or ""] = payload
            if entry.spec.streams:
                return await stream_call(request, service, entry, kwargs, timeout)
            outcome = await run_task(service, entry.name, kwargs, timeout)
        finally:
            if not isinstance(payload, bytes):
                payload.release()  # the call holds its own reference while its worker reads it
    if outcome.json:
        envelope = b"".join((
            head, outcome.value,
            b',"worker":', str(outcome.pid).encode(), b',"elapsed_ms":',
            orjson.dumps(round(outcome.elapsed * 1000, 3)), b"}",
        ))
        return web.Response(body=envelope, content_type=JSON_TYPE)
    headers = {"X-Procbridge-Worker": str(outcome.pid), "X-Procbridge-Elapsed-Ms": f"{outcome.elapsed * 1000:.3f}"}
    return await bytes_response(request, outcome.value, headers)


def buffered_body(request: web.Request, limit: int) -> bytes | None:
    """The whole body when it has already arrived in full (a small body usually comes with its
    headers) and its declared size is within `limit`: taken without a reader, a timer or a copy
    per chunk. None otherwise: read it with `read_body`, which applies the deadlines and limits."""
    declared = request.content_length
    if declared is None or declared > limit:
        return None
    content = request.content
    if not content.is_eof() or content.exception() is not None:
        return None
    body = content.read_nowait(-1)
    if len(body) != declared:  # cannot happen: the parser ends the body at its declared length
        raise Problem(400, "bad-request", "the body does not match its Content-Length",
                      headers={"Connection": "close"})
    return body


async def run_task(service: Service, name: str, kwargs: dict[str, Any], timeout: float | None) -> Any:
    """Call the executor; count a success (the caller counts problems); pool errors become problems.

    With an executor that lends payload buffers, a large bytes result comes back in one (released by
    whoever sends it): the caller must handle a PayloadBuffer as well as bytes."""
    executor = service.executor
    assert executor is not None
    try:
        options = SYNC_CALL if timeout is None else SYNC_CALL._replace(timeout=timeout)
        if name in service.gates:  # @task(concurrency=N): wait for a slot first (service/concurrency.py)
            outcome = await service.gates.run(name, lambda: executor.call(name, kwargs, options))
        else:
            outcome = await executor.call(name, kwargs, options)
    except PoolError as exc:
        raise from_pool_error(exc, debug=service.config.debug) from None
    service.metrics.observe(name, "ok", outcome.elapsed)
    return outcome
