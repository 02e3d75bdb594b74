"""The worker parent (workers/local/parent.py) under the pool: the preload runs there once, a worker
that cannot start (a hook that raises, a start past the timeout) is stopped and retried with the
back-off until it can, and a parent that dies is replaced (its preload runs again) while the pool
keeps its promises. Hooks are in tests/support/state_tasks.py; each records the pids it ran in."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.support.pool_harness import alive, on_uvloop, open_pool, whole

STATE = ("tests.support.state_tasks",)


def _pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


@pytest.fixture
def logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The files the hooks append their pid to (the worker parent inherits this environment)."""
    preload, worker = tmp_path / "preload.pids", tmp_path / "worker.pids"
    monkeypatch.setenv("STATE_PRELOAD_LOG", str(preload))
    monkeypatch.setenv("STATE_WORKER_LOG", str(worker))
    return preload, worker


@on_uvloop
async def test_the_preload_runs_once_in_the_parent_and_each_worker_runs_on_worker_start_once(
    logs: tuple[Path, Path],
) -> None:
    preload, worker = logs
    async with open_pool(workers=2, modules=STATE) as (pool, watch):
        pids = await whole(pool, watch, 30)
        assert _pids(preload) == [pool.parent_pid]
        assert sorted(_pids(worker)) == sorted(pids)
        outcome = await pool.call("table_sum", {})
        assert outcome.value["sum"] == 8 * 1024 * 1024 / 8 and outcome.value["pid"] in pids


@on_uvloop
async def test_a_killed_parent_takes_its_workers_and_a_new_parent_runs_the_preload_again(
    logs: tuple[Path, Path],
) -> None:
    preload, _ = logs
    async with open_pool(workers=2, modules=STATE) as (pool, watch):
        before = set(await whole(pool, watch, 30))
        old_parent = pool.parent_pid
        assert old_parent is not None
        os.kill(old_parent, signal.SIGKILL)
        await wait_until(lambda: not any(alive(pid) for pid in before), 30, "the workers to die with their parent")
        await wait_until(
            lambda: pool.parent_pid not in (None, old_parent) and pool.alive == 2 and not set(pool.pids()) & before,
            60, "a new parent and two new workers",
        )
        watch.sample()
        assert _pids(preload) == [old_parent, pool.parent_pid]
        outcome = await pool.call("table_sum", {})
        assert outcome.value["pid"] in pool.pids()
        assert pool.restarts["crashed"] >= 2


@on_uvloop
async def test_an_on_worker_start_hook_that_raises_is_retried_with_the_back_off_until_it_succeeds(
    logs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, worker = logs
    failing = tmp_path / "database-down"
    failing.touch()
    monkeypatch.setenv("STATE_WORKER_FAIL_WHILE", str(failing))
    async with open_pool(workers=1, modules=STATE, start_timeout=30.0, defer_start=True) as (pool, watch):
        starting = asyncio.ensure_future(pool.start())
        await wait_until(lambda: pool.restarts["start_failed"] >= 3, 60, "three failed starts")
        watch.sample()
        assert not starting.done() and pool.alive == 0
        assert pool.start_error is not None and "record_worker raised ConnectionError" in pool.start_error
        failing.unlink()
        await asyncio.wait_for(starting, 60)
        assert pool.alive == 1 and pool.start_error is None
        assert len(_pids(worker)) >= 4  # three that failed, then the one that started
        assert (await pool.call("table_sum", {})).value["pid"] == pool.pids()[0]


@on_uvloop
async def test_a_worker_not_ready_within_the_start_timeout_is_stopped_and_started_again(
    logs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, worker = logs
    gate = tmp_path / "worker.gate"
    monkeypatch.setenv("STATE_WORKER_GATE", str(gate))
    async with open_pool(workers=1, modules=STATE, start_timeout=1.0, defer_start=True) as (pool, watch):
        starting = asyncio.ensure_future(pool.start())
        await wait_until(lambda: pool.restarts["start_timeout"] >= 1, 60, "a worker stopped at the start timeout")
        first = _pids(worker)[0]
        watch.sample()
        await wait_until(lambda: not alive(first), 10, "the stuck worker to be gone")
        assert pool.start_error is not None and "did not start within 1 s" in pool.start_error
        gate.touch()
        await asyncio.wait_for(starting, 60)
        assert pool.alive == 1 and pool.pids()[0] != first
