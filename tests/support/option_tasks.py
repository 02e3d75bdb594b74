"""Tasks with `@task` options, for tests/e2e/test_task_options.py and tests/service/test_task_options.py.

`serial` (concurrency=1) records each start in a log file named by the caller (a line: its tag), holds
until a release file exists, then works for `work_ms` (so two calls run side by side would overlap
measurably) and returns its start and end on the system-wide monotonic clock (CLOCK_MONOTONIC: the
same clock in every process of the machine), so a test sees from outside whether calls overlapped.
`free` has no options: the task that must keep running while `serial`'s calls wait.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from workers import task

RELEASE_WAIT = 60.0  # a held call gives up after this long (a test that failed to release it)


@task(concurrency=1)
def serial(tag: str, log: str, release: str = "", work_ms: float = 50.0) -> dict:
    """One call at a time across the pool."""
    start = time.monotonic()
    with open(log, "a") as f:
        f.write(f"{tag}\n")
    if release:
        deadline = start + RELEASE_WAIT
        while not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.005)
    until = time.monotonic() + work_ms / 1000
    while time.monotonic() < until:
        pass
    return {"tag": tag, "start": start, "end": time.monotonic(), "pid": os.getpid()}


@task
def free(n: int = 1) -> int:
    """No options: never waits for another task's limit."""
    return n


@task(timeout=4)
def capped(seconds: float) -> float:
    """Its own timeout (4 s) replaces --task-timeout; a call may only shorten it."""
    time.sleep(seconds)
    return seconds


@task(timeout=5)
def patient(seconds: float) -> float:
    """Its own timeout (5 s) is longer than the --task-timeout its tests run with: it holds."""
    time.sleep(seconds)
    return seconds


@task
def plain_sleep(seconds: float) -> float:
    """No own timeout: --task-timeout applies, as for any task."""
    time.sleep(seconds)
    return seconds


@task(retries=2)
def retried(n: int = 1) -> int:
    """`retries` is accepted (the jobs issue acts on it); a call works as without it."""
    return n
