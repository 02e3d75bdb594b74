"""Running a generator task as a stream: the worker's half (the service's is workers/local/streams.py).

A task that is a generator (sync, or `async def` with `yield`: `registry.TaskSpec.streams`) called
with CALL_STREAM does not return one value: each value it yields is JSON-encoded here and handed to
`send(call_id, item)` at once, then the call ends with RESULT_JSON, the number of items, or
RESULT_ERROR when the generator raised (the items before it were sent) or yielded a value that is
not JSON. `send` is the transport's (workers/worker.py `_Link.stream_item`): it returns False when
the consumer has gone away, and the generator is then closed (`gen.close()`: its `finally` runs)
and the call ends as usual: the worker lives on and takes its next call.

Flow control is `send`'s too, and it is what bounds a stream's memory everywhere: the worker may
have at most WINDOW items sent and not yet taken by the consumer; `send` blocks (reading the
service's STREAM_ACK frames) before the generator is asked for one more. So a generator whose
reader does not read is suspended at a `yield`, WINDOW items ahead of it, and the service holds at
most those WINDOW items for it.

An async generator runs on this thread's event loop (workers/aio.py), item by item.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import orjson

from workers import aio, arguments, registry
from workers.execution import _JSON_OPTIONS, Execution, Progress, describe_exception, release
from workers.protocol import RESULT_ERROR, RESULT_JSON

WINDOW = 16  # items a worker may have sent and not yet seen taken (STREAM_ACK) before it waits

Send = Callable[[int, bytes], bool]

_GENERATORS: dict[str, tuple[Callable[..., Any], str | None]] = {}


def run_stream(
    execution: Execution,
    name: str,
    payload: dict[str, Any],
    shared: bool,
    call_id: int,
    progress: Progress | None,
    send: Send,
) -> tuple[int, Any]:
    """Run generator task `name` with `payload`, handing each item to `send`: (RESULT_JSON, b"N")
    after N items, or (RESULT_ERROR, ...) as `Execution.run` tells a failure; never raises."""
    if progress is not None:
        execution._set_sink(progress)
    views: list[memoryview] = []
    count = 0
    try:
        fn, view_param = _GENERATORS.get(name) or _lookup(name)
        if shared or view_param is not None:
            payload = execution.arguments(payload, view_param, views)
        gen = fn(**payload)
        is_async = inspect.isasyncgen(gen)
        try:
            while True:
                try:
                    value = aio.next_item(gen) if is_async else next(gen)
                except (StopIteration, StopAsyncIteration):
                    break
                try:
                    item = orjson.dumps(value, option=_JSON_OPTIONS)
                except orjson.JSONEncodeError as exc:
                    return RESULT_ERROR, ("TypeError", f"item {count} of the stream is not JSON-serialisable: {exc}",
                                          "")
                count += 1
                if not send(call_id, item):
                    break  # the consumer is gone: close it (below), as a `for` loop's break would
        finally:
            if is_async:
                aio.close(gen)
            else:
                gen.close()
        return RESULT_JSON, str(count).encode()
    except BaseException as exc:  # noqa: BLE001 - as Execution.run: every outcome is a row
        return RESULT_ERROR, describe_exception(exc)
    finally:
        if progress is not None:
            execution._set_sink(None)
        if views:
            release(views)


def _lookup(name: str) -> tuple[Callable[..., Any], str | None]:
    spec = registry.get(name)
    if spec is None:
        raise LookupError(f"task {name!r} is not registered in this worker")
    if not spec.streams:
        raise TypeError(f"task {name!r} is not a generator: it returns one value, it does not stream")
    found = _GENERATORS[name] = (arguments.bound(spec), spec.view_param)  # rich arguments rebuilt
    return found
