"""Large payloads through shared memory (workers/shm.py and the pool): segments are reused, every
path releases them, and /dev/shm is checked for real. Each test looks only at the names of its own
pool (they start with `pool.prefix`: other test processes may be using /dev/shm at the same time).

Faults are real: SIGKILL of a worker that holds a view, a timeout kill, a task that raises, a caller
that goes away, and closing the pool with a call still holding a segment."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.pool_harness import alive, on_uvloop, open_pool, wait_for_file, wait_until
from workers.errors import TaskFailed, TaskTimeout, WorkerCrashed
from workers.executor import CallOptions
from workers.local.pool import WorkerPool
from workers.shm import Lease, SegmentPool, size_class

SHM = Path("/dev/shm")
TASKS = ("tests.support.shm_tasks",)
MIB = 1024 * 1024


def ours(prefix: str) -> set[str]:
    """The names in /dev/shm that start with `prefix`."""
    return {p.name for p in SHM.glob(f"{prefix}*")}


def segments(pool: WorkerPool) -> SegmentPool:
    assert pool.segments is not None, "shared-memory payloads are off"
    return pool.segments


def settled(pool: WorkerPool) -> bool:
    """Nothing is leased, and /dev/shm holds exactly the table and the free (reusable) segments."""
    segs = segments(pool)
    return segs.stats()["leased_segments"] == 0 and ours(pool.prefix) == {f"{pool.prefix}table"} | segs.free_names()


def mapped(pid: int, prefix: str) -> set[str]:
    """The segments of this pool that process `pid` has mapped now."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {line.split("/dev/shm/", 1)[1].strip() for line in text.splitlines() if f"/dev/shm/{prefix}" in line}


async def filled(pool: WorkerPool, data: bytes) -> Lease:
    """A lease holding `data`, as the HTTP handler makes one from a request body."""
    lease = await pool.payload_buffer(len(data))
    assert lease is not None
    lease.buffer[: len(data)] = data
    lease.length = len(data)
    return lease


# -- the segment pool on its own ---------------------------------------------------------------------


def test_size_classes_have_little_slack_and_fit() -> None:
    for n in (1, 4096, 65536, 65537, 300_000, MIB, MIB + 1, 10 * MIB, 65 * MIB, 128 * MIB, 200 * MIB + 3):
        c = size_class(n)
        assert c >= n and c % 4096 == 0
        assert c <= max(64 * 1024, n * 1.25 + 4096)
    assert size_class(128 * MIB) == 128 * MIB


@on_uvloop
async def test_segments_are_reused_and_always_unlinked_in_the_end() -> None:
    pool = SegmentPool(threshold=1024, budget=64 * MIB, keep_per_class=2)
    try:
        first = await pool.lease(3 * MIB)
        assert first is not None and first.capacity >= 3 * MIB and len(first) == 3 * MIB
        name = first.name
        assert ours(pool.prefix) == {name}
        first.buffer[:5] = b"hello"
        first.release()
        assert pool.stats()["leased_segments"] == 0 and pool.free_names() == {name}
        again = await pool.lease(3 * MIB - 100)  # same size class: the same segment
        assert again is not None and again.name == name and again.tobytes()[:5] == b"hello"
        again.retain()
        again.release()
        assert not again.released and pool.stats()["leased_segments"] == 1
        again.release()
        assert again.released
        # three at once: a third segment is created; only keep_per_class of them stay once freed
        many = [await pool.lease(3 * MIB) for _ in range(3)]
        assert all(m is not None for m in many) and len(ours(pool.prefix)) == 3
        for m in many:
            assert m is not None
            m.release()
        assert len(pool.free_names()) == 2 and ours(pool.prefix) == pool.free_names()
        # idle ones go after `idle` seconds (the pool's timer calls trim)
        pool.trim(now=float("inf"))
        assert pool.free_names() == set() and ours(pool.prefix) == set()
        # over the budget: refused (the caller uses the pipe), counted
        assert await pool.lease(65 * MIB) is None
        assert pool.payloads[("in", "pipe")] == 1 and pool.payloads[("in", "shm")] == 5
        held = await pool.lease(MIB)
        assert held is not None
    finally:
        await pool.aclose()
    assert ours(pool.prefix) == set(), "aclose left segments in /dev/shm"
    held.release()  # released after the close: nothing to do, and no error
    assert await pool.lease(MIB) is None


