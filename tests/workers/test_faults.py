"""The fault catalogue: real faults in real worker processes, and what each may cost.

One table (`CATALOGUE`) lists every fault and its price: the exception the culprit call gets, the
restart it causes (or that the worker lives on), and always that the calls around it succeed and
that the pool ends whole. Then the behaviours around faults: back-off, recycling, backpressure,
abandoned calls, drain, and a randomized soak.

Every culprit is the task `fault` of tests/support/fault_tasks.py: it writes its pid, waits for a
gate file, then misbehaves. The test fills the pool with bystander calls (some of them pipelined
into the culprit's own window, behind it) before it opens the gate, so each fault happens with
calls in flight on both workers and calls waiting behind it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.fault_tasks import MIB
from tests.support.pool_harness import (
    alive,
    gate_files,
    on_uvloop,
    open_gate,
    open_pool,
    wait_for_file,
    wait_until,
    whole,
)
from workers.errors import Overloaded, PoolClosed, TaskFailed, TaskTimeout, WorkerCrashed
from workers.executor import CallOptions
from workers.local.pool import WorkerPool

BYSTANDERS = 10  # short calls: some pipelined behind the culprit, the others in the other worker's window or queued


@dataclass(frozen=True)
class Fault:
    """One row of the catalogue: a fault and what it must cost."""

    kind: str  # the `fault` task's kind
    error: type[Exception]  # what the culprit call raises
    restart: str | None  # the restart reason it causes; None: the worker lives on
    exc_type: str | None = None  # TaskFailed: the exception type reported
    message: str = ""  # a regex the error's text must match
    external_kill: bool = False  # the test SIGKILLs the busy worker from outside
    call_timeout: float | None = None
    encode_json: bool = False
    options: dict[str, Any] = field(default_factory=dict)


CATALOGUE = {
    "sigkill-from-outside": Fault("wait_kill", WorkerCrashed, "crashed", message="killed by SIGKILL",
                                  external_kill=True),
    "sigkill-self": Fault("kill_self", WorkerCrashed, "crashed", message="killed by SIGKILL"),
    "segfault": Fault("segfault", WorkerCrashed, "crashed", message="killed by SIGSEGV"),
    "os-exit": Fault("os_exit", WorkerCrashed, "crashed", message="exit code 3"),
    "memory-blow-up": Fault("blow_up", WorkerCrashed, "max_memory", message="killed by SIGKILL",
                            options={"max_worker_memory": 192 * MIB}),
    "timeout-of-the-call": Fault("spin_forever", TaskTimeout, "timeout", message="timeout of 1 s",
                                 call_timeout=1.0),
    "timeout-of-the-pool": Fault("spin_forever", TaskTimeout, "timeout", message="timeout of 1 s",
                                 options={"task_timeout": 1.0}),
    "sys-exit": Fault("sys_exit", TaskFailed, None, exc_type="SystemExit"),
    "sys-exit-with-message": Fault("sys_exit_msg", TaskFailed, None, exc_type="SystemExit", message="bye"),
    "keyboard-interrupt": Fault("keyboard_interrupt", TaskFailed, None, exc_type="KeyboardInterrupt"),
    "exception-with-required-init-args": Fault("needs_two", TaskFailed, None,
                                               exc_type="tests.support.fault_tasks.NeedsTwo", message="needs 1 and 2"),
    "exception-holding-a-lock": Fault("holds_lock", TaskFailed, None,
                                      exc_type="tests.support.fault_tasks.HoldsLock", message="a lock inside"),
    "result-that-will-not-pickle": Fault("return_lock", TaskFailed, None, exc_type="TypeError",
                                         message="cannot be sent back"),
    "result-that-will-not-encode-as-json": Fault("return_lock", TaskFailed, None, exc_type="TypeError",
                                                 message="not JSON-serialisable", encode_json=True),
    "result-the-service-cannot-unpickle": Fault("return_needs_two", TaskFailed, None, exc_type="TypeError",
                                                message="cannot be decoded by the service"),
    "result-whose-unpickling-calls-sys-exit": Fault("return_exit_on_load", TaskFailed, None,
                                                    exc_type="SystemExit", message="cannot be decoded"),
    "result-whose-pickling-raises-sys-exit": Fault("return_explosive", TaskFailed, None, exc_type="SystemExit",
                                                   message="cannot be sent back"),
}


async def _warm_up(pool: WorkerPool) -> None:
    """Run the culprit's task and the bystanders' task harmlessly a few times on every worker, so
    the pool counts both as short and pipelines bystanders behind the culprit. On a loaded machine a
    worker descheduled mid-task makes one run look long, so it goes on (a bounded number of rounds)
    until the pool's moving averages (what its dispatch reads) are well under its "short" line."""
    for _ in range(200):
        await asyncio.gather(*(pool.call("fault", {"kind": "none"}) for _ in range(pool.size)))
        await asyncio.gather(*(pool.call("echo", {"value": -1}) for _ in range(pool.size)))
        if all(pool._averages.get(name, 1.0) < 0.001 for name in ("fault", "echo")):
            return
    raise AssertionError(f"the tasks never looked short to the pool: {pool._averages}")


