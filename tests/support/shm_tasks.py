"""Tasks for the shared-memory payload tests (`--tasks tests.support.shm_tasks` for the server).

A parameter annotated `memoryview` gets a read-only view of the segment the service filled (zero
copy); one annotated `bytes` gets bytes. Every fault here is real (a SIGKILL from the test, a task
that never ends, an exception) and happens while the worker holds a view of a segment.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from workers import task


@task
def echo_bytes(data: memoryview) -> bytes:
    """Return the body as it came: the view of the request segment goes into a result segment."""
    return data  # type: ignore[return-value]  # a memoryview is a bytes result too


@task
def echo_copy(data: bytes) -> bytes:
    """The same, for a task that asks for bytes."""
    return data


@task
def describe(data: memoryview) -> dict[str, Any]:
    """What the task was given: its type, whether it is read-only, its size and SHA-256."""
    return {
        "type": type(data).__name__,
        "readonly": data.readonly,
        "size": data.nbytes,
        "sha256": hashlib.sha256(data).hexdigest(),
        "pid": os.getpid(),
    }


@task
def describe_bytes(data: bytes) -> dict[str, Any]:
    return {"type": type(data).__name__, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@task
def hold(data: memoryview, marker: str, limit_s: float = 30.0) -> int:
    """Hold the view: write the pid to `marker`, then wait (bounded) to be killed or timed out."""
    first = data[0] if len(data) else 0
    _announce_and_wait(marker, limit_s)
    return first


@task
def fail_holding(data: memoryview, message: str = "bad payload") -> None:
    """Raise while holding the view."""
    raise ValueError(f"{message} ({data.nbytes} bytes)")


@task
def make_bytes(size: int, fill: int = 7) -> bytes:
    """A bytes result of `size` bytes: large ones go back through a result segment."""
    return bytes([fill]) * size


@task
def make_then_hang(size: int, marker: str, limit_s: float = 30.0) -> bytes:
    """Build a large result, say so, then hang (a timeout kills it while it holds no segment yet)."""
    out = bytes(size)
    _announce_and_wait(marker, limit_s)
    return out


@task
def gated_bytes(size: int, marker: str, gate: str, limit_s: float = 30.0) -> bytes:
    """Write the pid to `marker`, wait (bounded) for the file `gate`, then return `size` bytes."""
    _announce_and_wait(marker, limit_s, gate)
    return bytes([9]) * size


def _announce_and_wait(marker: str, limit_s: float, gate: str = "") -> None:
    """Write this worker's pid to `marker`, then wait until the file `gate` exists (without one:
    until the test kills or times out the worker), at most `limit_s` seconds."""
    Path(marker).write_text(str(os.getpid()))
    deadline = time.monotonic() + limit_s
    while not (gate and os.path.exists(gate)) and time.monotonic() < deadline:
        time.sleep(0.002)