@on_uvloop
async def test_budget_makes_room_by_dropping_free_segments_first() -> None:
    pool = SegmentPool(threshold=1024, budget=10 * MIB)
    try:
        a = await pool.lease(4 * MIB)
        assert a is not None
        a.release()
        assert pool.free_names() == {a.name}
        b = await pool.lease(8 * MIB)  # does not fit beside the free 4 MiB one: that one goes
        assert b is not None and pool.free_names() == set() and ours(pool.prefix) == {b.name}
        assert await pool.lease(4 * MIB) is None  # the 8 MiB one is leased: no room
        b.release()
    finally:
        await pool.aclose()
    assert ours(pool.prefix) == set()


# -- through the worker pool ---------------------------------------------------------------------------


@on_uvloop
async def test_a_task_reads_the_segment_in_place_and_a_bytes_result_comes_back_through_one() -> None:
    async with open_pool(workers=2, modules=TASKS) as (pool, _):
        data = os.urandom(3 * MIB)
        lease = await filled(pool, data)
        seen = (await pool.call("describe", {"data": lease})).value
        lease.release()
        assert seen["type"] == "memoryview" and seen["readonly"] is True
        assert seen["size"] == len(data) and seen["sha256"] == hashlib.sha256(data).hexdigest()
        # the same segment was mapped in the worker that ran it (and stays mapped, for reuse)
        assert lease.name in mapped(seen["pid"], pool.prefix)
        # a task annotated `bytes` gets bytes; plain bytes above the threshold travel in a segment too
        got = (await pool.call("describe_bytes", {"data": data})).value
        assert got == {"type": "bytes", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        # results: bytes by default (copied out, segment released), a Lease when asked for
        assert (await pool.call("echo_bytes", {"data": data})).value == data
        shared = await pool.call("echo_copy", {"data": data}, CallOptions(shared_result=True))
        assert isinstance(shared.value, Lease) and shared.value.tobytes() == data
        shared.value.release()
        counts = segments(pool).payloads
        assert counts[("in", "shm")] == 4 and counts[("out", "shm")] == 2 and counts[("in", "pipe")] == 0
        assert settled(pool)
        # small payloads stay inline: no lease offered, no segment involved
        assert await pool.payload_buffer(1000) is None
        small = (await pool.call("describe", {"data": b"tiny"})).value
        assert small["type"] == "memoryview" and small["size"] == 4
        assert (await pool.call("make_bytes", {"size": 100})).value == bytes([7]) * 100
        assert segments(pool).payloads == counts
        # reuse: the same few segments, whatever the number of calls
        before = ours(pool.prefix)
        for _ in range(10):
            lease = await filled(pool, data)
            out = await pool.call("echo_bytes", {"data": lease}, CallOptions(shared_result=True))
            lease.release()
            assert out.value.tobytes() == data
            out.value.release()
        assert ours(pool.prefix) == before and settled(pool)


@on_uvloop
async def test_many_concurrent_payloads_never_mix() -> None:
    async with open_pool(workers=2, modules=TASKS, max_pending=100) as (pool, _):
        blobs = [os.urandom(MIB + i * 4099) for i in range(24)]

        async def one(blob: bytes) -> bytes:
            lease = await filled(pool, blob)
            try:
                out = await pool.call("echo_bytes", {"data": lease}, CallOptions(shared_result=True))
            finally:
                lease.release()
            try:
                return out.value.tobytes()
            finally:
                out.value.release()

        for _ in range(3):
            assert await asyncio.gather(*(one(b) for b in blobs)) == blobs
        assert settled(pool)


@on_uvloop
async def test_sigkill_of_a_worker_holding_a_view_releases_its_segment(tmp_path: Path) -> None:
    async with open_pool(workers=2, modules=TASKS) as (pool, watch):
        marker = tmp_path / "holding"
        await pool.call("describe", {"data": os.urandom(2 * MIB)})  # warm: the segment this size needs
        before = ours(pool.prefix)
        lease = await filled(pool, os.urandom(2 * MIB))
        assert ours(pool.prefix) == before, "the free segment was reused"
        call = asyncio.ensure_future(pool.call("hold", {"data": lease, "marker": str(marker)}))
        pid = int(await wait_for_file(marker))
        lease.release()  # the handler's own reference: the call still holds the segment
        assert lease.name in mapped(pid, pool.prefix), "the worker holds a view of the segment"
        assert segments(pool).stats()["leased_segments"] == 1
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed):
            await call
        await wait_until(lambda: settled(pool), 5, "the segment to be released")
        assert ours(pool.prefix) == before
        assert not alive(pid)
        await wait_until(lambda: pool.alive == pool.size, 5, "the replacement")
        watch.sample()
        # and the pool goes on using shared memory
        data = os.urandom(2 * MIB)
        assert (await pool.call("echo_bytes", {"data": data})).value == data
        assert settled(pool)


