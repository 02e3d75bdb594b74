"""`@task(batch=...)` tasks for the batching tests (tests/e2e/test_batching.py), served with
`--tasks tests.support.batch_tasks`.

Every invocation appends one JSON line `{"task", "pid", "values"}` to the file named by $BATCH_LOG,
so a test sees which calls shared an invocation. A value at or above GATE holds its invocation until
the file `$BATCH_GATES/<value - GATE>` exists: a test occupies the worker with a gated batch while it
gathers the next ones, then opens the gate (the wait is the worker's, inside the task; the test waits
on what the service reports, never on time). CRASH in a batch makes its worker exit mid-invocation.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from workers import Batch, task

GATE = 1_000_000
CRASH = -1


def _record(name: str, values: list[int]) -> None:
    line = json.dumps({"task": name, "pid": os.getpid(), "values": values}) + "\n"
    with open(os.environ["BATCH_LOG"], "a") as log:  # O_APPEND: one write per line, whole
        log.write(line)
    gates = [v - GATE for v in values if v >= GATE]
    if gates:
        gate = Path(os.environ["BATCH_GATES"]) / str(gates[0])
        deadline = time.monotonic() + 60
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.005)


@task(batch=Batch(max_size=8, max_wait_ms=3000))
def double(x: list[int]) -> list[int]:
    """Each call's x, doubled; CRASH anywhere in the batch kills the worker."""
    _record("double", x)
    if CRASH in x:
        os._exit(3)
    return [2 * v for v in x]


@task(batch=Batch(max_size=3, max_wait_ms=3000))
def sleepy(x: list[int], ms: list[float]) -> list[int]:
    """Sleeps as long as the longest `ms` of the batch, then echoes each call's x."""
    _record("sleepy", x)
    time.sleep(max(ms) / 1000.0)
    return x


@task(batch=Batch(max_size=3, max_wait_ms=3000))
def short_by_one(x: list[int]) -> list[int]:
    """Wrong: returns one result fewer than it was given calls."""
    _record("short_by_one", x)
    return x[:-1]


@task(batch=Batch(max_size=4, max_wait_ms=2))
def scaled(x: list[float], factor: list[float] = 2.0) -> list[float]:
    """x × factor per call (factor's default, 2.0, is one call's: a call may leave it out)."""
    return [a * b for a, b in zip(x, factor, strict=True)]
