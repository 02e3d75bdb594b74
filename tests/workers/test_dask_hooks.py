"""Worker-state hooks (`@preload`, `@on_worker_start`) on the Dask executor, against one real
LocalCluster for the whole module (2 worker processes, 1 thread each, with nannies).

The hooks are in tests/support/dask_hook_tasks.py: each appends the pid of the process it runs in to
a file named by the environment (set before the cluster starts, so the Dask workers and their
runner children inherit it), so where and how often each ran is counted from outside. The cluster is
shared by every test, so a test counts what was appended while it ran (`HookLogs.mark`), except
where a claim holds over the module's whole log.

What is proven: with isolate=thread both hooks run exactly once in each Dask worker process, and a
task there sees what the preload built; with isolate=process each runner child runs the preload,
then on_worker_start, once, for itself, the tasks run in those children, the Dask worker process
runs neither, and a runner replaced after a timeout runs both again; a hook that raises fails a call
with a 502 naming the hook (process) or the start with one line naming it (thread), never a hang,
with the hook's traceback in the service's log; so does a task module the workers cannot import.
(A Dask worker that joins later while its hook raises: tests/e2e/test_dask_hooks_http.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("distributed")

from distributed import Client, LocalCluster

from service.problems import from_pool_error
from tests.conftest import wait_until
from workers.dask.calls import DaskWorkerStartFailed
from workers.dask.cluster import DaskStartFailed
from workers.dask.executor import DaskExecutor
from workers.dask.options import DaskOptions
from workers.dask.plugin import plugin_name
from workers.errors import TaskTimeout, WorkerCrashed
from workers.executor import CallOptions

MODULES = ("tests.support.dask_hook_tasks",)
BROKEN = ("tests.support.dask_hook_broken",)
PRELOAD_FAILS = (
    "preload hook tests.support.dask_hook_tasks.model raised ValueError: no model file at /models/missing.bin"
)
BROKEN_PRELOAD_FAILS = (
    "preload hook tests.support.dask_hook_broken.weights raised FileNotFoundError: no weights at /models/broken.bin"
)
START_FAILS = (
    "on_worker_start hook tests.support.dask_hook_tasks.connect raised ConnectionError: "
    "the database at db:5432 refused the connection"
)


@dataclass(frozen=True)
class Mark:
    """How far the hook logs were when it was taken: what was appended since is what counts."""

    logs: HookLogs
    preload_at: int
    start_at: int

    def preloads(self) -> list[int]:
        """Pids the preload ran in since the mark, once per run."""
        return [int(fields[0]) for fields in _lines(self.logs.preload, self.preload_at)]

    def starts(self) -> list[tuple[int, bool]]:
        """(pid, whether the preload had already run in that process) per on_worker_start run since the mark."""
        return [(int(fields[0]), fields[1] == "1") for fields in _lines(self.logs.start, self.start_at)]


@dataclass(frozen=True)
class HookLogs:
    preload: Path
    start: Path
    switch: Path  # holds the name of the hook that must raise, while it exists

    def env(self) -> dict[str, str]:
        return {"HOOKS_PRELOAD_LOG": str(self.preload), "HOOKS_START_LOG": str(self.start),
                "HOOKS_FAIL": str(self.switch)}

    def mark(self) -> Mark:
        return Mark(self, _size(self.preload), _size(self.start))


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _lines(path: Path, offset: int) -> list[list[str]]:
    if not path.exists():
        return []
    with open(path) as f:
        f.seek(offset)
        return [line.split() for line in f.read().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> HookLogs:
    directory = tmp_path_factory.mktemp("dask-hooks")
    return HookLogs(directory / "preload.pids", directory / "start.pids", directory / "fail")


@pytest.fixture(scope="module")
def cluster(logs: HookLogs) -> Iterator[LocalCluster]:
    with pytest.MonkeyPatch.context() as env:
        for name, value in logs.env().items():
            env.setenv(name, value)  # before the workers start: they (and their runners) inherit it
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1",
            silence_logs=50,
        ) as c:
            yield c


@dataclass(frozen=True)
class Switch:
    """The failure switch of tests/support/dask_hook_tasks.py: while on, the named hook raises."""

    path: Path

    def turn_on(self, hook: str) -> None:
        self.path.write_text(hook)

    def turn_off(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture
def switch(logs: HookLogs) -> Iterator[Switch]:
    """The failure switch, always turned off after the test."""
    on = Switch(logs.switch)
    try:
        yield on
    finally:
        on.turn_off()


@contextlib.asynccontextmanager
async def executor(cluster: LocalCluster, modules: tuple[str, ...] = MODULES, **options: Any) -> Any:
    ex = DaskExecutor(DaskOptions(address=cluster.scheduler_address, modules=modules, **options))
    await ex.start()
    try:
        yield ex
    finally:
        await ex.aclose()


def dask_worker_pids(ex: DaskExecutor) -> set[int]:
    pids = {w["pid"] for w in ex.describe_workers()}
    assert len(pids) == 2 and all(pids), ex.describe_workers()
    return pids


async def runners_started(mark: Mark, count: int) -> list[int]:
    """Wait until `count` runner children have finished their hooks since `mark` (the plugin starts
    one per Dask worker thread in the background); their pids."""
    started = await wait_until(lambda: len(mark.starts()) >= count and mark.starts(), 30,
                               f"{count} runner children to run on_worker_start")
    return [pid for pid, _ in started]


async def results_from_every_worker(ex: DaskExecutor, owner: Callable[[int], int]) -> dict[int, dict[str, Any]]:
    """Call `model_info` two at a time (each holds its thread a moment, so the scheduler spreads
    them) until both Dask workers have answered; `owner` gives the Dask worker's pid for the pid a
    task reports. The results by Dask worker pid."""
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + 30
    while len(seen) < 2:
        assert time.monotonic() < deadline, f"the calls reached only {sorted(seen)}"
        outs = await asyncio.gather(*(ex.call("model_info", {"hold": 0.3}) for _ in range(2)))
        for out in outs:
            seen[owner(out.value["pid"])] = out.value
    return seen


def pid_in(path: Path) -> int:
    """The pid a task wrote to `path`; 0 until it is there (the file exists empty for a moment)."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def parent_of(pid: int) -> int:
    return psutil.Process(pid).ppid()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def unregister(cluster: LocalCluster, modules: tuple[str, ...], isolate: str) -> None:
    """Take a plugin that failed off the cluster (the executor leaves it, as a shared cluster's)."""
    async with Client(cluster.scheduler_address, asynchronous=True, timeout=10) as client:
        with contextlib.suppress(ValueError):  # not registered
            await client.unregister_worker_plugin(plugin_name(modules, isolate))