@on_uvloop
async def test_timeout_kill_releases_the_segments(tmp_path: Path) -> None:
    async with open_pool(workers=1, modules=TASKS) as (pool, watch):
        await pool.call("describe", {"data": os.urandom(2 * MIB)})
        before = ours(pool.prefix)
        lease = await filled(pool, os.urandom(2 * MIB))
        with pytest.raises(TaskTimeout):
            await pool.call("hold", {"data": lease, "marker": str(tmp_path / "m")}, CallOptions(timeout=0.3))
        lease.release()
        await wait_until(lambda: settled(pool), 5, "the segment to be released after the kill")
        assert ours(pool.prefix) == before
        assert pool.restarts["timeout"] == 1
        await wait_until(lambda: pool.alive == 1, 5, "the replacement")
        watch.sample()


@on_uvloop
async def test_a_task_error_releases_the_segment() -> None:
    async with open_pool(workers=1, modules=TASKS) as (pool, _):
        await pool.call("describe", {"data": os.urandom(2 * MIB)})
        before = ours(pool.prefix)
        lease = await filled(pool, os.urandom(2 * MIB))
        with pytest.raises(TaskFailed, match="bad payload"):
            await pool.call("fail_holding", {"data": lease})
        assert segments(pool).stats()["leased_segments"] == 1  # ours, not the call's
        lease.release()
        assert settled(pool) and ours(pool.prefix) == before


@on_uvloop
async def test_a_result_nobody_waits_for_any_more_is_released(tmp_path: Path) -> None:
    async with open_pool(workers=1, modules=TASKS) as (pool, _):
        marker, gate = tmp_path / "m", tmp_path / "g"
        call = asyncio.ensure_future(
            pool.call("gated_bytes", {"size": 3 * MIB, "marker": str(marker), "gate": str(gate)},
                      CallOptions(shared_result=True))
        )
        await wait_for_file(marker)
        call.cancel()  # the client went away; the task runs on (the default)
        with pytest.raises(asyncio.CancelledError):
            await call
        gate.write_text("go")
        await wait_until(lambda: segments(pool).payloads[("out", "shm")] == 1, 5, "the result to come back")
        await wait_until(lambda: settled(pool), 5, "the unclaimed result to be released")


@on_uvloop
async def test_a_worker_killed_after_its_result_segment_was_granted_releases_it(tmp_path: Path) -> None:
    async with open_pool(workers=1, modules=TASKS) as (pool, watch):
        granted: list[Any] = []
        broker = pool._broker
        assert broker is not None
        original = broker.send_grant

        def grant_then_kill(w: Any, call_id: int, call: Any, lease: Lease | None) -> None:
            original(w, call_id, call, lease)
            granted.append(lease)
            os.kill(w.pid, signal.SIGKILL)  # while it writes the result, or just before

        broker.send_grant = grant_then_kill  # type: ignore[method-assign]
        with pytest.raises(WorkerCrashed):
            await pool.call("make_bytes", {"size": 8 * MIB})
        assert granted and granted[0] is not None and granted[0].released
        await wait_until(lambda: settled(pool), 5, "the granted segment to be released")
        broker.send_grant = original  # type: ignore[method-assign]
        await wait_until(lambda: pool.alive == 1, 5, "the replacement")
        watch.sample()
        assert (await pool.call("make_bytes", {"size": 2 * MIB, "fill": 1})).value == bytes([1]) * 2 * MIB


