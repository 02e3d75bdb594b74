"""Worker-state hooks that raise on Dask, as an operator sees them: the real server with
`--executor dask://...` against a `dask scheduler` and `dask worker`s started as separate processes
(one cluster for the module), the task module tests/support/dask_hook_tasks.py with its
`@on_worker_start` hook raising while the switch file named by HOOKS_FAIL (in the Dask workers'
environment) says so; each test sets the switch itself.

With isolate=thread the hook runs in the Dask worker as the service starts: the service exits 1 with
one line naming the hook; a Dask worker that joins later while the hook raises answers its calls 502
naming the hook. With isolate=process it runs in each runner child: the service starts, and a call
is answered 502 naming the hook. Either way, once the hook is fixed the next call works."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("distributed")

from distributed import Client

from tests.conftest import Reply, ServerProcess, http, post_json, start_server, wait_for
from tests.support.dask_cluster import DaskProcesses

TASKS = ("--tasks", "tests.support.dask_hook_tasks")
NAMED = (
    "on_worker_start hook tests.support.dask_hook_tasks.connect raised ConnectionError: "
    "the database at db:5432 refused the connection"
)


@dataclass(frozen=True)
class Cluster:
    procs: DaskProcesses
    switch: Path

    def hook_raises(self, raises: bool) -> None:
        if raises:
            self.switch.write_text("on_worker_start")
        else:
            self.switch.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def dask(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("dask-hooks-http")
    cluster = Cluster(DaskProcesses(directory / "dask"), directory / "fail")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HOOKS_FAIL", str(cluster.switch))  # `dask worker` gets the test's environment (dask_env)
        try:
            cluster.procs.start_scheduler()
            cluster.procs.start_worker(nthreads=1)
            with Client(cluster.procs.address, timeout=30) as client:  # registered before a service starts
                client.wait_for_workers(1, timeout=30)
            yield cluster
        finally:
            cluster.procs.close()


def workers(server: ServerProcess) -> dict[str, int]:
    """The Dask workers the service sees: address -> pid."""
    return {w["address"]: w["pid"] for w in http("GET", server.url + "/v1/workers").json()["workers"]}


def calls_side_by_side(server: ServerProcess, n: int) -> list[Reply]:
    """`n` calls at once, each holding its Dask thread a moment, so the scheduler spreads them."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: post_json(server.url + "/v1/tasks/model_info", {"hold": 0.3}), range(n)))


def problem_of(reply: Reply) -> dict[str, Any]:
    assert reply.status == 502, reply
    problem: dict[str, Any] = reply.json()
    assert problem["type"] == "/problems/worker-crashed", problem
    return problem


def test_a_raising_hook_stops_a_thread_isolated_start_with_one_line_and_fails_process_isolated_calls_with_502(
    dask: Cluster, tmp_path: Path
) -> None:
    dask.hook_raises(True)
    # isolate=thread: the hook runs in the Dask workers as the service introduces itself
    thread = start_server(tmp_path / "thread", "--executor", dask.procs.url + "?isolate=thread", *TASKS,
                          wait_ready=False)
    try:
        assert thread.proc.wait(60) == 1, thread.log()
        log = thread.log()
        [line] = [line for line in log.splitlines() if "cannot start:" in line]
        assert re.search(r"cannot start: " + re.escape(NAMED) + r" \(on Dask worker tcp://127\.0\.0\.1:\d+\)$", line)
        assert "Traceback (most recent call last)" in log  # the hook's own, above the line
    finally:
        thread.kill_all()

    # isolate=process: the service starts; each call needs a runner child, whose hook raises: 502
    server = start_server(tmp_path / "process", "--executor", dask.procs.url, *TASKS)
    try:
        problem = problem_of(post_json(server.url + "/v1/tasks/model_info", {}))
        assert re.fullmatch(
            r"the task runner could not start on Dask worker tcp://127\.0\.0\.1:\d+: " + re.escape(NAMED),
            problem["detail"],
        ), problem
        assert "Traceback (most recent call last)" in server.log()
        dask.hook_raises(False)  # fixed: the next call starts a runner that works
        reply = post_json(server.url + "/v1/tasks/model_info", {})
        assert reply.status == 200, reply
        result = reply.json()["result"]
        assert result["model"]["built_by"] == result["pid"]
    finally:
        assert server.stop() == 0, server.log()


def test_a_dask_worker_that_joins_while_its_hook_raises_answers_thread_isolated_calls_502_until_the_hook_is_fixed(
    dask: Cluster, tmp_path: Path
) -> None:
    dask.hook_raises(False)
    server = start_server(tmp_path / "late", "--executor", dask.procs.url + "?isolate=thread", *TASKS)
    try:
        before = workers(server)
        dask.hook_raises(True)
        dask.procs.start_worker(nthreads=1)
        [joined] = wait_for(lambda: set(workers(server)) - set(before), 30, 0.05, "the new Dask worker to join")
        # the calls the new worker takes fail, naming it and the hook; the others are answered
        replies = wait_for(lambda: (r := calls_side_by_side(server, len(before) + 1)) and
                           any(x.status != 200 for x in r) and r, 30, 0.05, "a call to reach the new worker")
        for reply in replies:
            if reply.status == 200:
                assert reply.json()["result"]["pid"] in before.values()
            else:
                detail = problem_of(reply)["detail"]
                assert detail == f"the worker-state hooks failed on Dask worker {joined}: {NAMED}", detail
        # fixed: the new worker's next call runs the hooks there itself and is answered
        dask.hook_raises(False)
        pid = wait_for(lambda: workers(server)[joined], 10, 0.05, "the new worker's pid")
        wait_for(lambda: any(r.status == 200 and r.json()["result"]["pid"] == pid
                             for r in calls_side_by_side(server, len(before) + 1)),
                 30, 0.05, "a call answered by the new worker")
    finally:
        assert server.stop() == 0, server.log()
