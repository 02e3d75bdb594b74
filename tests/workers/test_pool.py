"""The pool doing its ordinary job: results, JSON encoding, ordering, many concurrent calls, the
executor API, the worker table, and a clean start and close. Faults are in test_faults.py."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import functools
import hashlib
import multiprocessing as mp
import os
import threading
import types
from pathlib import Path

import orjson
import psutil
import pytest

from tests.support import fault_tasks
from tests.support.pool_harness import (
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
from workers.executor import CallOptions
from workers.local.calls import Call
from workers.local.forks import StartFailed
from workers.local.handle import DEEP_WINDOW, WorkerHandle
from workers.local.pool import _TINY, PoolOptions, WorkerPool
from workers.protocol import CALL_TASK
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
        outcome = await pool.call("echo", {"value": [1, "two", {"3": 4.5}]}, CallOptions(encode_json=True))
        assert outcome.json is True and isinstance(outcome.value, bytes)
        assert orjson.loads(outcome.value)["value"] == [1, "two", {"3": 4.5}]
        digest = await pool.call("sha256", {"data": b"abc", "rounds": 2}, CallOptions(encode_json=True))
        assert orjson.loads(digest.value) == hashlib.sha256(hashlib.sha256(b"abc").digest()).hexdigest()
        png = await pool.call("mandelbrot", {"width": 8, "height": 6}, CallOptions(encode_json=True))
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


def test_what_may_be_pipelined_into_a_window() -> None:
    """The rule behind the windows (WorkerHandle.fits), with the expected run times given."""

    def call(est: float | None) -> Call:
        c = Call(1, CALL_TASK, "t", {}, False, None, cf.Future())
        c.short, c.est = (False, 1.0) if est is None else (est < 0.002, est)
        return c

    def filled(window: int, est: float | None, first: float | None = None) -> int:
        w = WorkerHandle(0, types.SimpleNamespace(pid=1), None)  # type: ignore[arg-type]
        w.add(call(first if first is not None else est))
        while w.fits(call(est), window) and len(w.inflight) < 100:
            w.add(call(est))
        return len(w.inflight)

    assert filled(3, 0.00001) == DEEP_WINDOW == 16  # tiny: up to 16 in one frame
    assert filled(3, 0.0002) == 5  # ...while their expected work stays under 1 ms
    assert filled(3, 0.001) == 3  # about a millisecond: the plain window
    assert filled(3, 0.0019) == 3
    assert filled(3, 0.003) == 1  # not short: nothing behind it, and it behind nothing
    assert filled(3, None) == 1  # never timed yet
    assert filled(3, 0.00001, first=0.05) == 1  # nothing short goes behind a long one
    assert filled(1, 0.00001) == 1  # window 1: no pipelining at all
    w = WorkerHandle(0, types.SimpleNamespace(pid=1), None)  # type: ignore[arg-type]
    calls = [call(0.0001) for _ in range(4)]
    for i, c in enumerate(calls):
        c.id = i
        w.add(c)
    assert w.take(2) is calls[2] and w.take(2) is None
    w.unassign(calls[0])
    assert [c.id for c in w.inflight] == [1, 3] and abs(w.load - 0.0002) < 1e-12
    w.take(1), w.take(3)
    assert not w.inflight and w.load == 0.0 and w.longs == 0


@on_uvloop
async def test_run_in_executor_gives_the_pools_own_future_with_asyncio_semantics(tmp_path: Path) -> None:
    """On the loop's thread the pool's future is also an asyncio future: run_in_executor returns it
    as it is (no second future, no thread-safe hop); awaiting, wait_for, gather, callbacks and
    cancellation behave as with any asyncio future, and it is still a concurrent.futures.Future."""
    await _asyncio_semantics(tmp_path)


async def test_the_same_asyncio_semantics_on_the_stock_loop(tmp_path: Path) -> None:
    await _asyncio_semantics(tmp_path)


async def _asyncio_semantics(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with open_pool(workers=1, max_pending=100) as (pool, _):
        fut = loop.run_in_executor(pool, fault_tasks.add, 1, 2)
        assert isinstance(fut, cf.Future) and asyncio.isfuture(fut) and fut.get_loop() is loop
        with pytest.raises(asyncio.InvalidStateError):
            fut.result()  # on the loop's thread: an error, never a hang
        called: list[object] = []
        fut.add_done_callback(called.append)
        assert await fut == 3 and fut.result() == 3
        await asyncio.sleep(0)
        assert called == [fut]

        # a timeout while the call runs: TimeoutError at once; the call finishes in its worker
        marker, gate = gate_files(tmp_path, "slow")
        slow = loop.run_in_executor(pool, fault_tasks.mark_then_wait, str(marker), str(gate))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slow, 0.2)
        assert slow.cancelled()
        await wait_for_file(marker)  # the call runs on in its worker all the same
        with pytest.raises(asyncio.CancelledError):
            slow.result()

        # a task cancelled while its call runs ends cancelled; one cancelled while queued never runs
        marker, gate2 = gate_files(tmp_path, "running")
        ledger = tmp_path / "ledger"

        async def await_it(f: asyncio.Future[object]) -> object:
            return await f

        open_gate(gate)
        running = asyncio.ensure_future(await_it(
            loop.run_in_executor(pool, fault_tasks.mark_then_wait, str(marker), str(gate2))
        ))
        await wait_for_file(marker)
        queued = loop.run_in_executor(pool, fault_tasks.append_pid, str(ledger))
        kept = loop.run_in_executor(pool, fault_tasks.add, 5, 5)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert running.cancelled()
        assert queued.cancel() and queued.cancelled()
        open_gate(gate2)
        results = await asyncio.gather(queued, kept, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError) and results[1] == 10
        assert await loop.run_in_executor(pool, fault_tasks.add, 2, 2) == 4
        assert not ledger.exists(), "a call cancelled while it waited never ran"
        assert pool.restarts == {}


@on_uvloop
async def test_functions_and_callables_of_executor_calls() -> None:
    """A plain function is pickled once by the pool and unpickled once by each worker; a partial or
    any other callable object travels with its own state on every call."""
    loop = asyncio.get_running_loop()
    async with open_pool(workers=1) as (pool, _):
        for i in range(5):
            assert await loop.run_in_executor(pool, fault_tasks.add, i, 1) == i + 1
            assert await loop.run_in_executor(pool, functools.partial(fault_tasks.add, i), 10) == i + 10
        assert await loop.run_in_executor(pool, functools.partial(fault_tasks.add, b=7), 1) == 8


@on_uvloop
async def test_futures_made_on_the_loop_can_be_waited_for_from_threads() -> None:
    loop = asyncio.get_running_loop()
    async with open_pool(workers=2, max_pending=1000) as (pool, _):
        futures = [pool.submit(fault_tasks.add, i, 1) for i in range(40)]
        slow = pool.submit(fault_tasks.pid_after, 100)  # still running when the thread starts waiting

        def in_a_thread() -> tuple[int, list[int], int]:
            pid = slow.result(timeout=30)  # blocks until the loop completes it
            done, _ = cf.wait(futures, timeout=30)
            return pid, sorted(f.result(timeout=30) for f in cf.as_completed(futures, timeout=30)), len(done)

        pid, results, done = await loop.run_in_executor(None, in_a_thread)
        assert pid in pool.pids() and results == [i + 1 for i in range(40)] and done == 40


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
    """Live processes below the worker parent(s) of this test process: the worker processes."""
    found = set()
    for helper in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            for proc in helper.children(recursive=True):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.add(proc.pid)
    return found


@on_uvloop
async def test_a_task_module_that_fails_to_import_fails_start_in_one_line_and_leaves_nothing(
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
    with pytest.raises(StartFailed, match=r"^importing the task modules failed: ModuleNotFoundError") as failed:
        await pool.start()
    assert "\n" not in failed.value.line and "Traceback" in failed.value.details
    assert pool.pids() == [] and pool.rows() == []
    assert _worker_processes() - workers_before == set(), "a worker outlived the failed start"
    assert len(tables) == 1 and not (Path("/dev/shm") / tables[0]).exists()
    assert not _names_starting(pool.prefix), "a failed start left a shared-memory segment"


def _names_starting(prefix: str) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


async def test_the_fault_tasks_load_in_a_worker_by_their_module_name() -> None:
    """The harness names the fault module by a string (FAULTS); the worker parent imports it by that
    name and a worker, another process, runs its task."""
    async with open_pool(workers=1, modules=(FAULTS,)) as (pool, _):
        outcome = await pool.call("echo", {"value": [1, "two"]})
        workers = pool.pids()
    assert outcome.value == {"value": [1, "two"], "pid": outcome.pid}
    assert workers == [outcome.pid] and outcome.pid != os.getpid()


@on_uvloop
async def test_tiny_calls_share_a_deeper_window_and_longer_ones_keep_the_plain_one() -> None:
    """Calls known to take microseconds are pipelined up to 16 deep (one frame carries many of them
    each way); calls of about a millisecond still get at most `window` (3) per worker."""
    async with open_pool(workers=1, max_pending=64) as (pool, _):
        for _ in range(5):
            await pool.call("echo", {"value": 0})
            await pool.call("nap", {"ms": 1})
        seen: list[int] = []

        async def burst(task: str, kwargs: dict[str, object]) -> list[object]:
            calls = [asyncio.ensure_future(pool.call(task, kwargs)) for _ in range(40)]
            await asyncio.sleep(0)  # the calls were admitted in this loop turn
            seen.append(max(pool.inflight().values()))
            return [o.value for o in await asyncio.gather(*calls)]

        assert await burst("echo", {"value": 7}) == [{"value": 7, "pid": pool.pids()[0]}] * 40
        assert seen[-1] <= 16  # (more than 3 unless a loaded machine made echo look slow: see the next test)
        assert len(await burst("nap", {"ms": 1})) == 40
        assert seen[-1] <= 3
        # a task the pool has not timed yet is never pipelined
        assert len(await burst("spin", {"ms": 0})) == 40
        assert seen[-1] == 1


@on_uvloop
async def test_tiny_calls_of_one_loop_turn_ride_one_frame_instead_of_waking_an_idle_worker() -> None:
    """Both workers idle, four calls known to take microseconds made in one loop turn: they all go
    in the frame leaving for the first worker (waking the second would cost more than the calls);
    calls not known to be tiny made in one turn still get an idle worker each."""
    async with open_pool(workers=2) as (pool, _):

        async def taught() -> bool:  # the pool's moving average of echo's run time is under _TINY
            await pool.call("echo", {"value": 0})
            return pool._averages.get("echo", 1.0) < _TINY

        await wait_until(taught, 10.0, "echo to be timed as tiny")
        tiny = await asyncio.gather(*(pool.call("echo", {"value": i}) for i in range(4)))
        assert [o.value["value"] for o in tiny] == [0, 1, 2, 3]
        assert len({o.pid for o in tiny}) == 1
        naps = await asyncio.gather(*(pool.call("nap", {"ms": 20}) for _ in range(2)))
        assert len({o.pid for o in naps}) == 2
