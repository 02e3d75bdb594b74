"""Stopping and reaping worker processes: the pool's dealings with the operating system.

A worker leads its own process group, so a kill takes whatever its task started with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from multiprocessing.process import BaseProcess

log = logging.getLogger("procbridge.pool")


def exit_code_of(proc: BaseProcess) -> int | None:
    """The exit code of a process whose sentinel fired (a non-blocking poll), None if unknown."""
    try:
        return proc.exitcode
    except (ValueError, OSError):
        return None


def kill_tree(pid: int) -> None:
    """SIGKILL a worker and its process group (what its task started); the worker leads the group."""
    if pid <= 0:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)  # not yet in its own group


def kill_group(pid: int) -> None:
    """SIGKILL what is left of a dead worker's process group (never the pid itself: it is reaped)."""
    if pid > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def reap(proc: BaseProcess) -> int | None:
    """Wait for a process the sentinel says is gone; return its exit code and release it."""
    proc.join(5.0)
    code = proc.exitcode
    with contextlib.suppress(ValueError):
        proc.close()
    return code


def stop_processes(procs: list[BaseProcess], grace: float) -> None:
    """Wait up to `grace` for workers to exit on their own, then SIGKILL and reap the rest."""
    started = []
    for proc in procs:
        with contextlib.suppress(ValueError):  # closed already
            if proc.pid is not None:  # None: its start failed or was cancelled
                started.append(proc)
    deadline = time.monotonic() + grace
    for proc in started:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in started:
        if proc.exitcode is None:
            kill_tree(proc.pid or 0)
            proc.join(5.0)
        with contextlib.suppress(ValueError):
            proc.close()


def stop_helper_processes() -> None:
    """Stop multiprocessing's forkserver and resource tracker now, at service exit.

    Both would exit on their own once they notice this process is gone, but only a moment later:
    stopping them here (the stdlib's own test hooks, guarded) means no process outlives the
    service, not even briefly. Call it only when no pool is running any more.
    """
    from multiprocessing import forkserver, resource_tracker

    for helper in (forkserver._forkserver, resource_tracker._resource_tracker):
        stop = getattr(helper, "_stop", None)
        if stop is not None:
            try:
                stop()
            except Exception:
                log.warning("stopping multiprocessing's %s failed", type(helper).__name__, exc_info=True)