# -- isolate=thread: the hooks run in the Dask worker process, once --------------------------------


async def test_thread_isolation_runs_preload_then_on_worker_start_once_in_each_dask_worker_and_tasks_see_the_preload(
    cluster: LocalCluster, logs: HookLogs
) -> None:
    mark = logs.mark()
    async with executor(cluster, isolate="thread") as ex:
        workers = dask_worker_pids(ex)
        results = await results_from_every_worker(ex, lambda pid: pid)
        # the tasks ran in the Dask worker processes and got the value their own process's preload built
        assert set(results) == workers
        for pid, value in results.items():
            assert value["pid"] == pid and value["model"] == {"built_by": pid, "weights": [0.5, 0.25]}
        # on_worker_start: once in each Dask worker as this executor started, after the preload
        assert sorted(s for s in mark.starts() if s[0] in workers) == sorted((pid, True) for pid in workers)
        # the preload: once in each Dask worker process over the whole module (no call built it again)
        assert Counter(p for p in Mark(logs, 0, 0).preloads() if p in workers) == dict.fromkeys(workers, 1)


# -- isolate=process: the hooks run in each runner child, never in the Dask worker -----------------


async def test_process_isolation_runs_preload_then_on_worker_start_once_in_each_runner_child_not_in_the_dask_worker(
    cluster: LocalCluster, logs: HookLogs
) -> None:
    mark = logs.mark()
    async with executor(cluster) as ex:
        workers = dask_worker_pids(ex)
        runners = await runners_started(mark, 2)
        assert {parent_of(pid) for pid in runners} == workers  # one runner child below each Dask worker
        results = await results_from_every_worker(ex, parent_of)
        preloads, starts = mark.preloads(), mark.starts()
        # each runner child: its own preload once, then on_worker_start once (the preload already built)
        assert Counter(preloads) == dict.fromkeys(preloads, 1)
        assert sorted(starts) == sorted((pid, True) for pid in preloads)
        # the Dask worker processes ran neither hook
        assert not set(preloads) & workers and not {pid for pid, _ in starts} & workers
        # the tasks ran in runner children, each with the value that child's preload built
        for value in results.values():
            assert value["pid"] in preloads and value["model"]["built_by"] == value["pid"]


