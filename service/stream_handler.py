"""A synchronous call of a generator task: its items as NDJSON, each line written as it is yielded.

    200 application/x-ndjson
    {"item": <value>}\\n             one line per item, in the order yielded
    ...
    {"end": true, "items": N}\\n     the last line of a stream that ran to its end, or
    {"error": <problem+json>}\\n     the last line of one that failed after its first item: task-failed
                                     (the generator raised, or yielded a value that is not JSON),
                                     worker-crashed, task-timeout (the timeout covers the whole stream),
                                     draining

Until the first item the answer is not committed: a call refused (503 overloaded, draining, 501
streaming-unsupported) or failed before its first item (500, 502, 504) is an ordinary problem+json
answer with its status. From the first item on the status is 200, and the way it ended is the last
line, counted in `procbridge_tasks_total{task, outcome}` as a call's status would be ("ok", or the
problem's slug; "client-closed" for a client that hung up mid-stream).

Flow control: each line is written, and the transport drained past its high-water mark, before the
next item is asked for (`ItemStream.__anext__`), and the executor lets a worker run at most a window
of items ahead of what was asked for (workers/local/streams.py). So a client that reads slowly
slows the generator down, and one that stops reading stops it, at a bounded distance; nothing
piles up here. A client that hangs up cancels this handler (or fails its next write), and the
stream is closed: the worker closes the generator at its next `yield` and takes its next call.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any

import orjson
from aiohttp import web

from service.problems import Problem, from_pool_error
from service.state import Service
from service.validation import TaskEntry
from workers.errors import PoolError
from workers.executor import CallOptions

NDJSON_TYPE = "application/x-ndjson"
STREAM_CALL = CallOptions(encode_json=True)
# /openapi.json: the schema of one line, the 200 answer of a generator task (service/openapi.py)
LINE_SCHEMA: dict[str, Any] = {"oneOf": [
    {"type": "object", "required": ["item"], "properties": {"item": {}}},
    {"type": "object", "required": ["end", "items"],
     "properties": {"end": {"const": True}, "items": {"type": "integer", "minimum": 0}}},
    {"type": "object", "required": ["error"], "properties": {"error": {"$ref": "#/components/schemas/Problem"}}},
]}


def stream_answer() -> dict[str, Any]:
    """/openapi.json: the 200 answer of a generator task (a fresh copy for each operation)."""
    return {
        "description": 'one JSON object per line, as the task yields: {"item": value} for each item, then '
                       '{"end": true, "items": N}, or {"error": problem} if it failed after its first item',
        "content": {NDJSON_TYPE: {"schema": copy.deepcopy(LINE_SCHEMA)}},
    }


async def stream_call(
    request: web.Request, service: Service, entry: TaskEntry, kwargs: dict[str, Any], timeout: float | None
) -> web.StreamResponse:
    """Run generator task `entry` and stream its items to the client (see the module's docstring).
    A task with `@task(concurrency=N)` holds one of its slots for the whole stream."""
    if entry.name not in service.gates:
        return await _stream(request, service, entry, kwargs, timeout)
    try:
        return await service.gates.run(entry.name, lambda: _stream(request, service, entry, kwargs, timeout))
    except PoolError as exc:  # Overloaded: too many calls wait already (what fails inside is a Problem)
        raise from_pool_error(exc, debug=service.config.debug) from None


async def _stream(
    request: web.Request, service: Service, entry: TaskEntry, kwargs: dict[str, Any], timeout: float | None
) -> web.StreamResponse:
    executor = service.executor
    assert executor is not None
    debug = service.config.debug
    options = STREAM_CALL if timeout is None else STREAM_CALL._replace(timeout=timeout)
    started = time.perf_counter()
    try:
        stream = executor.call_stream(entry.name, kwargs, options)
    except PoolError as exc:
        raise from_pool_error(exc, debug=debug) from None
    async with contextlib.aclosing(stream):
        try:
            item: bytes | None = await anext(stream)
        except StopAsyncIteration:
            item = None
        except PoolError as exc:
            raise from_pool_error(exc, debug=debug) from None
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if stream.pid is not None:
            headers["X-Procbridge-Worker"] = str(stream.pid)
        response = web.StreamResponse(headers=headers)
        response.content_type = NDJSON_TYPE
        await response.prepare(request)
        count = 0
        problem: Problem | None = None
        outcome = "client-closed"
        try:
            while item is not None:
                await response.write(b'{"item":' + item + b"}\n")
                count += 1
                try:
                    item = await anext(stream)
                except StopAsyncIteration:
                    item = None
                except PoolError as exc:
                    problem = from_pool_error(exc, debug=debug)
                    break
            if problem is None:
                last = orjson.dumps({"end": True, "items": count})
                outcome = "ok"
            else:
                last = orjson.dumps({"error": problem.body()})
                outcome = problem.slug
            await response.write(last + b"\n")
            await response.write_eof()
        finally:
            elapsed = stream.outcome.elapsed if stream.outcome is not None else time.perf_counter() - started
            service.metrics.observe(entry.name, outcome, elapsed if outcome == "ok" else None)
    return response
