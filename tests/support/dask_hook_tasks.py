"""Tasks with worker-state hooks on Dask, for tests/workers/test_dask_hooks.py (imported on the Dask
workers by name, like a user's module).

`model` (@preload) and `connect` (@on_worker_start) each append a line to the file named by an
environment variable, so a test counts from outside in which processes, and how often, each ran:

    HOOKS_PRELOAD_LOG   `model`:   "<pid>"
    HOOKS_START_LOG     `connect`: "<pid> <whether the preload had already run in this process>"

`HOOKS_FAIL` names a switch file: while it exists and holds "preload" or "on_worker_start", that
hook raises (read when the hook runs, so a test turns a failure on and off without new workers).
The variables reach the Dask workers through their environment: a LocalCluster's workers inherit
the test process's, and a runner child inherits its Dask worker's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from workers import on_worker_start, preload, task


def _append(variable: str, line: str) -> None:
    path = os.environ.get(variable)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _failing(hook: str) -> bool:
    switch = os.environ.get("HOOKS_FAIL")
    if not switch:
        return False
    try:
        return Path(switch).read_text().strip() == hook
    except OSError:
        return False


@preload
def model() -> dict[str, Any]:
    """The "model": who built it, and some weights."""
    _append("HOOKS_PRELOAD_LOG", str(os.getpid()))
    if _failing("preload"):
        raise ValueError("no model file at /models/missing.bin")
    return {"built_by": os.getpid(), "weights": [0.5, 0.25]}


@on_worker_start
def connect() -> None:
    _append("HOOKS_START_LOG", f"{os.getpid()} {int(model.built)}")
    if _failing("on_worker_start"):
        raise ConnectionError("the database at db:5432 refused the connection")


@task
def model_info(hold: float = 0.0) -> dict[str, Any]:
    """What the preload built, as this process sees it, and this process's pid (after `hold` s)."""
    time.sleep(hold)
    return {"model": model(), "pid": os.getpid()}


@task
def hang(pid_file: str, seconds: float = 60.0) -> None:
    """Write this process's pid to `pid_file`, then sleep."""
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