@pytest.mark.parametrize("fault", CATALOGUE.values(), ids=CATALOGUE.keys())
@on_uvloop
async def test_fault_costs_only_its_own_call(fault: Fault, tmp_path: Path) -> None:
    async with open_pool(workers=2, max_pending=64, **fault.options) as (pool, watch):
        pids_before = set(await whole(pool, watch))
        await _warm_up(pool)
        marker, gate = gate_files(tmp_path, "culprit")
        submitted_at = time.monotonic()
        culprit = asyncio.ensure_future(pool.call(
            "fault", {"kind": fault.kind, "marker": str(marker), "gate": str(gate)},
            CallOptions(timeout=fault.call_timeout, encode_json=fault.encode_json),
        ))
        culprit_pid = int(await wait_for_file(marker))
        (other_pid,) = pids_before - {culprit_pid}
        # In one loop turn (tasks created together start together): a slower call, which the idle other
        # worker takes (a call not known to be short never has one pipelined behind it), then short
        # calls, pipelined behind the culprit (the pool's queue is empty, no worker is idle, and the
        # other worker's call is long), then more slow calls, which wait in the queue.
        slow = [asyncio.ensure_future(pool.call("nap", {"ms": 40}))]
        quick = [asyncio.ensure_future(pool.call("echo", {"value": i})) for i in range(BYSTANDERS)]
        slow += [asyncio.ensure_future(pool.call("nap", {"ms": 40})) for _ in range(11)]
        await wait_until(lambda: pool.inflight().get(culprit_pid, 0) > 1 and pool.pending > 0, 30.0,
                         "calls queued behind the culprit and in the pool's queue")
        assert pool.inflight()[other_pid] > 0 and pool.pending > 0, "the other worker is busy, calls wait"

        if fault.external_kill:
            os.kill(culprit_pid, signal.SIGKILL)
        else:
            open_gate(gate)
        faulted_at = time.monotonic()
        with pytest.raises(fault.error, match=fault.message or None) as raised:
            await asyncio.wait_for(culprit, 30.0)
        answered_at = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*quick), 30.0)
        naps = await asyncio.wait_for(asyncio.gather(*slow), 30.0)

        # the culprit's price
        if fault.exc_type is not None:
            assert isinstance(raised.value, TaskFailed) and raised.value.exc_type == fault.exc_type
        if isinstance(raised.value, WorkerCrashed):
            assert raised.value.pid == culprit_pid
            if fault.external_kill or fault.kind != "blow_up":  # a blow-up dies when the ceiling is met
                # docs/reliability.md: "within a second"; asserted with a wide margin (a loaded CI)
                assert answered_at - faulted_at < 10.0, "answered soon after the death, not at a deadline"
        if isinstance(raised.value, TaskTimeout):  # its deadline: 1 s after it started, after it was submitted
            assert answered_at - submitted_at >= 1.0, "not before the deadline"
            assert answered_at - submitted_at < 1.0 + 10.0, "soon after the deadline (the 30 s wait is not it)"
        # nobody else paid
        assert [r.value["value"] for r in results] == list(range(BYSTANDERS))
        assert all(n.value["ms"] == 40 for n in naps)
        served_by = {r.value["pid"] for r in results} | {n.pid for n in naps}
        assert other_pid in served_by
        if fault.restart is None:
            assert pool.restarts == {}, "the worker lived on"
            assert culprit_pid in served_by, "the same worker served the calls queued behind the culprit"
            assert set(await whole(pool, watch)) == pids_before
        else:
            assert pool.restarts == {fault.restart: 1}
            assert not alive(culprit_pid), "the culprit's process is gone"
            assert culprit_pid not in served_by, "calls queued behind the culprit ran elsewhere"
            pids_after = set(await whole(pool, watch, timeout=15.0))  # replaced (promised: at once; margin for CI)
            assert culprit_pid not in pids_after and other_pid in pids_after
        # and the pool serves as before
        again = await asyncio.gather(*(pool.call("echo", {"value": i}) for i in range(20)))
        assert [r.value["value"] for r in again] == list(range(20))


