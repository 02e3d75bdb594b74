"""An elastic pool (`PoolOptions(min_workers=MIN, workers=MAX)`, `--workers MIN..MAX`), with real worker
processes: it starts MIN, grows while calls wait (each new worker a fork of the worker parent), shrinks
back after `worker_idle` without work, never below MIN, does not flap under a steady load; a worker it
stops is never handed a call, exits for real, and is no restart; a crash is replaced in its active slot.

Timings are for a loaded 2-core machine: every wait polls a condition with a deadline of seconds, and
what must hold for a while (never below MIN) is checked on every poll of a bounded window."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.pool_harness import alive, on_uvloop, open_pool, wait_until
from workers.errors import WorkerCrashed
from workers.executor import Outcome
from workers.local import scaling
from workers.local.pool import PoolOptions, WorkerPool

IDLE = 0.5  # worker_idle of these pools: short, so a test sees a shrink; the deadlines below are far longer


async def held_calls(pool: WorkerPool, tmp_path: Path, n: int, name: str) -> tuple[list[asyncio.Future[Outcome]],
                                                                                  Path]:
    """`n` calls that each hold a worker until the gate opens, and the gate; returns once every one of
    them runs (each in a worker of its own: a worker runs one call at a time)."""
    gate = tmp_path / f"{name}.gate"
    markers = [tmp_path / f"{name}-{i}.marker" for i in range(n)]
    calls = [asyncio.ensure_future(pool.call("mark_then_wait", {"path": str(m), "release": str(gate)}))
             for m in markers]
    await wait_until(lambda: all(m.exists() for m in markers), 20, f"{n} calls running at once")
    assert len({m.read_text() for m in markers}) == n, "each call runs in a worker of its own"
    return calls, gate


async def gone(pid: int) -> None:
    """The process has really exited (reaped, or a zombie its parent has yet to reap)."""
    await wait_until(lambda: not alive(pid), 10, f"worker {pid} to exit")


@on_uvloop
async def test_it_grows_while_calls_wait_and_shrinks_back_to_min_when_idle(tmp_path: Path) -> None:
    async with open_pool(workers=3, min_workers=1, worker_idle=IDLE) as (pool, watch):
        first = watch.sample()
        assert (pool.size, pool.min_size, pool.max_size, pool.max_pending) == (1, 1, 3, 12)
        assert len(first) == 1 and [row.slot for row in pool.rows()] == [0]
        # A burst: three calls that hold their workers. One worker takes the first; the two that wait
        # start a worker each (no more: MAX is 3), and all three run at once.
        calls, gate = await held_calls(pool, tmp_path, 3, "burst")
        assert pool.size == 3 and pool.scaled == {"up": 2} and len(watch.sample()) == 3
        assert sorted(row.slot for row in pool.rows()) == [0, 1, 2]
        gate.write_text("go")
        outcomes = await asyncio.gather(*calls)
        assert all(o.value["released"] for o in outcomes)
        grown = watch.sample()
        # Idle for worker_idle: back to MIN, one worker stopped per tick; those really exit, and a
        # stop is no restart.
        await wait_until(lambda: pool.size == 1 and len(pool.pids()) == 1, 10, "the pool to shrink to 1")
        stopped = sorted(set(grown) - set(pool.pids()))
        assert len(stopped) == 2
        for pid in stopped:
            await gone(pid)
        assert pool.scaled == {"up": 2, "down": 2}
        assert pool.restarts == {} and pool.slot_restarts == {}
        assert len(pool.rows()) == 1 and pool.alive == 1
        # Never below MIN: the last worker stays, however long it idles (checked on every poll for
        # several idle periods, while the tick runs every 50 ms).
        (last,) = pool.pids()
        until = time.monotonic() + 4 * IDLE
        await wait_until(lambda: pool.size == 1 and pool.pids() == [last] and time.monotonic() > until, 10,
                         "several idle periods at MIN")
        assert pool.scaled == {"up": 2, "down": 2} and alive(last)
        assert (await pool.call("echo", {"value": 1})).pid == last


@on_uvloop
async def test_a_steady_load_does_not_grow_or_flap(tmp_path: Path) -> None:
    """Calls one after the other never wait, so the pool never grows for them; after a burst, the
    same steady load keeps reusing one worker (idle workers are taken last-in first-out) while the
    spare ones age out, and the one it uses is never stopped under it."""
    async with open_pool(workers=3, min_workers=1, worker_idle=IDLE) as (pool, _):
        for _ in range(30):
            await pool.call("nap", {"ms": 5})
        assert pool.scaled == {} and pool.size == 1
        calls, gate = await held_calls(pool, tmp_path, 3, "burst")
        gate.write_text("go")
        await asyncio.gather(*calls)
        assert pool.scaled == {"up": 2}
        pids: set[int] = set()
        until = time.monotonic() + 4 * IDLE  # the steady load outlasts several idle periods...

        async def steady() -> bool:
            pids.add((await pool.call("nap", {"ms": 5})).pid)
            return time.monotonic() > until and pool.size == 1  # ...and the spare workers' stops

        await wait_until(steady, 20, "the spare workers to stop under a steady load")
        assert pool.scaled == {"up": 2, "down": 2}, "no growth for calls that never wait, no flapping"
        assert len(pids) == 1 and pool.pids() == list(pids), "one worker carried it and stays"
        assert pool.restarts == {}


@on_uvloop
async def test_a_stopped_worker_is_never_handed_a_call(tmp_path: Path) -> None:
    """The scaler stops the worker on top of the idle stack, the very one the next call would take:
    calls made in the same loop turn go to the other worker, and the stopped one exits."""
    async with open_pool(workers=2, min_workers=1, worker_idle=60) as (pool, watch):
        calls, gate = await held_calls(pool, tmp_path, 2, "burst")
        gate.write_text("go")
        await asyncio.gather(*calls)
        for i in range(5):  # echo is known to be short now: calls pipeline behind one another, none waits
            await pool.call("echo", {"value": i})
        await wait_until(lambda: len(pool._idle) == 2, 10, "both workers idle")
        top = pool._idle[-1]
        scaler = pool._scaler
        assert scaler is not None
        scaler._stop(top, time.monotonic())
        outcomes = await asyncio.gather(*(pool.call("echo", {"value": i}) for i in range(3)))
        assert top.pid not in {o.pid for o in outcomes}
        await gone(top.pid)
        await wait_until(lambda: pool.pids() == [o.pid for o in outcomes[:1]], 10, "the stopped worker's exit seen")
        assert (pool.size, pool.scaled, pool.restarts) == (1, {"up": 1, "down": 1}, {})
        assert watch.sample() == [outcomes[0].pid]


@on_uvloop
async def test_a_crash_is_replaced_in_an_active_slot_and_counted_as_a_restart(tmp_path: Path) -> None:
    async with open_pool(workers=2, min_workers=1, worker_idle=60) as (pool, watch):
        with pytest.raises(WorkerCrashed):
            await pool.call("kill_self", {})
        await wait_until(lambda: pool.alive == 1, 10, "the MIN worker replaced")
        assert (pool.size, pool.restarts, pool.scaled) == (1, {"crashed": 1}, {})
        calls, gate = await held_calls(pool, tmp_path, 2, "burst")
        gate.write_text("go")
        await asyncio.gather(*calls)
        grown = watch.sample()
        assert pool.size == 2 and pool.scaled == {"up": 1}
        os.kill(grown[1], signal.SIGKILL)  # the worker the pool grew: its slot is active, so it is replaced
        await gone(grown[1])
        await wait_until(lambda: pool.alive == 2 and grown[1] not in pool.pids(), 10, "a replacement in slot 1")
        assert (pool.size, pool.restarts, pool.scaled) == (2, {"crashed": 2}, {"up": 1})


@on_uvloop
async def test_a_stopped_worker_that_does_not_exit_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scaling, "_EXIT_GRACE", 0.3)
    async with open_pool(workers=2, min_workers=1, worker_idle=60) as (pool, _):
        calls, gate = await held_calls(pool, tmp_path, 2, "burst")
        gate.write_text("go")
        await asyncio.gather(*calls)
        await wait_until(lambda: len(pool._idle) == 2, 10, "both workers idle")
        stuck = pool._workers[1]
        assert stuck is not None and pool._scaler is not None
        os.kill(stuck.pid, signal.SIGSTOP)  # it cannot read the EOF that tells it to stop
        pool._scaler._stop(stuck, time.monotonic())
        await gone(stuck.pid)
        await wait_until(lambda: pool._workers[1] is None, 10, "its exit seen")
        assert pool.size == 1 and pool.scaled == {"up": 1, "down": 1} and pool.restarts == {}


def test_min_workers_must_be_between_one_and_workers() -> None:
    for bad in (0, 3):
        with pytest.raises(ValueError, match="min_workers at most workers"):
            WorkerPool(PoolOptions(workers=2, min_workers=bad))
    fixed = WorkerPool(PoolOptions(workers=2, min_workers=2))
    assert fixed._scaler is None and (fixed.size, fixed.min_size, fixed.max_size) == (2, 2, 2)
    assert WorkerPool(PoolOptions(workers=2))._scaler is None
