"""The task module of scripts/worker_state_bench.py (served as `--tasks bench.apps.worker_state`):
a `@preload` standing for a model load, an `@on_worker_start` that records each worker, and a task
that reads the whole "model".

Set from the environment, so the benchmark starts the real server with nothing else to configure:

- `BENCH_STATE_MIB` (default 8): the size of the array the preload builds, in MiB (0: an empty one);
- `BENCH_STATE_PRELOAD_SECONDS` (default 0): how long the preload sleeps first (reading weights);
- `BENCH_STATE_PRELOAD_LOG`, `BENCH_STATE_WORKER_LOG`: files each hook appends a line to,
  `PID START END` for the preload and `PID TIME` for each worker, times from `time.monotonic()`
  (CLOCK_MONOTONIC: the same clock in every process of the machine, so the benchmark compares them
  with its own).
"""

from __future__ import annotations

import os
import time

import numpy as np

from workers import on_worker_start, preload, task

MIB = 1024 * 1024


def _append(variable: str, *fields: object) -> None:
    path = os.environ.get(variable)
    if path:
        with open(path, "a") as f:
            f.write(" ".join(str(x) for x in (os.getpid(), *fields)) + "\n")


@preload
def model() -> np.ndarray:
    """The "model": sleep BENCH_STATE_PRELOAD_SECONDS, then BENCH_STATE_MIB MiB of float64 ones (every
    page written, as loading weights does). Runs once, in the worker parent."""
    start = time.monotonic()
    time.sleep(float(os.environ.get("BENCH_STATE_PRELOAD_SECONDS", "0")))
    array = np.ones(int(float(os.environ.get("BENCH_STATE_MIB", "8")) * MIB) // 8)
    _append("BENCH_STATE_PRELOAD_LOG", f"{start:.6f}", f"{time.monotonic():.6f}")
    return array


@on_worker_start
def record_worker() -> None:
    """Once in each worker, the replacements included: its pid and when it ran."""
    _append("BENCH_STATE_WORKER_LOG", f"{time.monotonic():.6f}")


@task
def model_sum(hold: float = 0.0) -> dict[str, float | int]:
    """Read every page of the preloaded array (without writing to it), then wait `hold` seconds (so
    that calls sent together land on different workers); the sum, its length and the worker's pid."""
    data = model()
    total = float(data.sum())
    if hold > 0:
        time.sleep(hold)
    return {"sum": total, "items": int(data.size), "pid": os.getpid()}