@on_uvloop
async def test_a_call_that_finished_just_before_a_crash_never_runs_twice(tmp_path: Path) -> None:
    """A worker coalesces results of very short calls for up to ~1 ms; if it dies in that moment the
    result of a call that did run is lost. The pool knows from the table's task count that it ran:
    it answers WorkerCrashed instead of running it again (at most once, never twice)."""
    ledger = tmp_path / "ledger"
    async with open_pool(workers=1) as (pool, watch):
        for _ in range(20):  # both tasks become short, in the pool and in the worker
            await pool.call("fault", {"kind": "none"})
            await pool.call("append_pid", {"path": str(tmp_path / "warm")})
        # one loop step: the first goes to the idle worker, the crash is pipelined behind it
        first = asyncio.ensure_future(pool.call("append_pid", {"path": str(ledger)}))
        crash = asyncio.ensure_future(pool.call("fault", {"kind": "os_exit"}))
        with pytest.raises(WorkerCrashed):
            await crash
        try:
            answer: object = (await first).value
        except WorkerCrashed as exc:
            answer = exc
        await whole(pool, watch)
        await pool.call("echo", {"value": "after"})
        lines = ledger.read_text().splitlines()
        assert len(lines) == 1, f"the call ran {len(lines)} times"
        assert answer == int(lines[0]) or isinstance(answer, WorkerCrashed), answer
        assert pool.restarts == {"crashed": 1}


# -- crash back-off -------------------------------------------------------------------------------


@on_uvloop
async def test_a_task_that_crashes_every_worker_meets_a_back_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="procbridge.pool")
    crashes = 6
    async with open_pool(workers=1) as (pool, watch):
        crashed_pids = set()
        for _ in range(crashes):
            with pytest.raises(WorkerCrashed, match="exit code 3") as raised:
                await asyncio.wait_for(pool.call("hard_exit", {"code": 3}), 15.0)
            crashed_pids.add(raised.value.pid)
            watch.seen.add(raised.value.pid)
        # one replacement per crash, no more: the crashing call is never retried on its own
        assert pool.restarts == {"crashed": crashes}
        delays = [float(m) for m in re.findall(r"waiting ([\d.]+) s before the next restart", caplog.text)]
        assert len(delays) == crashes - 3, caplog.text  # the first three restart at once
        assert delays == sorted(delays) and delays[-1] > delays[0], "the back-off grows"
        # a well-behaved call made during the back-off waits for the replacement, then succeeds
        ok = await asyncio.wait_for(pool.call("echo", {"value": "after"}), 15.0)
        assert ok.value["value"] == "after"
        assert len(crashed_pids) == crashes, "each crash took its own worker"
        (last,) = await whole(pool, watch, timeout=15.0)
        assert ok.pid == last and last not in crashed_pids


# -- recycling -----------------------------------------------------------------------------------


@on_uvloop
async def test_max_tasks_per_worker_replaces_the_worker_between_tasks() -> None:
    async with open_pool(workers=1, max_tasks_per_worker=3) as (pool, watch):
        pids = []
        for i in range(10):
            outcome = await pool.call("echo", {"value": i})
            assert outcome.value["value"] == i
            pids.append(outcome.pid)
        assert [len(set(pids[k : k + 3])) for k in range(0, 9, 3)] == [1, 1, 1]
        assert len(set(pids)) == 4, pids  # a new worker after every third task
        await whole(pool, watch)
        assert pool.restarts == {"max_tasks": 3}


