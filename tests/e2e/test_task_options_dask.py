"""`@task(timeout=..., concurrency=...)` on the Dask executor (`--executor dask://...`, a real
`dask scheduler` and `dask worker`): the limit is kept by the service, so `concurrency=1` serialises
the task on a cluster with threads to spare, and the task's own timeout is what the cluster enforces."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from tests.conftest import ServerProcess, post_json, wait_for
from tests.e2e.test_task_options import TASKS, started, waiting
from tests.support.dask_cluster import DaskProcesses, running_cluster


@pytest.fixture
def dask(tmp_path: Path) -> Iterator[DaskProcesses]:
    with running_cluster(tmp_path / "dask", nthreads=3) as procs:
        yield procs


def test_task_options_on_a_dask_cluster(
    dask: DaskProcesses, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory("--executor", dask.url, "--tasks", TASKS, "--task-timeout", "60")
    log, release = tmp_path / "starts", tmp_path / "release"
    args = {"log": str(log), "release": str(release), "work_ms": 50}
    url = server.url + "/v1/tasks/"
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(post_json, url + "serial", {"tag": "a", **args}, 90)
        wait_for(lambda: started(log) == ["a"], 30, what="the first call to start")
        rest = [pool.submit(post_json, url + "serial", {"tag": tag, **args}, 90) for tag in "bc"]
        wait_for(lambda: waiting(server) == 2, what="two calls waiting for serial's slot")
        assert post_json(url + "free", {"n": 2}).json()["result"] == 2  # another task runs meanwhile
        assert started(log) == ["a"]
        release.touch()
        replies = [first.result(60), *(f.result(60) for f in rest)]
    assert [r.status for r in replies] == [200] * 3
    runs = sorted((r.json()["result"] for r in replies), key=lambda run: run["start"])
    for before, after in itertools.pairwise(runs):
        assert before["end"] <= after["start"], f"{before} overlaps {after}"

    began = time.monotonic()
    reply = post_json(url + "capped?timeout=60", {"seconds": 300}, 90)
    assert reply.status == 504 and reply.json()["type"] == "/problems/task-timeout"
    assert time.monotonic() - began < 20  # the task's 4 s, not the 60 asked for
