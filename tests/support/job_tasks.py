"""Tasks for the job tests that run real servers (tests/e2e/test_jobs_further.py): named jt_* because
the registry is process-wide. Gates are files: a task waits (bounded) for a file the test writes, and
reports what it did in files the test reads, so nothing synchronises by sleeping.

Every attempt of jt_flaky, jt_flaky_retries2 and jt_items appends one line, its time.time(), to
`<folder>/attempts`: the file counts the attempts the task really made and when each began.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers import task

GATE_WAIT = 30.0  # a gated task gives up after this long (a test that never opened the gate)


def _wait_for_file(path: Path, limit_s: float = GATE_WAIT) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the test never wrote {path}")
        time.sleep(0.002)


def _record_attempt(folder: str) -> int:
    """Append this attempt's start time to `<folder>/attempts`; return its number (1, 2, …)."""
    path = Path(folder) / "attempts"
    with open(path, "a") as f:
        f.write(f"{time.time()!r}\n")
    return len(path.read_text().splitlines())


def _flaky(folder: str, fail_first: int, how: str, gate: str) -> dict[str, Any]:
    attempt = _record_attempt(folder)
    if gate and attempt == 1:
        _wait_for_file(Path(gate))
    if attempt <= fail_first:
        if how == "crash":
            os._exit(3)
        if how == "hang":  # past any short timeout: only the timeout's kill ends it
            _wait_for_file(Path(folder) / "never", GATE_WAIT)
        raise ValueError(f"attempt {attempt} failed")
    return {"attempt": attempt, "pid": os.getpid()}


@task
def jt_flaky(folder: str, fail_first: int = 0, how: str = "raise", gate: str = "") -> dict[str, Any]:
    """Attempts 1..fail_first fail (`how`: "raise" a ValueError naming the attempt, "crash" the worker
    with os._exit, "hang" until a timeout kills it); the next one returns its number. With `gate`, the
    first attempt waits for that file before anything else."""
    return _flaky(folder, fail_first, how, gate)


@task(retries=2)
def jt_flaky_retries2(folder: str, fail_first: int = 0) -> dict[str, Any]:
    """jt_flaky ("raise") with `@task(retries=2)`."""
    return _flaky(folder, fail_first, "raise", "")


@task
def jt_log(path: str, label: str) -> str:
    """Append `label` as one line to `path`: the file is the order in which jobs ran."""
    with open(path, "a") as f:
        f.write(f"{label}\n")
    return label


@task
def jt_items(folder: str, n: int, pauses: list[int]) -> Iterator[int]:
    """Yield 0..n-1; before item i in `pauses`, write `<folder>/waiting-<i>` (every item before it has
    been yielded) and wait for the file `<folder>/go-<i>`."""
    _record_attempt(folder)
    for i in range(n):
        if i in pauses:
            (Path(folder) / f"waiting-{i}").write_text(str(os.getpid()))
            _wait_for_file(Path(folder) / f"go-{i}")
        yield i