@on_uvloop
async def test_a_pool_whose_only_worker_is_recycled_stays_ready() -> None:
    """Between a worker's retirement and its replacement being ready, the pool still counts as
    ready (calls queue meanwhile), so /readyz does not blink 503 at every recycle."""
    async with open_pool(workers=1, max_tasks_per_worker=1) as (pool, watch):
        for i in range(8):
            outcome = await pool.call("echo", {"value": i})
            assert outcome.value["value"] == i
            assert pool.alive + pool.replacing >= 1, (pool.alive, pool.replacing)
        await whole(pool, watch)
        assert pool.replacing == 0


@on_uvloop
async def test_recycling_under_load_fails_no_call() -> None:
    async with open_pool(workers=2, max_tasks_per_worker=5, max_pending=200) as (pool, watch):
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(pool.call("echo", {"value": i}) for i in range(120))), 60.0
        )
        assert [o.value["value"] for o in outcomes] == list(range(120))
        per_pid: dict[int, int] = {}
        for o in outcomes:
            per_pid[o.pid] = per_pid.get(o.pid, 0) + 1
        assert max(per_pid.values()) <= 5
        await whole(pool, watch)
        assert pool.restarts["max_tasks"] >= 120 // 5 - 2
        assert set(pool.restarts) == {"max_tasks"}


@on_uvloop
async def test_a_leaking_task_gets_its_worker_replaced_once_rss_passes_the_limit() -> None:
    limit = 160 * MIB
    step_mb = 8
    async with open_pool(workers=2, max_worker_memory=limit) as (pool, watch):
        held: dict[int, int] = {}
        for _ in range(40):  # bounded: the first replacement comes after about 16 calls
            batch = await asyncio.gather(*(pool.call("leak", {"mb": step_mb}) for _ in range(2)))
            for o in batch:
                held[o.pid] = max(held.get(o.pid, 0), o.value["held_mb"])
            if pool.restarts["max_memory"] >= 2:
                break
        assert pool.restarts["max_memory"] >= 2, held
        assert set(pool.restarts) == {"max_memory"}, "recycled, never killed mid-task"
        # each worker stopped taking calls as soon as what it held passed the limit
        assert max(held.values()) <= limit // MIB + step_mb, held
        await whole(pool, watch)


# -- backpressure ----------------------------------------------------------------------------------


@on_uvloop
async def test_beyond_max_pending_calls_are_refused_at_once(tmp_path: Path) -> None:
    async with open_pool(workers=1, max_pending=2) as (pool, _):
        marker, gate = gate_files(tmp_path, "busy")
        busy = asyncio.ensure_future(pool.call("mark_then_wait", {"path": str(marker), "release": str(gate)}))
        await wait_for_file(marker)
        waiting = [asyncio.ensure_future(pool.call("nap", {"ms": 1})) for _ in range(2)]
        await wait_until(lambda: pool.pending == 2, what="two waiting calls")
        with pytest.raises(Overloaded):
            await pool.call("nap", {"ms": 1})
        refused = pool.submit(os.getpid)  # the executor API is refused the same way
        assert isinstance(refused.exception(timeout=0), Overloaded)
        assert pool.pending == 2
        assert not busy.done(), "refused while the worker was still busy"
        open_gate(gate)
        assert (await busy).value["released"]
        assert all(o.value["ms"] == 1 for o in await asyncio.gather(*waiting))


# -- abandoned calls -------------------------------------------------------------------------------


@on_uvloop
async def test_a_cancelled_queued_call_never_runs(tmp_path: Path) -> None:
    async with open_pool(workers=1) as (pool, _):
        marker, gate = gate_files(tmp_path, "busy")
        busy = asyncio.ensure_future(pool.call("mark_then_wait", {"path": str(marker), "release": str(gate)}))
        await wait_for_file(marker)
        never = tmp_path / "never-ran"
        queued = asyncio.ensure_future(pool.call("mark", {"path": str(never)}))
        behind = asyncio.ensure_future(pool.call("echo", {"value": "behind"}))
        await wait_until(lambda: pool.pending == 2, what="two queued calls")
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert pool.pending == 1, "dropped from the queue at once"
        open_gate(gate)
        await busy
        assert (await behind).value["value"] == "behind"  # queued after it: had it stayed, it ran first
        assert not never.exists(), "the abandoned call ran"
        assert pool.restarts == {}


