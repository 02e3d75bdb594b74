"""The pool doing its ordinary job: results, JSON encoding, ordering, many concurrent calls, the
executor API, the worker table, and a clean start and close. Faults are in test_faults.py."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import hashlib
import multiprocessing as mp
import os
import threading
from pathlib import Path

import orjson
import psutil
import pytest

from tests.workers import fault_tasks
from tests.workers.pool_harness import (
    FAULTS,
    alive,
    gate_files,
    on_uvloop,
    open_gate,
    open_pool,
    wait_for_file,
    wait_until,
    whole,
)
from workers.errors import PoolClosed, TaskFailed, WorkerCrashed
from workers.pool import PoolOptions, WorkerPool
from workers.stats import BUSY, IDLE, WorkerTable


@on_uvloop
async def test_a_call_returns_the_value_and_where_it_ran() -> None:
    async with open_pool(workers=2) as (pool, watch):
        outcome = await pool.call("primes", {"limit": 100})
        assert outcome.value == 25
        assert outcome.pid in watch.sample()
        assert outcome.elapsed >= 0 and outcome.json is False
        echoed = await pool.call("echo", {"value": {"a": [1, 2.5, None, "x"], "b": True}})
        assert echoed.value["value"] == {"a": [1, 2.5, None, "x"], "b": True}


async def _the_same_on_both_loops() -> None:
    async with open_pool(workers=1) as (pool, _):
        assert (await pool.call("primes", {"limit": 1000})).value == 168


@on_uvloop
async def test_on_uvloop() -> None:
    await _the_same_on_both_loops()


async def test_on_the_stock_asyncio_loop() -> None:
    await _the_same_on_both_loops()


@on_uvloop
async def test_encode_json_returns_json_bytes_made_in_the_worker_and_bytes_stay_bytes() -> None:
    async with open_pool(workers=1) as (pool, _):
        outcome = await pool.call("echo", {"value": [1, "two", {"3": 4.5}]}, encode_json=True)
        assert outcome.json is True and isinstance(outcome.value, bytes)
        assert orjson.loads(outcome.value)["value"] == [1, "two", {"3": 4.5}]
        digest = await pool.call("sha256", {"data": b"abc", "rounds": 2}, encode_json=True)
        assert orjson.loads(digest.value) == hashlib.sha256(hashlib.sha256(b"abc").digest()).hexdigest()
        png = await pool.call("mandelbrot", {"width": 8, "height": 6}, encode_json=True)
        assert png.json is False and png.value[:8] == b"\x89PNG\r\n\x1a\n"


@on_uvloop
async def test_task_errors_come_back_as_task_failed_with_type_message_and_traceback() -> None:
    async with open_pool(workers=1) as (pool, _):
        with pytest.raises(TaskFailed) as raised:
            await pool.call("fail", {"message": "bad input"})
        assert raised.value.exc_type == "ValueError" and raised.value.message == "bad input"
        assert "fault_tasks.py" in raised.value.traceback and str(raised.value) == "ValueError: bad input"
        with pytest.raises(TaskFailed, match="not registered"):
            await pool.call("no_such_task", {})
        with pytest.raises(TaskFailed, match="arguments cannot be sent"):
            await pool.call("echo", {"value": threading.Lock()})
        assert (await pool.call("echo", {"value": "still fine"})).value["value"] == "still fine"
        assert pool.restarts == {}


@on_uvloop
async def test_one_worker_runs_calls_in_the_order_they_came() -> None:
    async with open_pool(workers=1, max_pending=200) as (pool, _):
        order: list[int] = []
        calls = []
        for i in range(150):
            call = asyncio.ensure_future(pool.call("echo", {"value": i}))
            call.add_done_callback(lambda f: order.append(f.result().value["value"]))
            calls.append(call)
        await asyncio.gather(*calls)
        assert order == list(range(150))


@on_uvloop
async def test_many_concurrent_calls_each_get_their_own_answer() -> None:
    async with open_pool(workers=2, max_pending=5000) as (pool, watch):
        outcomes = await asyncio.gather(*(pool.call("echo", {"value": i}) for i in range(3000)))
        assert [o.value["value"] for o in outcomes] == list(range(3000))
        assert {o.pid for o in outcomes} == set(watch.sample()), "both workers took part"
        mixed = await asyncio.gather(
            *(pool.call("primes", {"limit": n}) for n in (10, 100, 1000, 10_000) * 25),
            *(pool.call("nap", {"ms": 2}) for _ in range(20)),
        )
        assert [o.value for o in mixed[:100]] == [4, 25, 168, 1229] * 25
        assert pool.pending == 0 and pool.inflight() == {pid: 0 for pid in watch.sample()}
        assert pool.restarts == {}


@on_uvloop
async def test_large_arguments_and_results_cross_intact() -> None:
    async with open_pool(workers=2) as (pool, _):
        blob = os.urandom(8 * 1024 * 1024)
        outcome = await pool.call("sha256", {"data": blob})
        assert outcome.value == hashlib.sha256(blob).hexdigest()
        text = "x" * (3 * 1024 * 1024)
        assert (await pool.call("echo", {"value": text})).value["value"] == text


# -- the executor API ------------------------------------------------------------------------------


@on_uvloop
async def test_run_in_executor_with_module_level_functions() -> None:
    loop = asyncio.get_running_loop()
    async with open_pool(workers=2, max_pending=1000) as (pool, watch):
        assert await loop.run_in_executor(pool, fault_tasks.add, 2, 3) == 5
        pids = await asyncio.gather(*(loop.run_in_executor(pool, fault_tasks.pid_after, 20) for _ in range(4)))
        assert set(pids) <= set(watch.sample())
        results = await asyncio.gather(*(loop.run_in_executor(pool, fault_tasks.add, i, i) for i in range(300)))
        assert results == [2 * i for i in range(300)]
        # what cannot be sent, raised or returned fails that call only
        with pytest.raises(TaskFailed, match="cannot be sent"):
            await loop.run_in_executor(pool, lambda: 1)
        with pytest.raises(TaskFailed, match="from the executor API"):
            await loop.run_in_executor(pool, fault_tasks.function_raising_holds_lock)
        with pytest.raises(TaskFailed, match="cannot be sent back"):
            await loop.run_in_executor(pool, fault_tasks.function_returning_lock)
        assert await loop.run_in_executor(pool, fault_tasks.add, 1, 1) == 2
        assert pool.restarts == {}


@on_uvloop
async def test_the_executor_survives_a_worker_crash() -> None:
    loop = asyncio.get_running_loop()
    async with open_pool(workers=2, max_pending=1000) as (pool, watch):
        with pytest.raises(WorkerCrashed):
            await loop.run_in_executor(pool, fault_tasks.crash_in_function)
        assert await loop.run_in_executor(pool, fault_tasks.add, 20, 22) == 42
        await whole(pool, watch)
        assert await asyncio.gather(*(loop.run_in_executor(pool, fault_tasks.add, i, 1) for i in range(50))) == [
            i + 1 for i in range(50)
        ]
        assert pool.restarts == {"crashed": 1}


def test_the_stock_process_pool_breaks_where_this_one_does_not() -> None:
    """The reason the pool exists: one crash breaks a ProcessPoolExecutor for good."""
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("forkserver")) as stock:
        with pytest.raises(cf.process.BrokenProcessPool):
            stock.submit(fault_tasks.crash_in_function).result(timeout=30)
        with pytest.raises(cf.process.BrokenProcessPool):
            stock.submit(fault_tasks.add, 1, 2).result(timeout=30)


@on_uvloop
async def test_submit_from_another_thread() -> None:
    async with open_pool(workers=2, max_pending=1000) as (pool, _):
        loop = asyncio.get_running_loop()

        def from_a_thread() -> list[int]:
            futures = [pool.submit(fault_tasks.add, i, 10) for i in range(50)]
            return [f.result(timeout=30) for f in futures]

        assert await loop.run_in_executor(None, from_a_thread) == [i + 10 for i in range(50)]


# -- the worker table ------------------------------------------------------------------------------


@on_uvloop
async def test_worker_table_rows_show_each_workers_state(tmp_path: Path) -> None:
    async with open_pool(workers=2) as (pool, watch):
        pids = await whole(pool, watch)
        rows = pool.rows()
        assert sorted(r.pid for r in rows) == sorted(pids)
        assert all(r.state == IDLE and r.task is None and r.tasks_done == 0 for r in rows)
        await asyncio.gather(*(pool.call("echo", {"value": i}) for i in range(10)))
        assert sum(r.tasks_done for r in pool.rows()) == 10
        marker, gate = gate_files(tmp_path, "busy")
        busy = asyncio.ensure_future(pool.call("mark_then_wait", {"path": str(marker), "release": str(gate)}))
        pid = int(await wait_for_file(marker))
        (row,) = [r for r in pool.rows() if r.pid == pid]
        assert row.state == BUSY and row.task == "mark_then_wait" and row.state_name == "busy"
        open_gate(gate)
        await busy
        await wait_until(lambda: all(r.state == IDLE for r in pool.rows()), what="every worker idle")
        assert sum(r.tasks_done for r in pool.rows()) == 11


# -- start and close -------------------------------------------------------------------------------


@on_uvloop
async def test_close_stops_every_worker_and_removes_the_segment() -> None:
    async with open_pool(workers=3) as (pool, watch):
        pids = await whole(pool, watch)
    assert not any(alive(pid) for pid in pids)
    with pytest.raises(PoolClosed):
        await pool.call("echo", {})
    await pool.aclose()  # a second close is harmless


@on_uvloop
async def test_close_right_after_a_crash_while_the_replacement_starts() -> None:
    async with open_pool(workers=2) as (pool, _):
        crash = asyncio.ensure_future(pool.call("hard_exit", {}))
        waiting = asyncio.ensure_future(pool.call("nap", {"ms": 5000}))
        with pytest.raises(WorkerCrashed):
            await crash
        # the replacement is being started right now: close must stop it too (open_pool checks)
    with pytest.raises(PoolClosed):
        await waiting


def _worker_processes() -> set[int]:
    """Live processes the forkserver(s) of this test process have forked: the worker processes."""
    found = set()
    for helper in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            for proc in helper.children(recursive=True):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.add(proc.pid)
    return found


@on_uvloop
async def test_a_task_module_that_fails_to_import_fails_start_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tables: list[str] = []
    create = WorkerTable.create

    def recording_create(cls: type[WorkerTable], slots: int, name: str | None = None) -> WorkerTable:
        table = create(slots, name=name)
        tables.append(table.name)
        return table

    monkeypatch.setattr(WorkerTable, "create", classmethod(recording_create))
    workers_before = _worker_processes()
    pool = WorkerPool(PoolOptions(workers=2, modules=("tests.workers.no_such_module",)))
    with pytest.raises(RuntimeError, match="died while starting"):
        await pool.start()
    assert pool.pids() == [] and pool.rows() == []
    assert _worker_processes() - workers_before == set(), "a worker outlived the failed start"
    assert len(tables) == 1 and not (Path("/dev/shm") / tables[0]).exists()
    assert not _names_starting(pool.prefix), "a failed start left a shared-memory segment"


def _names_starting(prefix: str) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


def test_fault_module_is_importable_in_workers() -> None:
    assert fault_tasks.__name__ == FAULTS
