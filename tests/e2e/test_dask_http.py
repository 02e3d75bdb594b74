"""The real server with `--executor dask://127.0.0.1:PORT` against a `dask scheduler` and a
`dask worker` started as separate processes: calls, bytes, a job with progress, a job retried, timeouts,
/v1/workers listing the Dask workers, /readyz following the scheduler, and a clean SIGTERM."""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("distributed")

from tests.conftest import ServerProcess, http, post_json, wait_for
from tests.e2e.test_jobs import sse_events, submit, wait_final
from tests.support.dask_cluster import DaskProcesses, running_cluster

TASKS = "tests.support.dask_tasks,tests.support.job_tasks"


@pytest.fixture
def dask(tmp_path: Path) -> Iterator[DaskProcesses]:
    with running_cluster(tmp_path / "dask", nthreads=2) as procs:
        yield procs


def test_server_on_a_dask_cluster(
    dask: DaskProcesses, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory("--executor", dask.url, "--tasks", TASKS)  # returns once /readyz says 200
    ready = http("GET", server.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["workers_alive"] == 1
    assert ready["executor"] == "dask" and ready["scheduler_reachable"] and ready["threads"] == 2

    # a call, JSON in and out, run on the Dask worker
    reply = post_json(server.url + "/v1/tasks/shout", {"text": "dask", "times": 2})
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["result"]["text"] == "DASK!DASK!" and body["worker"] == body["result"]["pid"]

    # binary in, binary out
    data = bytes(range(256)) * 4096
    reply = http("POST", server.url + "/v1/tasks/sha256?rounds=1", data, {"Content-Type": "application/octet-stream"})
    assert reply.status == 200 and reply.json()["result"] == hashlib.sha256(data).hexdigest()
    reply = http("POST", server.url + "/v1/tasks/reverse_bytes", data, {"Content-Type": "application/octet-stream"})
    assert reply.status == 200 and reply.body == data[::-1]

    # task errors and timeouts keep their statuses
    assert post_json(server.url + "/v1/tasks/fail", {"message": "x"}).status == 500
    reply = post_json(server.url + "/v1/tasks/burn?timeout=0.3", {"ms": 20000})
    assert reply.status == 504 and reply.json()["type"] == "/problems/task-timeout"

    # a map streams as on the local pool
    reply = post_json(server.url + "/v1/tasks/primes/map", {"items": [{"limit": 10}, {"limit": 100}]})
    assert [json.loads(line)["result"] for line in reply.body.splitlines()] == [4, 25]

    # a job: progress reaches SSE listeners and the store, then the result
    created = submit(server.url, "steps", {"n": 8}).json()
    events = list(sse_events(server.url, f"/v1/jobs/{created['id']}/events"))
    names = [e for e, _ in events]
    assert names[-1] == "result" and "progress" in names, names
    final = wait_final(server.url, created["id"])
    assert final["status"] == "succeeded" and final["result"] == 8
    assert final["progress"] == {"done": 8.0, "total": 8.0, "message": "step 8"}

    # a job with retries: its failed attempt runs again on the cluster, and counts
    flaky = tmp_path / "flaky"
    flaky.mkdir()
    created = submit(server.url, "jt_flaky", {"folder": str(flaky), "fail_first": 1}, retries=1).json()
    final = wait_final(server.url, created["id"])
    assert final["status"] == "succeeded" and final["attempts"] == 2 and final["result"]["attempt"] == 2
    assert final["last_error"]["type"] == "/problems/task-failed"
    assert len((flaky / "attempts").read_text().split()) == 2

    # /v1/workers lists the Dask workers
    listing = http("GET", server.url + "/v1/workers").json()
    assert listing["size"] == 2
    [worker] = listing["workers"]
    assert worker["address"].startswith("tcp://127.0.0.1:") and worker["nthreads"] == 2
    assert worker["pid"] in dask.worker_pids(dask.workers[0]) and worker["state"] == "idle"
    assert worker["tasks_done"] >= 5
    metrics = http("GET", server.url + "/metrics").body.decode()
    assert 'procbridge_workers{state="idle"} 1.0' in metrics

    # the scheduler goes away: not ready, and calls are answered at once (502), never left hanging
    dask.stop_scheduler()

    def not_ready() -> Any:
        reply = http("GET", server.url + "/readyz")
        return reply.status == 503 and reply.json()

    state = wait_for(not_ready, 15, 0.05, "/readyz to turn 503")
    assert state["status"] == "no-workers" and state["scheduler_reachable"] is False
    reply = post_json(server.url + "/v1/tasks/primes", {"limit": 10}, timeout=10)
    assert reply.status == 502 and "unreachable" in reply.json()["detail"]

    assert server.stop(signal.SIGTERM) == 0
    assert "procbridge stopped" in server.log()
