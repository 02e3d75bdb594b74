"""Tasks with worker state, for tests/e2e/test_worker_state.py and tests/workers/test_worker_parent.py:
a `@preload` that builds a big numpy array (its size, a gate to wait for, a failure: from the
environment) and an `@on_worker_start` that records each worker's pid (or raises, or waits).

Every hook appends its pid to a file named by the environment, so a test counts where and how
often each ran from outside the processes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from workers import on_worker_start, preload, task


def _record(variable: str) -> None:
    path = os.environ.get(variable)
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")


def _wait_for_gate(variable: str) -> None:
    gate = os.environ.get(variable)
    if gate:
        deadline = time.monotonic() + 120.0
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.01)


@preload
def table() -> np.ndarray:
    """The "model": STATE_MIB MiB of float64 ones, every page written (as loading weights does)."""
    _record("STATE_PRELOAD_LOG")
    print(f"loading the table in {os.getpid()}")  # the worker parent's output is relayed too
    _wait_for_gate("STATE_PRELOAD_GATE")
    if os.environ.get("STATE_PRELOAD_FAIL"):
        raise ValueError("no model file at /models/missing.bin")
    mib = int(os.environ.get("STATE_MIB", "8"))
    return np.ones(mib * 1024 * 1024 // 8)


@on_worker_start
def record_worker() -> None:
    _record("STATE_WORKER_LOG")
    _wait_for_gate("STATE_WORKER_GATE")
    fail_while = os.environ.get("STATE_WORKER_FAIL_WHILE")  # a file: fails while it exists
    if os.environ.get("STATE_WORKER_FAIL") or (fail_while and Path(fail_while).exists()):
        raise ConnectionError("the database at db:5432 refused the connection")


@task
def table_sum() -> dict[str, float | int]:
    """Reads the whole preloaded array (every page of it) without writing to it."""
    data = table()
    return {"sum": float(data.sum()), "pid": os.getpid()}


@task
def chatter(lines: int = 3, width: int = 20, stream: str = "stdout") -> int:
    """Print `lines` lines of `width` characters (to stdout or stderr); returns how many."""
    out = sys.stdout if stream == "stdout" else sys.stderr
    line = "x" * width
    for i in range(lines):
        print(f"line {i} {line}", file=out)
    return lines
