"""User tasks for the Dask executor tests, imported on the Dask workers (`modules=` / `--tasks`).

The Dask workers import this module by name, as they would a user's: the tests start them with the
repository on their path (LocalCluster workers inherit the test process's sys.path; `dask worker`
processes get PYTHONPATH). Tasks that must be seen to stop write their pid first.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from workers import progress, task


@task
def shout(text: str, times: int = 1) -> dict[str, Any]:
    """A user task with JSON in and out."""
    return {"text": (text.upper() + "!") * times, "pid": os.getpid()}


@task
def reverse_bytes(data: bytes) -> bytes:
    """Bytes in, bytes out."""
    return data[::-1]


@task
def view_length(data: memoryview) -> int:
    """A task that asks for a memoryview gets one on Dask too."""
    assert isinstance(data, memoryview)
    return data.nbytes


@task
def steps(n: int = 5) -> int:
    """Report progress n times (each a separate report: 60 ms apart, past the 50 ms rate limit)."""
    for i in range(1, n + 1):
        time.sleep(0.06)
        progress(i, n, f"step {i}")
    return n


@task
def spin(pid_file: str, seconds: float = 60.0) -> int:
    """Write this process's pid to `pid_file`, then keep a core busy for `seconds`."""
    Path(pid_file).write_text(str(os.getpid()))
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += sum(range(1000))
    return n


@task
def fail(message: str = "boom") -> None:
    raise ValueError(message)


@task
def die(code: int = 3) -> None:
    """The process running the task exits at once (no cleanup)."""
    os._exit(code)