@on_uvloop
async def test_closing_the_pool_unlinks_everything_even_segments_in_use(tmp_path: Path) -> None:
    async with open_pool(workers=2, modules=TASKS) as (pool, _):
        prefix = pool.prefix
        assert (await pool.call("make_bytes", {"size": 2 * MIB})).value == bytes([7]) * 2 * MIB  # a free one
        lease = await filled(pool, os.urandom(2 * MIB))
        marker = tmp_path / "m"
        call = asyncio.ensure_future(pool.call("hold", {"data": lease, "marker": str(marker)}))
        await wait_for_file(marker)
        # a result held by us
        kept = await pool.call("echo_copy", {"data": b"x" * (MIB)}, CallOptions(shared_result=True))
        assert len(ours(prefix)) >= 4  # the table, a free segment, the held argument, the held result
    # the pool is closed here (open_pool also checked the table and the worker processes)
    assert ours(prefix) == set(), "closing the pool left segments in /dev/shm"
    with pytest.raises(Exception):  # noqa: B017 - PoolClosed, 503 for an HTTP caller
        await call
    assert kept.value.tobytes() == b"x" * MIB  # still readable by whoever holds it...
    kept.value.release()  # ...and released without error after the close
    lease.release()


@on_uvloop
async def test_workers_unmap_segments_the_pool_unlinks() -> None:
    async with open_pool(workers=1, modules=TASKS) as (pool, _):
        seen = (await pool.call("describe", {"data": os.urandom(2 * MIB)})).value
        assert mapped(seen["pid"], pool.prefix) - {f"{pool.prefix}table"}, "the worker mapped the segment"
        segments(pool).drop_free()
        assert ours(pool.prefix) == {f"{pool.prefix}table"}
        # the worker was told: its mapping goes, so no memory stays pinned behind the unlinked name
        await wait_until(lambda: mapped(seen["pid"], pool.prefix) <= {f"{pool.prefix}table"}, 5, "the unmap")


@on_uvloop
async def test_map_chunks_carry_binary_items_both_ways() -> None:
    async with open_pool(workers=2, modules=TASKS) as (pool, _):
        blobs = [os.urandom(MIB + i) for i in range(3)]
        results = await pool.call_chunk("describe_bytes", [{"data": b} for b in blobs] + [{"data": b"small"}])
        assert [r.value for r in results] == [  # type: ignore[union-attr]
            b'{"type":"bytes","size":%d,"sha256":"%s"}' % (len(b), hashlib.sha256(b).hexdigest().encode())
            for b in [*blobs, b"small"]
        ]
        made = await pool.call_chunk("make_bytes", [{"size": MIB, "fill": 1}, {"size": 10}, {"size": 2 * MIB}])
        assert [r.value for r in made] == [bytes([1]) * MIB, bytes([7]) * 10, bytes([7]) * 2 * MIB]  # type: ignore[union-attr]
        counts = segments(pool).payloads
        assert counts[("in", "shm")] == 3 and counts[("out", "shm")] == 2
        assert settled(pool)


@on_uvloop
async def test_the_executor_api_gets_large_bytes_results_through_segments_too() -> None:
    from tests.support import shm_tasks

    loop = asyncio.get_running_loop()
    async with open_pool(workers=1, modules=TASKS) as (pool, _):
        assert await loop.run_in_executor(pool, shm_tasks.make_bytes, 3 * MIB, 5) == bytes([5]) * 3 * MIB
        assert segments(pool).payloads[("out", "shm")] == 1
        assert settled(pool)


@on_uvloop
async def test_without_room_in_shared_memory_payloads_go_through_the_pipe(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="procbridge.shm")
    async with open_pool(workers=1, modules=TASKS, shm_budget=MIB, shm_need=20 * MIB) as (pool, _):
        assert "shm_size" in caplog.text, "the start-up warning names the fix"
        data = os.urandom(4 * MIB)
        assert await pool.payload_buffer(len(data)) is None
        seen = (await pool.call("describe", {"data": data})).value
        assert seen["type"] == "memoryview" and seen["sha256"] == hashlib.sha256(data).hexdigest()
        assert (await pool.call("echo_bytes", {"data": data})).value == data
        counts = segments(pool).payloads
        assert counts[("in", "pipe")] == 2 and counts[("out", "pipe")] == 1 and counts[("in", "shm")] == 0
        assert ours(pool.prefix) == {f"{pool.prefix}table"}
    async with open_pool(workers=1, modules=TASKS, shm_budget=0) as (pool, _):
        assert pool.segments is None and pool.shm_threshold is None
        assert (await pool.call("echo_bytes", {"data": data})).value == data
        assert ours(pool.prefix) == {f"{pool.prefix}table"}
