"""`async def` tasks and streaming generator tasks on the local pool, with real worker processes:
a coroutine on the worker's own loop, items handed out as they are yielded, flow control (a window
of unacknowledged items), closing a stream, and every way a stream can end. The HTTP side is
tests/e2e/test_streams.py."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import orjson
import pytest

from tests.support.pool_harness import on_uvloop, open_gate, open_pool, wait_for_file, wait_until
from workers import aio
from workers.errors import StreamingUnsupported, TaskFailed, TaskTimeout, WorkerCrashed
from workers.executor import CallOptions, Executor
from workers.local.streams import PoolStream
from workers.streaming import WINDOW

STREAMS = ("tests.support.stream_tasks",)


def produced(path: Path) -> int:
    return int(path.read_text()) if path.exists() else 0


@on_uvloop
async def test_an_async_task_runs_on_one_loop_its_worker_keeps_and_returns_its_value() -> None:
    async with open_pool(workers=1, modules=STREAMS) as (pool, _):
        first = await pool.call("st_async_add", {"a": 2, "b": 3})
        second = await pool.call("st_async_add", {"a": 4, "b": 5}, CallOptions(encode_json=True))
        assert first.value["sum"] == 5 and orjson.loads(second.value)["sum"] == 9
        assert first.pid == second.pid == first.value["pid"]
        assert first.value["loop"] == orjson.loads(second.value)["loop"]  # the same loop, kept between calls


@on_uvloop
async def test_an_async_task_that_raises_fails_its_call_and_the_worker_lives_on() -> None:
    async with open_pool(workers=1, modules=STREAMS) as (pool, _):
        with pytest.raises(TaskFailed) as failed:
            await pool.call("st_async_fail", {"message": "boom"})
        assert failed.value.exc_type == "ValueError" and "boom" in str(failed.value)
        assert (await pool.call("st_async_add", {"a": 1, "b": 1})).value["sum"] == 2


def test_each_thread_keeps_its_own_loop_as_dask_worker_threads_do() -> None:
    async def loop_id() -> int:
        return id(asyncio.get_running_loop())

    seen: dict[str, list[int]] = {}

    def twice(name: str) -> None:
        seen[name] = [aio.run(loop_id()), aio.run(loop_id())]

    threads = [threading.Thread(target=twice, args=(f"t{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["t0"][0] == seen["t0"][1] and seen["t1"][0] == seen["t1"][1]
    assert seen["t0"][0] != seen["t1"][0]


@on_uvloop
async def test_the_first_item_arrives_while_the_generator_still_runs_then_the_rest_in_order(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with open_pool(workers=1, modules=STREAMS) as (pool, _):
        stream = pool.call_stream("st_count", {"n": 4, "gate": str(gate)})
        first = await anext(stream)
        assert orjson.loads(first) == 0 and not gate.exists()  # the generator waits for the gate after it
        assert stream.outcome is None
        open_gate(gate)
        rest = [orjson.loads(item) async for item in stream]
        assert rest == [1, 2, 3]
        assert stream.outcome is not None and stream.outcome.value == 4 and stream.outcome.pid == stream.pid


@on_uvloop
async def test_an_async_generator_streams_on_the_worker_s_loop(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with open_pool(workers=1, modules=STREAMS) as (pool, _):
        stream = pool.call_stream("st_async_count", {"n": 3, "gate": str(gate)})
        assert orjson.loads(await anext(stream)) == {"i": 0}
        open_gate(gate)
        assert [orjson.loads(item) async for item in stream] == [{"i": 1}, {"i": 2}]
        assert stream.outcome is not None and stream.outcome.value == 3


@on_uvloop
async def test_a_generator_task_called_plainly_returns_the_list_of_its_items() -> None:
    async with open_pool(workers=1, modules=STREAMS) as (pool, _):
        assert (await pool.call("st_count", {"n": 3})).value == [0, 1, 2]
        assert (await pool.call("st_async_count", {"n": 2})).value == [{"i": 0}, {"i": 1}]


@on_uvloop
async def test_an_exception_mid_stream_raises_task_failed_after_the_items_before_it() -> None:
    async with open_pool(workers=1, modules=STREAMS) as (pool, _):
        stream = pool.call_stream("st_count", {"n": 5, "fail_at": 2})
        got = []
        with pytest.raises(TaskFailed) as failed:
            async for item in stream:
                got.append(orjson.loads(item))
        assert got == [0, 1] and failed.value.exc_type == "RuntimeError" and "item 2" in str(failed.value)
        unencodable = pool.call_stream("st_unencodable", {})
        assert orjson.loads(await anext(unencodable)) == 1
        with pytest.raises(TaskFailed, match="not JSON-serialisable"):
            await anext(unencodable)
        assert (await pool.call("st_async_add", {"a": 1, "b": 1})).value["sum"] == 2


@on_uvloop
async def test_closing_a_stream_closes_the_generator_and_its_worker_takes_the_next_call(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    async with open_pool(workers=1, modules=STREAMS) as (pool, _):
        stream = pool.call_stream("st_endless", {"closed": str(closed)})
        assert orjson.loads(await anext(stream)) == "1"
        pid = stream.pid
        await stream.aclose()
        count, closer = (await wait_for_file(closed)).split()
        assert int(closer) == pid and int(count) <= 1 + WINDOW + 1
        assert (await pool.call("st_async_add", {"a": 1, "b": 1})).pid == pid  # not killed: the same worker
        assert pool.pids() == [pid]


@on_uvloop
async def test_a_consumer_cancelled_while_waiting_closes_the_generator_at_its_next_yield(tmp_path: Path) -> None:
    closed, gate = tmp_path / "closed", tmp_path / "gate"
    async with open_pool(workers=1, modules=STREAMS) as (pool, _):
        stream = pool.call_stream("st_endless", {"closed": str(closed), "gate": str(gate)})
        assert orjson.loads(await anext(stream)) == "1"
        pid = stream.pid
        waiting = asyncio.ensure_future(anext(stream))  # the generator waits for the gate: no item comes
        assert isinstance(stream, PoolStream)
        await wait_until(lambda: stream._call is not None and stream._call.wake is not None, 5, "the consumer to wait")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        open_gate(gate)  # it yields once more, sees the close and stops
        count, closer = (await wait_for_file(closed)).split()
        # Closed at the yield it reached: the first, if the close came before the worker asked for more.
        assert int(closer) == pid and int(count) in (1, 2)
        assert (await pool.call("st_async_add", {"a": 1, "b": 1})).pid == pid


@on_uvloop
async def test_a_consumer_that_stops_taking_items_stops_the_generator_a_window_ahead(tmp_path: Path) -> None:
    count, closed = tmp_path / "produced", tmp_path / "closed"
    async with open_pool(workers=1, modules=STREAMS) as (pool, _):
        stream = pool.call_stream("st_endless", {"closed": str(closed), "produced": str(count)})
        assert isinstance(stream, PoolStream)
        await anext(stream)
        taken = 1
        await wait_until(lambda: produced(count) >= WINDOW, 10, "the generator to fill the window")
        # The negative check: unchecked, an endless generator yields thousands of items in this time.
        await asyncio.sleep(0.3)
        assert produced(count) <= taken + WINDOW
        assert stream._call is not None and len(stream._call.items) <= WINDOW  # what the service holds
        stalled = produced(count)
        for _ in range(WINDOW):  # reading resumes it
            await anext(stream)
            taken += 1
        await wait_until(lambda: produced(count) > stalled + WINDOW // 2, 10, "the generator to go on")
        await asyncio.sleep(0.3)
        assert produced(count) <= taken + WINDOW
        await stream.aclose()
        await wait_for_file(closed)


@on_uvloop
async def test_a_worker_crash_mid_stream_raises_worker_crashed_after_the_items_before_it(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with open_pool(workers=1, modules=STREAMS) as (pool, _):
        stream = pool.call_stream("st_crash_after_first", {"gate": str(gate)})
        assert orjson.loads(await anext(stream)) == 1
        open_gate(gate)
        with pytest.raises(WorkerCrashed):
            await anext(stream)
        await stream.aclose()
        assert (await pool.call("st_async_add", {"a": 1, "b": 1})).value["sum"] == 2  # its replacement


@on_uvloop
async def test_the_timeout_covers_the_whole_stream(tmp_path: Path) -> None:
    async with open_pool(workers=1, modules=STREAMS) as (pool, _):
        stream = pool.call_stream("st_count", {"n": 3, "gate": str(tmp_path / "never")}, CallOptions(timeout=0.5))
        assert orjson.loads(await anext(stream)) == 0
        with pytest.raises(TaskTimeout):
            await anext(stream)


@on_uvloop
async def test_a_stream_closed_while_queued_never_runs(tmp_path: Path) -> None:
    gate, closed = tmp_path / "gate", tmp_path / "closed"
    async with open_pool(workers=1, modules=STREAMS) as (pool, _):
        busy = pool.call_stream("st_count", {"n": 2, "gate": str(gate)})
        await anext(busy)  # the only worker is taken
        queued = pool.call_stream("st_endless", {"closed": str(closed)})
        waiting = asyncio.ensure_future(anext(queued))
        await wait_until(lambda: pool.pending == 1, 5, "the second stream to queue")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert pool.pending == 0
        open_gate(gate)
        assert [orjson.loads(i) async for i in busy] == [1]
        assert (await pool.call("st_async_add", {"a": 1, "b": 1})).value["sum"] == 2
        assert not closed.exists()  # the closed stream never started


def test_an_executor_that_cannot_stream_refuses_with_streaming_unsupported() -> None:
    with pytest.raises(StreamingUnsupported, match="st_count"):
        Executor().call_stream("st_count", {})