@on_uvloop
async def test_a_cancelled_running_call_is_left_to_finish_by_default(tmp_path: Path) -> None:
    async with open_pool(workers=1) as (pool, watch):
        marker, gate = gate_files(tmp_path, "running")
        finished = tmp_path / "finished"
        running = asyncio.ensure_future(pool.call(
            "mark_then_wait", {"path": str(marker), "release": str(gate), "finished": str(finished)}
        ))
        pid = int(await wait_for_file(marker))
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        open_gate(gate)
        await wait_for_file(finished)
        assert (await pool.call("echo", {"value": 1})).pid == pid, "the same worker goes on"
        assert pool.restarts == {} and alive(pid)
        await whole(pool, watch)


@on_uvloop
async def test_cancel_running_kills_the_worker_of_an_abandoned_call(tmp_path: Path) -> None:
    async with open_pool(workers=1, cancel_running=True) as (pool, watch):
        marker, gate = gate_files(tmp_path, "running")
        finished = tmp_path / "finished"
        running = asyncio.ensure_future(pool.call(
            "mark_then_wait", {"path": str(marker), "release": str(gate), "finished": str(finished)}
        ))
        pid = int(await wait_for_file(marker))
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await wait_until(lambda: not alive(pid), 15.0, "the worker to be killed")
        open_gate(gate)
        assert (await pool.call("echo", {"value": 1})).pid != pid
        assert not finished.exists(), "the killed call went on"
        assert pool.restarts == {"cancelled": 1}
        await whole(pool, watch)


# -- drain -----------------------------------------------------------------------------------------


@on_uvloop
async def test_drain_lets_admitted_calls_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    async with open_pool(workers=2) as (pool, watch):
        gate = tmp_path / "gate"
        markers = [tmp_path / f"running-{i}" for i in range(2)]
        running = [
            asyncio.ensure_future(pool.call("mark_then_wait", {"path": str(m), "release": str(gate)}))
            for m in markers
        ]
        for m in markers:
            await wait_for_file(m)
        queued = asyncio.ensure_future(pool.call("echo", {"value": "queued"}))
        await wait_until(lambda: pool.pending == 1, what="a queued call")
        pids = watch.sample()
        draining = asyncio.ensure_future(pool.drain(30.0))
        await wait_until(lambda: pool.closing, what="the pool to start draining")
        with pytest.raises(PoolClosed):
            await pool.call("echo", {"value": "late"})
        assert isinstance(pool.submit(os.getpid).exception(timeout=0), PoolClosed)
        assert not draining.done()
        open_gate(gate)
        assert all(o.value["released"] for o in await asyncio.gather(*running))
        assert (await queued).value["value"] == "queued", "admitted before the drain: it runs"
        await asyncio.wait_for(draining, 10.0)
        assert not any(alive(pid) for pid in pids)
        assert pool.rows() == []


@on_uvloop
async def test_drain_kills_what_still_runs_when_the_grace_ends(tmp_path: Path) -> None:
    async with open_pool(workers=2) as (pool, watch):
        markers = [tmp_path / f"spinning-{i}" for i in range(2)]
        spinning = [
            asyncio.ensure_future(pool.call("mark_then_wait", {"path": str(m), "release": str(tmp_path / "never")}))
            for m in markers
        ]
        for m in markers:
            await wait_for_file(m)
        pids = watch.sample()
        await asyncio.wait_for(pool.drain(0.3), 10.0)
        for call in spinning:
            with pytest.raises(PoolClosed):
                await call
        assert not any(alive(pid) for pid in pids), "killed at the end of the grace"


# -- soak -------------------------------------------------------------------------------------------

SOAK_SECONDS = 12.0
SOAK_KINDS = {  # kind: (weight, the answers it may get)
    "echo": (60, {"ok", "Overloaded"}),
    "nap": (15, {"ok", "Overloaded"}),
    "fail": (8, {"TaskFailed", "Overloaded"}),
    "sys_exit": (4, {"TaskFailed", "Overloaded"}),
    "crash": (3, {"WorkerCrashed", "Overloaded"}),
    "timeout": (3, {"TaskTimeout", "Overloaded"}),
    "abandon": (7, {"ok", "cancelled", "Overloaded"}),
}


