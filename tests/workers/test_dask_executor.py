"""The Dask executor against real clusters: a LocalCluster of worker processes (2 workers, 1 thread
each, with nannies), and a scheduler and worker started as separate `dask` processes.

What is proven: built-in and user tasks run by name on Dask workers; bytes go in and come out as
bytes (large ones scattered as Dask data); progress reports reach `on_progress`; a timeout and a
cancel really stop the work (the process that ran it is gone); a Dask worker killed mid-task leads
to a retry or a 502, never a hang; readiness follows the scheduler and its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("distributed")

from distributed import LocalCluster

from tests.conftest import wait_until
from tests.support.dask_cluster import DaskProcesses
from workers.dask.calls import DaskUnavailable
from workers.dask.executor import DaskExecutor
from workers.dask.options import DaskOptions
from workers.errors import Overloaded, PoolClosed, TaskFailed, TaskTimeout, WorkerCrashed
from workers.executor import CallOptions, Executor, Outcome

MODULES = ("tests.support.dask_tasks",)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1",
        silence_logs=40,
    ) as c:
        yield c




@contextlib.asynccontextmanager
async def executor(address: str, **options: Any) -> Any:
    ex = DaskExecutor(DaskOptions(address=address, modules=MODULES, **options))
    await ex.start()
    try:
        yield ex
    finally:
        await ex.aclose()


def pid_in(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_builtins_and_user_tasks_by_name(cluster: LocalCluster) -> None:
    async with executor(cluster.scheduler_address) as ex:
        assert isinstance(ex, Executor)
        assert ex.alive == 2 and ex.size == 2 and not ex.closing
        out = await ex.call("primes", {"limit": 10_000}, CallOptions(encode_json=True))
        assert isinstance(out, Outcome) and out.json and out.value == b"1229" and out.pid > 0
        plain = await ex.call("primes", {"limit": 100})
        assert plain.value == 25 and not plain.json
        png = await ex.call("mandelbrot", {"width": 16, "height": 8}, CallOptions(encode_json=True))
        assert not png.json and png.value.startswith(b"\x89PNG\r\n\x1a\n")
        user = await ex.call("shout", {"text": "hi", "times": 2}, CallOptions(encode_json=True))
        assert b'"HI!HI!"' in user.value
        with pytest.raises(TaskFailed) as failed:
            await ex.call("fail", {"message": "nope"})
        assert failed.value.exc_type == "ValueError" and failed.value.message == "nope"
        with pytest.raises(TaskFailed, match="not registered"):
            await ex.call("no_such_task", {})
        chunk = await ex.call_chunk("primes", [{"limit": 10}, {"limit": 100}])
        assert [o.value for o in chunk if isinstance(o, Outcome)] == [b"4", b"25"]
        mixed = await ex.call_chunk("fail", [{"message": "a"}])
        assert isinstance(mixed[0], TaskFailed)
        # concurrent.futures.Executor: run_in_executor sends a plain function
        assert await asyncio.get_running_loop().run_in_executor(ex, pow, 2, 10) == 1024
        listing = ex.describe_workers()
        assert len(listing) == 2 and all(w["pid"] and w["address"].startswith("tcp://") for w in listing)


async def test_bytes_in_and_out_as_dask_data(cluster: LocalCluster) -> None:
    blob = os.urandom(3 * 1024 * 1024) + b"end"
    async with executor(cluster.scheduler_address, scatter_threshold=1024 * 1024) as ex:
        small = await ex.call("sha256", {"data": b"hello"}, CallOptions(encode_json=True))
        assert small.value == b'"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"'
        big = await ex.call("sha256", {"data": blob, "rounds": 1}, CallOptions(encode_json=True))  # scattered first
        assert big.value == b'"' + hashlib.sha256(blob).hexdigest().encode() + b'"'
        back = await ex.call("reverse_bytes", {"data": blob}, CallOptions(encode_json=True))
        assert not back.json and back.value == blob[::-1]
        view = await ex.call("view_length", {"data": memoryview(blob)})
        assert view.value == len(blob)


async def test_progress_reaches_the_callback(cluster: LocalCluster) -> None:
    reports: list[tuple[float, float | None, str | None]] = []
    async with executor(cluster.scheduler_address) as ex:
        out = await ex.call("steps", {"n": 5}, CallOptions(on_progress=lambda *r: reports.append(r)))
        assert out.value == 5
        # every report reached the callback before the call returned (a job stores its last one)
        assert reports == [(float(i), 5.0, f"step {i}") for i in range(1, 6)]
        burn: list[Any] = []
        await ex.call("burn", {"ms": 250}, CallOptions(on_progress=lambda *r: burn.append(r)))
        assert burn[-1] == (100.0, 100.0, "100%")


async def test_timeout_kills_the_runner_and_the_worker_lives_on(cluster: LocalCluster, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    async with executor(cluster.scheduler_address) as ex:
        started = time.monotonic()
        with pytest.raises(TaskTimeout):
            await ex.call("spin", {"pid_file": str(pid_file), "seconds": 60}, CallOptions(timeout=0.5))
        assert time.monotonic() - started < 5
        pid = pid_in(pid_file)
        assert pid
        await wait_until(lambda: gone(pid), 5, "the process running the timed-out task to be gone")
        assert ex.restarts["timeout"] == 1
        assert ex.alive == 2  # the Dask workers themselves were not touched
        out = await ex.call("primes", {"limit": 1000})
        assert out.value == 168


async def test_cancel_stops_the_running_task(cluster: LocalCluster, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    async with executor(cluster.scheduler_address) as ex:
        call = asyncio.ensure_future(
            ex.call("spin", {"pid_file": str(pid_file), "seconds": 60}, CallOptions(kill_on_cancel=True))
        )
        pid = await wait_until(lambda: pid_in(pid_file), 10, "the task to start")
        await wait_until(lambda: ex.pending == 0 and ex.rows() and any(r.task == "spin" for r in ex.rows()), 5,
                         "the start event")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_until(lambda: gone(pid), 5, "the cancelled task's process to be gone")
        await wait_until(lambda: ex.restarts["cancelled"] == 1, 5, "the cancel to be counted")
        # a call that never started is simply dropped
        assert (await ex.call("primes", {"limit": 10})).value == 4


async def test_thread_isolation_restarts_the_worker_on_timeout(cluster: LocalCluster, tmp_path: Path) -> None:
    """isolate=thread: the task runs in the Dask worker's own thread, so stopping it means
    restarting that worker through its nanny."""
    pid_file = tmp_path / "pid"
    async with executor(cluster.scheduler_address, isolate="thread") as ex:
        with pytest.raises(TaskTimeout):
            await ex.call("spin", {"pid_file": str(pid_file), "seconds": 60}, CallOptions(timeout=0.5))
        worker_pid = pid_in(pid_file)
        await wait_until(lambda: gone(worker_pid), 15, "the Dask worker that ran it to be restarted")
        await wait_until(lambda: ex.alive == 2, 20, "the restarted worker to rejoin")
        assert (await ex.call("shout", {"text": "back"})).value["text"] == "BACK!"


async def test_killed_dask_worker_mid_task_is_retried_or_502(cluster: LocalCluster, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    async with executor(cluster.scheduler_address) as ex:
        args = {"pid_file": str(pid_file), "seconds": 1.0}
        call = asyncio.ensure_future(ex.call("spin", args, CallOptions(timeout=30)))
        runner = await wait_until(lambda: pid_in(pid_file), 10, "the task to start")
        busy = await wait_until(lambda: [r for r in ex.rows() if r.task == "spin" and r.pid], 5, "a busy row")
        worker = psutil.Process(busy[0].pid)
        assert runner in [c.pid for c in worker.children()]
        pid_file.unlink()
        worker.send_signal(signal.SIGKILL)  # the Dask worker process itself; its nanny starts a new one
        try:
            out = await asyncio.wait_for(call, 40)  # never a hang
        except WorkerCrashed:
            pass  # a 502: acceptable
        else:
            assert out.value > 0  # Dask rescheduled it on a live worker: it ran again from the start
            assert pid_in(pid_file) not in (0, runner)
        await wait_until(lambda: gone(runner), 5, "the orphaned runner to stop itself")
        await wait_until(lambda: ex.alive == 2, 20, "the killed worker to be replaced")


async def test_overload_drain_and_close(cluster: LocalCluster, tmp_path: Path) -> None:
    async with executor(cluster.scheduler_address, max_pending=1) as ex:
        assert ex.max_pending == 8  # at least four per Dask thread
        def spin(i: int) -> asyncio.Future[Any]:
            return asyncio.ensure_future(ex.call("spin", {"pid_file": str(tmp_path / f"p{i}"), "seconds": 60}))

        spins = [spin(i) for i in range(ex.max_pending)]
        pids = await wait_until(lambda: [p for i in range(2) if (p := pid_in(tmp_path / f"p{i}"))] if all(
            pid_in(tmp_path / f"p{i}") for i in range(2)) else None, 15, "two spins to run")
        await wait_until(lambda: ex.pending == ex.max_pending - 2, 5, "the other spins to wait")
        spins += [spin(i) for i in range(ex.max_pending, ex.max_pending + 2)]
        await wait_until(lambda: ex.pending == ex.max_pending, 5, "the queue to be full")
        with pytest.raises(Overloaded):
            await ex.call("primes", {"limit": 10})
        await ex.drain(0.2)  # the grace runs out: what runs is stopped, its callers get PoolClosed
        assert ex.closing
        results = await asyncio.gather(*spins, return_exceptions=True)
        assert all(isinstance(r, PoolClosed) for r in results), " ".join(repr(r) for r in results)
        for pid in pids:
            await wait_until(lambda pid=pid: gone(pid), 5, "the drained task's process to stop")
        with pytest.raises(PoolClosed):
            await ex.call("primes", {"limit": 10})


async def test_separate_scheduler_and_worker_processes(tmp_path: Path) -> None:
    """`dask scheduler` and `dask worker` as an operator runs them: calls work; a worker killed
    mid-task with no other worker left is a 502 after the grace, not a hang; a stopped scheduler
    turns readiness off and calls fail fast."""
    procs = DaskProcesses(tmp_path / "dask")
    try:
        procs.start_scheduler()
        async with executor(procs.address, unavailable_grace=1.5, refresh=0.2) as ex:
            assert ex.alive == 0 and ex.readiness()["scheduler_reachable"]  # no worker yet: not ready
            worker = procs.start_worker()
            await wait_until(lambda: ex.alive == 1, 30, "the worker to join")
            await wait_until(lambda: all(w["pid"] for w in ex.describe_workers()), 5, "its pid")
            out = await ex.call("shout", {"text": "remote"}, CallOptions(encode_json=True))
            assert b"REMOTE!" in out.value
            pid_file = tmp_path / "pid"
            call = asyncio.ensure_future(ex.call("spin", {"pid_file": str(pid_file), "seconds": 60}))
            runner = await wait_until(lambda: pid_in(pid_file), 20, "the task to start")
            procs.stop(worker)  # nanny and worker, SIGKILL: nothing will restart them
            with pytest.raises(DaskUnavailable, match="no usable worker"):  # 502, as a crashed worker
                await asyncio.wait_for(call, 20)
            await wait_until(lambda: gone(runner), 5, "the runner to stop with its worker")
            assert ex.alive == 0
            procs.stop_scheduler()
            await wait_until(lambda: not ex.readiness()["scheduler_reachable"], 10, "the scheduler to be seen gone")
            started = time.monotonic()
            with pytest.raises(DaskUnavailable, match="unreachable"):
                await ex.call("primes", {"limit": 10})
            assert time.monotonic() - started < 1
    finally:
        procs.close()


def test_open_executor_selects_by_url() -> None:
    from service.config import Config
    from workers.backends import open_executor
    from workers.local.pool import WorkerPool

    dask = open_executor("dask://127.0.0.1:8786?isolate=thread", Config(workers=2, max_pending=3))
    assert isinstance(dask, DaskExecutor) and isinstance(dask, Executor)
    assert dask.options.address == "tcp://127.0.0.1:8786" and dask.options.isolate == "thread"
    assert isinstance(open_executor("local", Config(workers=1)), WorkerPool)
