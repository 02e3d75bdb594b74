"""docs/reliability.md, "What a kill kills": each worker leads its own process group, and a timeout, a
cancellation or a crash takes the whole group, so a process a task started does not outlive its worker.

The task (`spawn_child` in tests/support/fault_tasks.py) starts a real child process that sleeps ten
minutes in the worker's process group, reports its pid, then blocks. Each test ends the worker one way
and waits (with a deadline far above the promise) for the child to be gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.pool_harness import alive, on_uvloop, open_pool, wait_for_file, wait_until, whole
from workers.errors import TaskTimeout, WorkerCrashed
from workers.executor import CallOptions
from workers.local.pool import WorkerPool

GONE_WITHIN = 15.0  # the kill is immediate; this is only the test's patience


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody has reaped yet (an orphan waits for init; it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def started_child(
    pool: WorkerPool, info: Path, options: CallOptions
) -> tuple[asyncio.Future[Any], dict[str, int]]:
    """Call `spawn_child`; once it reports, check the child runs in the worker's own process group."""
    call = asyncio.ensure_future(pool.call("spawn_child", {"info": str(info)}, options))
    report: dict[str, int] = json.loads(await wait_for_file(info, 15.0))
    assert report["worker"] in pool.pids()
    assert report["child_pgid"] == report["worker"], "the child is not in the worker's process group"
    assert os.getpgid(report["worker"]) == report["worker"], "the worker does not lead its own group"
    return call, report


@contextlib.contextmanager
def reaped_on_failure(info: Path) -> Iterator[None]:
    """Whatever happens, no ten-minute sleeper is left behind by a failing test."""
    try:
        yield
    finally:
        if info.exists():
            child = json.loads(info.read_text())["child"]
            if not gone(child):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)


@on_uvloop
async def test_a_timeout_kills_the_process_a_task_started(tmp_path: Path) -> None:
    info = tmp_path / "child.json"
    with reaped_on_failure(info):
        async with open_pool(workers=1) as (pool, watch):
            call, report = await started_child(pool, info, CallOptions(timeout=1.0))
            with pytest.raises(TaskTimeout):
                await asyncio.wait_for(call, 30.0)
            await wait_until(lambda: gone(report["child"]), GONE_WITHIN, "the task's child to die with its worker")
            await wait_until(lambda: pool.restarts == {"timeout": 1}, 15.0, "the killed worker to be counted")
            assert not alive(report["worker"])
            await whole(pool, watch, timeout=15.0)


@on_uvloop
async def test_a_cancelled_running_call_kills_the_process_its_task_started(tmp_path: Path) -> None:
    info = tmp_path / "child.json"
    with reaped_on_failure(info):
        async with open_pool(workers=1) as (pool, watch):
            call, report = await started_child(pool, info, CallOptions(kill_on_cancel=True))
            assert not gone(report["child"])
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await wait_until(lambda: gone(report["child"]), GONE_WITHIN, "the task's child to die with its worker")
            await wait_until(lambda: pool.restarts == {"cancelled": 1}, 15.0, "the killed worker to be counted")
            await whole(pool, watch, timeout=15.0)


@on_uvloop
async def test_a_worker_killed_from_outside_takes_the_process_its_task_started(tmp_path: Path) -> None:
    info = tmp_path / "child.json"
    with reaped_on_failure(info):
        async with open_pool(workers=1) as (pool, watch):
            call, report = await started_child(pool, info, CallOptions())
            assert not gone(report["child"])
            os.kill(report["worker"], signal.SIGKILL)  # only the worker: its child is left to the pool
            with pytest.raises(WorkerCrashed, match="killed by SIGKILL"):
                await asyncio.wait_for(call, 30.0)
            await wait_until(lambda: gone(report["child"]), GONE_WITHIN, "the task's child to die with its worker")
            await wait_until(lambda: pool.restarts == {"crashed": 1}, 15.0, "the dead worker to be counted")
            await whole(pool, watch, timeout=15.0)
