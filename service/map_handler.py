"""`POST /v1/tasks/{name}/map`: one task over many items, results streamed as NDJSON lines.

Every item is validated first; a bad item becomes its own error line and the others run. Items go
to the pool in chunks (one worker call runs a whole chunk), sized from the measured time per item:
tiny items share a call so the per-call overhead vanishes, big items go one per call so the load
stays balanced. A chunk whose worker crashed or timed out is retried one item per call, so only the
culprit item fails. Lines are written as results arrive (`ordered`: as soon as the input-order
prefix is ready); a client that disconnects cancels its chunks still waiting for a worker.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web

from service.admission import admit_or_refuse
from service.body import body_kind, expect_continue, parse_object, read_body, refuse_unknown_fields
from service.problems import Problem, from_pool_error, invalid_argument
from service.state import SERVICE, Service
from service.validation import TaskEntry, call_timeout
from workers.errors import Overloaded, PoolError, TaskTimeout, WorkerCrashed

NDJSON = "application/x-ndjson"
_TARGET_CHUNK_SECONDS = 0.01  # aim for chunks of about this much work
_MAX_CHUNK = 512


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/tasks/{name}/map", map_task, expect_handler=expect_continue(app[SERVICE].config.max_body))


async def map_task(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    entry = service.catalog.get(request.match_info["name"])
    # Per item: the task's own timeout (@task(timeout=...)) or --task-timeout; ?timeout only shortens it.
    own = entry.spec.timeout
    timeout = call_timeout(request.query.get("timeout"), service.config.task_timeout, own=own, text=True)
    body_kind(request, binary_ok=False)
    admit_or_refuse(service)
    payload = parse_object(await read_body(request, service.config.max_body))
    refuse_unknown_fields(payload, ("items", "ordered"), "a map request")
    items = payload.get("items")
    if not isinstance(items, list):
        raise invalid_argument("items", "required, an array of argument objects", "required array")
    if len(items) > service.config.max_map_items:
        raise Problem(413, "payload-too-large",
                      f"{len(items)} items; one map request takes at most {service.config.max_map_items}")
    ordered = payload.get("ordered", True)
    if not isinstance(ordered, bool):
        raise invalid_argument("ordered", "must be true or false", "must be a boolean")

    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
    await response.prepare(request)
    writer = _LineWriter(response, len(items), ordered)
    work: list[tuple[int, dict[str, Any]]] = []
    for index, item in enumerate(items):
        try:
            work.append((index, service.catalog.validate_json(entry, item, f"items.{index}")))
        except Problem as problem:
            await writer.put(index, _error_line(index, problem))
    await _run_chunks(service, entry, work, timeout, writer)
    await response.write_eof()
    return response


class _LineWriter:
    """Writes `{"index", ...}` lines, in completion order or as the input-order prefix completes."""

    def __init__(self, response: web.StreamResponse, total: int, ordered: bool) -> None:
        self._response = response
        self._ordered = ordered
        self._pending: dict[int, bytes] = {}
        self._next = 0
        self._total = total

    async def put(self, index: int, line: bytes) -> None:
        if not self._ordered:
            await self._response.write(line)
            return
        self._pending[index] = line
        if index != self._next:
            return
        out = []
        while self._next in self._pending:
            out.append(self._pending.pop(self._next))
            self._next += 1
        await self._response.write(b"".join(out))


def _chunks(work: list[tuple[int, dict[str, Any]]], size_of: Any) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    pos = 0
    while pos < len(work):
        size = size_of()
        yield work[pos : pos + size]
        pos += size


async def _run_chunks(
    service: Service, entry: TaskEntry, work: list[tuple[int, dict[str, Any]]], timeout: float | None,
    writer: _LineWriter,
) -> None:
    executor = service.executor
    assert executor is not None
    per_item = [0.0, 0]  # seconds, items measured
    lanes = max(1, min(executor.max_size, executor.max_pending))  # an elastic pool grows for the chunks waiting
    gate = service.gates.get(entry.name)
    if gate is not None:  # @task(concurrency=N): each chunk in flight holds a slot; no more chunks than slots
        lanes = min(lanes, gate.limit)
    item_timeout = timeout if timeout is not None else service.config.task_timeout

    def chunk_size() -> int:
        if per_item[1] < lanes:  # probe with single items until every lane has reported once
            return 1
        average = per_item[0] / per_item[1]
        remaining_share = max(1, (len(work) // (lanes * 4)) or 1)
        return int(max(1, min(_MAX_CHUNK, _TARGET_CHUNK_SECONDS / max(average, 1e-7), remaining_share)))

    async def run(chunk: list[tuple[int, dict[str, Any]]]) -> None:
        started = time.perf_counter()
        try:
            results = await service.gates.run(entry.name, lambda: executor.call_chunk(
                entry.name, [kwargs for _, kwargs in chunk], timeout=item_timeout * len(chunk)
            ))
        except (WorkerCrashed, TaskTimeout) as exc:
            if len(chunk) == 1:
                await writer.put(chunk[0][0], _error_line(chunk[0][0], from_pool_error(exc)))
                service.metrics.observe(entry.name, from_pool_error(exc).slug)
                return
            for single in chunk:  # find the culprit: one item per call
                await run([single])
            return
        except Overloaded as exc:  # the pool is full: wait for one of this map's own chunks, retry
            others = {t for t in running if t is not asyncio.current_task()}
            if others:
                await asyncio.wait(others, return_when=asyncio.FIRST_COMPLETED)
                await run(chunk)
                return
            problem = from_pool_error(exc)
            for index, _ in chunk:
                await writer.put(index, _error_line(index, problem))
            return
        except PoolError as exc:
            problem = from_pool_error(exc, debug=service.config.debug)
            for index, _ in chunk:
                await writer.put(index, _error_line(index, problem))
            return
        elapsed = time.perf_counter() - started
        per_item[0] += elapsed
        per_item[1] += len(chunk)
        for (index, _), result in zip(chunk, results, strict=True):
            if isinstance(result, PoolError):
                problem = from_pool_error(result, debug=service.config.debug)
                service.metrics.observe(entry.name, problem.slug)
                await writer.put(index, _error_line(index, problem))
            else:
                service.metrics.observe(entry.name, "ok", result.elapsed)
                await writer.put(index, _result_line(index, result))

    running: set[asyncio.Task[None]] = set()
    try:
        for chunk in _chunks(work, chunk_size):
            while len(running) >= lanes:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            running.add(asyncio.ensure_future(run(chunk)))
        while running:
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
    finally:  # the client went away (or writing failed): drop what has not started
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)


def _result_line(index: int, outcome: Any) -> bytes:
    if outcome.json:
        return b'{"index":%d,"result":%s}\n' % (index, outcome.value)
    encoded = base64.b64encode(outcome.value)
    return b'{"index":%d,"result":"%s","encoding":"base64"}\n' % (index, encoded)


def _error_line(index: int, problem: Problem) -> bytes:
    return orjson.dumps({"index": index, "error": problem.body()}) + b"\n"