async def test_a_runner_replaced_after_a_timeout_runs_preload_and_on_worker_start_again_for_itself(
    cluster: LocalCluster, logs: HookLogs, tmp_path: Path
) -> None:
    started = logs.mark()
    async with executor(cluster) as ex:
        workers = dask_worker_pids(ex)
        await runners_started(started, 2)
        before = logs.mark()
        pid_file = tmp_path / "pid"
        call = asyncio.ensure_future(
            ex.call("hang", {"pid_file": str(pid_file), "seconds": 60}, CallOptions(timeout=1.0))
        )
        killed = await wait_until(lambda: pid_in(pid_file), 15, "the task to start")
        worker = parent_of(killed)
        assert worker in workers
        with pytest.raises(TaskTimeout):
            await call
        await wait_until(lambda: gone(killed), 5, "the timed-out runner to be killed")
        # its replacement starts in the background, below the same Dask worker, and runs both hooks itself
        [replacement] = await wait_until(lambda: [p for p, _ in before.starts() if p != killed], 30,
                                         "the replacement runner to run on_worker_start")
        assert parent_of(replacement) == worker and ex.restarts["timeout"] == 1
        assert [p for p in before.preloads() if p != killed] == [replacement]
        assert [s for s in before.starts() if s[0] != killed] == [(replacement, True)]
        assert not set(before.preloads()) & workers


@pytest.mark.parametrize(
    ("hook", "named"), [("preload", PRELOAD_FAILS), ("on_worker_start", START_FAILS)],
    ids=["preload", "on_worker_start"],
)
async def test_process_isolation_a_hook_that_raises_fails_the_call_with_a_502_naming_the_hook_and_its_exception(
    cluster: LocalCluster, switch: Switch, hook: str, named: str, caplog: pytest.LogCaptureFixture
) -> None:
    switch.turn_on(hook)
    async with executor(cluster) as ex:  # the service starts: in this mode the hooks run in the runners
        with pytest.raises(WorkerCrashed) as failed:
            await asyncio.wait_for(ex.call("model_info", {}), 60)  # never a hang
        error = failed.value
        assert isinstance(error, DaskWorkerStartFailed)
        assert re.fullmatch(
            r"the task runner could not start on Dask worker tcp://127\.0\.0\.1:\d+: " + re.escape(named), str(error)
        ), str(error)
        problem = from_pool_error(error)
        assert problem.status == 502 and problem.slug == "worker-crashed" and problem.detail == str(error)
        assert ex.restarts["start_failed"] == 1
        # the service's log has the hook's own traceback
        assert "Traceback (most recent call last)" in caplog.text and named.rpartition(" raised ")[2] in caplog.text
        # the hook is fixed: the next call starts a runner again, and it works
        switch.turn_off()
        out = await asyncio.wait_for(ex.call("model_info", {}), 60)
        assert out.value["model"]["built_by"] == out.value["pid"]


@pytest.mark.parametrize(
    ("modules", "hook", "named"),
    [
        (BROKEN, None, BROKEN_PRELOAD_FAILS),
        (MODULES, "on_worker_start", START_FAILS),
    ],
    ids=["preload", "on_worker_start"],
)
async def test_thread_isolation_a_hook_that_raises_fails_the_start_at_once_with_one_line_naming_the_hook(
    cluster: LocalCluster, switch: Switch, modules: tuple[str, ...], hook: str | None, named: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if hook:
        switch.turn_on(hook)
    ex = DaskExecutor(DaskOptions(address=cluster.scheduler_address, modules=modules, isolate="thread"))
    try:
        with pytest.raises(DaskStartFailed) as failed:
            await asyncio.wait_for(ex.start(), 30)  # never a hang
    finally:
        await ex.aclose()
        await unregister(cluster, modules, "thread")
    # what the service prints after "cannot start: ": one line, the hook, its exception, the worker
    line = str(failed.value)
    assert re.fullmatch(re.escape(named) + r" \(on Dask worker tcp://127\.0\.0\.1:\d+\)", line), line
    assert "Traceback (most recent call last)" in caplog.text and named.rpartition(" raised ")[2] in caplog.text


@pytest.mark.parametrize("isolate", ["process", "thread"])
async def test_a_task_module_the_dask_workers_cannot_import_fails_the_start_with_one_line_naming_it_and_the_worker(
    cluster: LocalCluster, isolate: str
) -> None:
    modules = ("tests.support.no_such_module",)
    ex = DaskExecutor(DaskOptions(address=cluster.scheduler_address, modules=modules, isolate=isolate))
    try:
        with pytest.raises(DaskStartFailed) as failed:
            await asyncio.wait_for(ex.start(), 30)
    finally:
        await ex.aclose()
        await unregister(cluster, modules, isolate)
    assert re.fullmatch(
        r"the task modules cannot be imported: ModuleNotFoundError: No module named 'tests\.support\.no_such_module'; "
        r"the Dask workers need the same code as the service \(on Dask worker tcp://127\.0\.0\.1:\d+\)",
        str(failed.value),
    ), str(failed.value)
