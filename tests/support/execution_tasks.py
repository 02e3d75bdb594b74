"""Tasks for tests/workers/test_execution.py: one per kind of outcome a call can have. Imported by
name in the test process, the pool's workers and the Dask runner child alike; named ex_* because
the registry is process-wide and other test modules register in the same process."""

from __future__ import annotations

import threading
from typing import Any

from workers import progress, task


@task
def ex_document(n: int) -> dict[str, Any]:
    """A JSON-able result."""
    return {"n": n, "squares": [i * i for i in range(n)]}


@task
def ex_blob(size: int) -> bytes:
    """A bytes result: it must stay bytes, never JSON."""
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


@task
def ex_view_info(data: memoryview) -> dict[str, Any]:
    """A parameter annotated `memoryview` gets a read-only view of the bytes."""
    return {"type": type(data).__name__, "readonly": data.readonly, "nbytes": data.nbytes}


@task
def ex_fail(message: str) -> None:
    raise ValueError(message)


@task
def ex_leave(code: int) -> None:
    raise SystemExit(code)


@task
def ex_unencodable() -> Any:
    return {1, 2, 3}  # a set: not JSON, but it pickles


@task
def ex_maybe(n: int) -> int:
    """A map item that fails on its own when n < 0."""
    if n < 0:
        raise ValueError(f"negative: {n}")
    return n * 10


@task
def ex_count(steps: int) -> int:
    """Report progress at every step, as fast as it can: the throttle decides what goes."""
    for i in range(1, steps + 1):
        progress(i, steps, f"{i}/{steps}")
    return steps


GATE: threading.Barrier | None = None  # set by the test that runs side_by_side in two threads at once


@task
def ex_side_by_side(label: str) -> str:
    """Report, wait until the other call has reported too, report completion."""
    progress(1, 2, label)
    assert GATE is not None
    GATE.wait()
    progress(2, 2, label)
    return label
