"""`async def` and generator tasks with `--executor dask://...`: an `async def` task runs (in the
runner child's own loop with isolate=process, in the Dask worker thread's own loop with
isolate=thread); a generator task cannot stream there, and is refused with 501
`streaming-unsupported` (docs/dask.md), as a synchronous call and as a job."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from tests.conftest import ServerProcess, post_json
from tests.e2e.test_jobs import submit, wait_final
from tests.support.dask_cluster import DaskProcesses, running_cluster

STREAMS = "tests.support.stream_tasks"


@pytest.fixture
def dask(tmp_path: Path) -> Iterator[DaskProcesses]:
    with running_cluster(tmp_path / "dask", nthreads=2) as procs:
        yield procs


@pytest.mark.parametrize("isolate", ["process", "thread"])
def test_async_tasks_run_and_generator_tasks_are_refused_on_dask(
    dask: DaskProcesses, server_factory: Callable[..., ServerProcess], isolate: str
) -> None:
    server = server_factory("--executor", f"{dask.url}?isolate={isolate}", "--tasks", STREAMS)
    for _ in range(2):  # the second call runs on the loop the first one left
        reply = post_json(server.url + "/v1/tasks/st_async_add", {"a": 2, "b": 3})
        assert reply.status == 200, reply.body
        assert reply.json()["result"]["sum"] == 5
    failed = post_json(server.url + "/v1/tasks/st_async_fail", {"message": "boom"})
    assert failed.status == 500 and "boom" in failed.json()["detail"]

    refused = post_json(server.url + "/v1/tasks/st_count", {"n": 3})
    assert refused.status == 501, refused.body
    assert refused.json()["type"] == "/problems/streaming-unsupported" and "st_count" in refused.json()["detail"]
    job = submit(server.url, "st_count", {"n": 3}).json()
    final = wait_final(server.url, job["id"])
    assert final["status"] == "failed" and final["error"]["type"] == "/problems/streaming-unsupported"
