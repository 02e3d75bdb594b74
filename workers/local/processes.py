"""Stopping and reaping worker processes: the pool's dealings with the operating system.

A worker leads its own process group, so a kill takes whatever its task started with it. Workers
are the worker parent's children (workers/local/parent.py), so "reaping" one here means reading
the exit code the parent wrote on its status pipe (`ForkedProcess`, workers/local/forks.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

from workers.local.forks import ForkedProcess

log = logging.getLogger("procbridge.pool")


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


def stop_processes(procs: list[ForkedProcess], grace: float) -> None:
    """Wait up to `grace` for workers to exit on their own, then SIGKILL and reap the rest
    (blocking: run it off the loop)."""
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if not proc.gone:
            kill_tree(proc.pid)
            proc.join(5.0)
        proc.close()


def stop_helper_processes() -> None:
    """Stop multiprocessing's forkserver (if anything started one) and resource tracker now, at
    service exit.

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