@on_uvloop
async def test_soak_every_call_gets_exactly_one_answer_of_its_kind() -> None:
    rng = random.Random(20240611)
    kinds = list(SOAK_KINDS)
    weights = [SOAK_KINDS[k][0] for k in kinds]
    answers: dict[int, list[tuple[str, str]]] = {}
    crashes = 0

    async def one(index: int, kind: str, pool: WorkerPool) -> None:
        try:
            if kind in ("echo", "abandon"):
                outcome = await pool.call("echo", {"value": index})
                assert outcome.value["value"] == index, "an answer went to the wrong call"
            elif kind == "nap":
                await pool.call("nap", {"ms": rng.choice((1, 5, 20))})
            elif kind == "fail":
                await pool.call("fail", {"message": f"call {index}"})
            elif kind == "sys_exit":
                await pool.call("exit_task", {"code": 1})
            elif kind == "crash":
                await pool.call(rng.choice(("hard_exit", "segfault", "kill_self")), {})
            else:
                await pool.call("spin_forever", {}, CallOptions(timeout=0.3))
            answer = "ok"
        except asyncio.CancelledError:
            answer = "cancelled"
        except (TaskFailed, WorkerCrashed, TaskTimeout, Overloaded) as exc:
            answer = type(exc).__name__
            if isinstance(exc, TaskFailed):
                expected = {"fail": "ValueError", "sys_exit": "SystemExit"}.get(kind)
                assert exc.exc_type == expected, (kind, exc)
        answers.setdefault(index, []).append((kind, answer))

    async with open_pool(workers=2, max_pending=24) as (pool, watch):
        calls: list[asyncio.Task[None]] = []
        started = time.monotonic()
        index = 0
        while time.monotonic() - started < SOAK_SECONDS:
            in_flight = sum(1 for c in calls if not c.done())
            if in_flight >= 16:
                await asyncio.wait([c for c in calls if not c.done()], return_when=asyncio.FIRST_COMPLETED)
                continue
            kind = rng.choices(kinds, weights)[0]
            if kind == "crash":
                if crashes >= 8:  # keep the crash back-off short enough to soak through
                    continue
                crashes += 1
            call = asyncio.ensure_future(one(index, kind, pool))
            calls.append(call)
            if kind == "abandon":
                asyncio.get_running_loop().call_later(rng.uniform(0, 0.01), call.cancel)
            index += 1
            if index % 10 == 0:
                watch.sample()
                await asyncio.sleep(rng.uniform(0, 0.02))  # the workload's own pace, not a synchronisation
        done, not_done = await asyncio.wait(calls, timeout=30.0)
        assert not not_done, f"{len(not_done)} calls never got an answer"
        for call in done:
            if not call.cancelled():
                call.result()  # an assertion inside a call fails the test here

        # a cancelled `one` has no record when it was cancelled before it began: count them apart
        never_started = [c for c in calls if c.cancelled()]
        assert len(answers) + len(never_started) == index
        for i, got in answers.items():
            assert len(got) == 1, f"call {i} was answered {len(got)} times"
            kind, answer = got[0]
            assert answer in SOAK_KINDS[kind][1], (i, kind, answer)
        counts: dict[str, int] = {}
        for [(_, answer)] in answers.values():
            counts[answer] = counts.get(answer, 0) + 1
        assert counts.get("ok", 0) > index // 2, counts
        await whole(pool, watch, timeout=15.0)  # every worker killed for a timeout has been replaced
        assert pool.restarts["crashed"] == counts.get("WorkerCrashed", 0), (pool.restarts, counts)
        assert pool.restarts["timeout"] == counts.get("TaskTimeout", 0), (pool.restarts, counts)
        assert set(pool.restarts) <= {"crashed", "timeout"}, pool.restarts
        final = await asyncio.gather(*(pool.call("echo", {"value": i}) for i in range(8)))
        assert [o.value["value"] for o in final] == list(range(8))
