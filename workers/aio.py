"""The event loop `async def` tasks run on, where they run: one per thread, kept for its life.

A local worker process runs calls one at a time on its main thread, so it has exactly one loop,
created at its first coroutine call and kept until the process exits. A Dask worker with
isolate=thread runs calls side by side in its worker threads, which Dask keeps for the worker's
life: each thread gets its own loop, kept the same way (an asyncio loop runs in one thread at a
time, so the threads cannot share one). A Dask runner child (isolate=process) is a local worker.

Why a kept loop and not `asyncio.run` per call: a task module may keep loop-bound objects between
calls (an `httpx.AsyncClient`, an `aiohttp.ClientSession`, an asyncpg pool opened by the first call
and reused), which `asyncio.run` would leave bound to a closed loop from the second call on; a
kept loop also saves creating and closing one per call (~100 µs). The loop is the stdlib's (task
code may rely on its behaviour), and it runs only while a task's code runs: tasks a call leaves
behind make progress during later calls, not in between.

A generator task that is `async def` (an async generator) is driven item by item on the same loop:
`next_item` runs one `__anext__`, `close` its `aclose()`.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any

_local = threading.local()


def runner() -> asyncio.Runner:
    """This thread's runner (its loop), created on first use."""
    found: asyncio.Runner | None = getattr(_local, "runner", None)
    if found is None:
        found = _local.runner = asyncio.Runner()
    return found


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to its end on this thread's loop; its value, or what it raised."""
    return runner().run(coro)


def on_loop(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """`async def fn` as a plain function: each call runs on this thread's loop."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return run(fn(*args, **kwargs))

    return call


async def _anext(agen: AsyncGenerator[Any, None]) -> Any:
    return await agen.__anext__()


def next_item(agen: AsyncGenerator[Any, None]) -> Any:
    """The async generator's next value (StopAsyncIteration at its end), run on this thread's loop."""
    return run(_anext(agen))


def close(agen: AsyncGenerator[Any, None]) -> None:
    """Close an async generator (its `finally` runs) on this thread's loop."""
    run(agen.aclose())


def plain(fn: Callable[..., Any], kind: str) -> Callable[..., Any]:
    """A task's function as one plain call that returns its whole result (`registry.TaskSpec.kind`):
    a coroutine function runs on this thread's loop; a generator (sync or async) is collected into
    the list of its items (how `call`, map and Dask run a streaming task: all items at once)."""
    if kind == "coroutine":
        return on_loop(fn)
    if kind == "generator":
        return functools.wraps(fn)(lambda *args, **kwargs: list(fn(*args, **kwargs)))
    if kind == "async_generator":

        async def collect(*args: Any, **kwargs: Any) -> list[Any]:
            return [item async for item in fn(*args, **kwargs)]

        return functools.wraps(fn)(on_loop(collect))
    return fn
