"""`@task(batch=...)` on the Dask executor (`--executor dask://...`, a real `dask scheduler` and
`dask worker`): the service's Batcher gathers concurrent calls and sends each batch as one Dask task
that runs the function once over lists (CALL_BATCH, the same workers/execution.py code as the local
pool), so the calls share invocations there too and each caller gets its own result."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from tests.conftest import ServerProcess, post_json
from tests.support.dask_cluster import DaskProcesses, running_cluster


@pytest.fixture
def dask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaskProcesses]:
    monkeypatch.setenv("BATCH_LOG", str(tmp_path / "batches.jsonl"))  # the Dask worker inherits it
    monkeypatch.setenv("BATCH_GATES", str(tmp_path))
    with running_cluster(tmp_path / "dask", nthreads=2) as procs:
        yield procs


def test_batched_calls_share_invocations_on_a_dask_cluster_and_each_caller_gets_its_own_result(
    dask: DaskProcesses, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory("--executor", dask.url, "--tasks", "tests.support.batch_tasks")
    values = list(range(300, 324))
    with ThreadPoolExecutor(len(values)) as pool:
        replies = list(pool.map(lambda v: post_json(server.url + "/v1/tasks/double", {"x": v}, 90), values))
    assert [r.status for r in replies] == [200] * len(values), [r.body for r in replies if r.status != 200]
    assert [r.json()["result"] for r in replies] == [2 * v for v in values]
    runs = [json.loads(line) for line in (tmp_path / "batches.jsonl").read_text().splitlines()]
    ran = [run["values"] for run in runs if run["task"] == "double"]
    assert sorted(v for batch in ran for v in batch) == values  # every call ran, once
    assert len(ran) < len(values) and max(len(batch) for batch in ran) <= 8  # shared, at most max_size
