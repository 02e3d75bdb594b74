"""docs/reliability.md, the crash back-off row: "Timeouts, cancellations and recycling do not count
towards the back-off". The back-off starts after more than max(3, workers) unplanned deaths within
10 s and is always logged ("workers keep crashing ... waiting X s before the next restart"), so its
absence from the log means every replacement was started at once.

One pool of one worker (`max_tasks_per_worker=1`, so every finished call recycles its worker) goes
through many more planned restarts than the back-off allows crashes within a few seconds, with a
well-behaved call after each; then the same number of real crashes in that very pool must produce
the warning, which shows that the log is being read and that the pool does back off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from tests.support.pool_harness import on_uvloop, open_pool, wait_for_file, wait_until, whole
from workers.errors import TaskTimeout, WorkerCrashed
from workers.executor import CallOptions
from workers.local.pool import WorkerPool

ROUNDS = 6  # > max(3, workers): this many crashes in a row meet the back-off
BACK_OFF = "workers keep crashing"
NEXT_CALL_WITHIN = 10.0  # a replacement is live in milliseconds; this is only the test's patience


async def next_call_succeeds(pool: WorkerPool, value: int) -> float:
    """A well-behaved call right after a restart: it succeeds; the seconds it took."""
    started = time.monotonic()
    outcome = await asyncio.wait_for(pool.call("echo", {"value": value}), 30.0)
    assert outcome.value["value"] == value
    return time.monotonic() - started


@on_uvloop
async def test_timeouts_cancellations_and_recycling_never_meet_the_crash_back_off_but_crashes_do(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="procbridge.pool")
    async with open_pool(workers=1, max_tasks_per_worker=1) as (pool, watch):
        waits = []
        for i in range(ROUNDS):  # timeouts: each kills the worker
            with pytest.raises(TaskTimeout):
                await asyncio.wait_for(pool.call("nap", {"ms": 30_000}, CallOptions(timeout=0.2)), 30.0)
            waits.append(await next_call_succeeds(pool, i))  # and recycles the replacement
        for i in range(ROUNDS):  # cancellations of running calls: each kills the worker
            marker = tmp_path / f"running-{i}"
            running = asyncio.ensure_future(pool.call(
                "mark_then_wait", {"path": str(marker), "release": str(tmp_path / "never")},
                CallOptions(kill_on_cancel=True),
            ))
            await wait_for_file(marker, 15.0)
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            waits.append(await next_call_succeeds(pool, i))
        # the last call's worker retires after answering: wait for its exit to be counted
        await wait_until(lambda: pool.restarts["max_tasks"] == 2 * ROUNDS, 15.0, "the last recycle")
        assert pool.restarts == {"timeout": ROUNDS, "cancelled": ROUNDS, "max_tasks": 2 * ROUNDS}
        assert BACK_OFF not in caplog.text, caplog.text
        assert max(waits) < NEXT_CALL_WITHIN, waits
        await whole(pool, watch, timeout=15.0)

        # The control: as many real crashes in a row in the same pool do meet the back-off.
        for _ in range(ROUNDS):
            with pytest.raises(WorkerCrashed, match="exit code 3") as raised:
                await asyncio.wait_for(pool.call("hard_exit", {"code": 3}), 30.0)
            assert raised.value.pid is not None
            watch.seen.add(raised.value.pid)  # checked for leftovers when the pool closes
        assert pool.restarts["crashed"] == ROUNDS
        assert BACK_OFF in caplog.text, caplog.text
        await next_call_succeeds(pool, -1)
