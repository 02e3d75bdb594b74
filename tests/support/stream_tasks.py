"""Tasks for the streaming and `async def` tests (tests/workers/test_streams.py, tests/e2e/test_streams.py):
imported by name in the test process and the workers alike; named st_* because the registry is
process-wide. Gates are files: a task waits (bounded) for a file the test writes, and reports what
it did by writing files the test reads, so nothing synchronises by sleeping."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from workers import task


def _wait_for_file(path: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the test never wrote {path}")
        time.sleep(0.002)


@task
async def st_async_add(a: int, b: int) -> dict[str, int]:
    """An `async def` task: awaits on the worker's loop, returns the sum, the pid and the loop's id."""
    await asyncio.sleep(0)
    return {"sum": a + b, "pid": os.getpid(), "loop": id(asyncio.get_running_loop())}


@task
async def st_async_fail(message: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


@task
def st_count(n: int, gate: str = "", fail_at: int = -1, before: str = "") -> Iterator[int]:
    """Yield 0..n-1; before the first item wait for the file `before`, after it for the file `gate`
    (each if given); raise at item `fail_at`."""
    if before:
        _wait_for_file(before)
    for i in range(n):
        if i == fail_at:
            raise RuntimeError(f"failed at item {i}")
        yield i
        if i == 0 and gate:
            _wait_for_file(gate)


@task
async def st_async_count(n: int, gate: str = "") -> AsyncIterator[dict[str, int]]:
    """An async generator: yield {"i": i} for 0..n-1, awaiting between items; after the first, wait for `gate`."""
    for i in range(n):
        await asyncio.sleep(0)
        yield {"i": i}
        if i == 0 and gate:
            _wait_for_file(gate)


@task
def st_endless(closed: str, produced: str = "", size: int = 0, gate: str = "") -> Iterator[str]:
    """Yield forever (items of `size` characters); record in `produced` how many items it has reached
    (rewritten before each yield); after the first item wait for the file `gate` (if given); its
    `finally` writes that count and the pid to `closed`."""
    n = 0
    try:
        while True:
            if n == 1 and gate:
                _wait_for_file(gate)
            n += 1
            if produced:
                Path(produced + ".tmp").write_text(str(n))
                os.replace(produced + ".tmp", produced)
            yield "x" * size if size else str(n)
    finally:
        Path(closed).write_text(f"{n} {os.getpid()}")


@task
def st_unencodable() -> Iterator[object]:
    yield 1
    yield {1, 2}  # a set: not JSON


@task
def st_crash_after_first(gate: str) -> Iterator[int]:
    """Yield one item, wait for `gate`, then die mid-stream."""
    yield 1
    _wait_for_file(gate)
    os._exit(9)


@task(concurrency=1)
def st_serial(n: int, gate: str = "") -> Iterator[int]:
    """A generator with concurrency=1: yields 0..n-1, waiting for `gate` after the first item."""
    for i in range(n):
        yield i
        if i == 0 and gate:
            _wait_for_file(gate)
