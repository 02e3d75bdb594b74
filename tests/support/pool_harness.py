"""Helpers for the pool tests: run a test on uvloop (the service's loop), open a pool that is
checked on the way out (no worker pid left, no /dev/shm segment left), and wait for conditions with
deadlines instead of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import psutil
import uvloop

from tests.conftest import wait_until
from workers.local.pool import PoolOptions, WorkerPool

FAULTS = "tests.support.fault_tasks"


def on_uvloop(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Turn an async test into a plain one that runs on a fresh uvloop loop (the service's loop).

    pytest sees a plain function with the same parameters, so fixtures still work.
    """

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(fn(*args, **kwargs))

    return run


def alive(pid: int) -> bool:
    """True while `pid` is a running (not zombie) process."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False




async def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    """The contents of `path` once a task has written it (a pid, usually)."""
    text: str = await wait_until(lambda: path.exists() and path.read_text(), timeout, f"{path.name} to be written")
    return text


class PidWatch:
    """Every worker pid a pool ever showed, and every worker parent's; `leftovers()` are the ones
    still running."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.seen: set[int] = set()

    def sample(self) -> list[int]:
        pids = self.pool.pids()
        self.seen.update(pids)
        if self.pool.parent_pid is not None:
            self.seen.add(self.pool.parent_pid)
        return pids

    def leftovers(self) -> list[int]:
        return sorted(pid for pid in self.seen if alive(pid))


def shm_path(pool: WorkerPool) -> Path:
    table = pool._state.table
    assert table is not None, "the pool is not started"
    return Path("/dev/shm") / table.name.lstrip("/")


@contextlib.asynccontextmanager
async def open_pool(
    workers: int = 2, modules: tuple[str, ...] = (FAULTS,), defer_start: bool = False, **options: Any
) -> AsyncIterator[tuple[WorkerPool, PidWatch]]:
    """A started pool (with `defer_start`, one the test starts itself) and its pid watch; on the way
    out it is closed and must leave nothing behind."""
    pool = WorkerPool(PoolOptions(workers=workers, modules=modules, **options))
    watch = PidWatch(pool)
    if not defer_start:
        await pool.start()
        watch.sample()
        assert shm_path(pool).exists()
    try:
        yield pool, watch
    finally:
        watch.sample()
        await pool.aclose()
    assert watch.leftovers() == [], "worker processes outlived the pool"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(pool.prefix)], "the pool left a segment behind"


async def whole(pool: WorkerPool, watch: PidWatch, timeout: float = 15.0) -> list[int]:
    """Wait until every slot has a live, ready worker; return their pids. (A replacement is promised
    at once; the deadline is a wide margin for a loaded CI machine, not the promise.)"""
    await wait_until(lambda: pool.alive == pool.size, timeout, f"{pool.size} live workers")
    pids = watch.sample()
    assert all(alive(pid) for pid in pids)
    return pids


def gate_files(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """(marker, gate) paths for a `fault`/`mark_then_wait` call."""
    return tmp_path / f"{name}.marker", tmp_path / f"{name}.gate"


def open_gate(gate: Path) -> None:
    gate.write_text("go")


def worker_rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
