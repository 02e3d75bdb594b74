"""`@task(timeout=..., concurrency=...)` through the real server (tests/support/option_tasks.py).

Concurrency: `serial` has concurrency=1 on a pool of three workers: its calls never overlap (their
start/end on the machine's monotonic clock), the others wait at the service (counted by
procbridge_task_waiting and toward --max-pending: beyond it, 503 overloaded), an ungated task runs
meanwhile, and a caller that hangs up while waiting is dropped without running. Held calls wait on a
release file the test creates; waiting is observed through /metrics, never by sleeping.

Timeout: `capped` has timeout=4 under --task-timeout 60: without `?timeout` it is 504 after 4 s, a
longer `?timeout` (or a job's "timeout") cannot lengthen it, a shorter one shortens it; map items
get the task's timeout too.
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Reply, http, metric, post_json, start_server, wait_for

TASKS = "tests.support.option_tasks"
MAX_PENDING = 4
WIDE = 20.0  # seconds: far below the 60 s a longer timeout would allow, far above the 4 s promised


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("options")
    srv = start_server(tmp, "--workers", "3", "--tasks", TASKS, "--task-timeout", "60",
                       "--max-pending", str(MAX_PENDING))
    yield srv
    srv.stop()
    srv.kill_all()


def call(server: Any, task: str, args: dict[str, Any], query: str = "") -> Reply:
    return post_json(f"{server.url}/v1/tasks/{task}{query}", args, timeout=90)


def waiting(server: Any) -> float:
    return metric(server, "procbridge_task_waiting", 'task="serial"')


def started(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_concurrency_1_serialises_the_task_while_another_task_keeps_running(server, tmp_path):
    log, release = tmp_path / "starts", tmp_path / "release"
    args = {"log": str(log), "release": str(release), "work_ms": 100}
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(call, server, "serial", {"tag": "a", **args})
        wait_for(lambda: started(log) == ["a"], what="the first call to start")
        rest = [pool.submit(call, server, "serial", {"tag": tag, **args}) for tag in "bcd"]
        wait_for(lambda: waiting(server) == 3, what="three calls waiting for serial's slot")

        # Two workers are idle, yet no other serial call started; an ungated task runs meanwhile.
        other = call(server, "free", {"n": 7})
        assert other.status == 200 and other.json()["result"] == 7
        assert started(log) == ["a"] and waiting(server) == 3 and not first.done()

        release.touch()
        replies = [first.result(60), *(f.result(60) for f in rest)]
    assert [r.status for r in replies] == [200] * 4, [r.body for r in replies]
    runs = sorted((r.json()["result"] for r in replies), key=lambda run: run["start"])
    assert {run["tag"] for run in runs} == set("abcd")
    for before, after in itertools.pairwise(runs):
        assert before["end"] <= after["start"], f"{before} overlaps {after}"
    assert sorted(started(log)) == list("abcd")
    assert waiting(server) == 0


def test_waiting_calls_count_toward_max_pending(server, tmp_path):
    log, release = tmp_path / "starts", tmp_path / "release"
    args = {"log": str(log), "release": str(release), "work_ms": 0}
    with ThreadPoolExecutor(12) as pool:
        first = pool.submit(call, server, "serial", {"tag": "first", **args})
        wait_for(lambda: started(log) == ["first"], what="the first call to start")
        flood = [pool.submit(call, server, "serial", {"tag": f"f{i}", **args}) for i in range(10)]
        # The first runs, MAX_PENDING wait for its slot, the rest are refused at once.
        wait_for(lambda: sum(f.done() for f in flood) == 10 - MAX_PENDING and waiting(server) == MAX_PENDING,
                 what="the calls beyond --max-pending to be answered")
        refused = [f.result() for f in flood if f.done()]
        assert [r.status for r in refused] == [503] * (10 - MAX_PENDING)
        for reply in refused:
            assert reply.json()["type"] == "/problems/overloaded"
            assert int(reply.headers["retry-after"]) >= 1
        assert waiting(server) == MAX_PENDING
        # The queue is full for everyone: waiting gated calls are admitted work like queued ones.
        assert call(server, "free", {}).json()["type"] == "/problems/overloaded"
        release.touch()
        replies = [first.result(60), *(f.result(60) for f in flood)]
    assert sum(r.status == 200 for r in replies) == 1 + MAX_PENDING
    assert len(started(log)) == 1 + MAX_PENDING  # no refused call ran
    assert call(server, "free", {}).status == 200


def test_a_caller_that_hangs_up_while_waiting_is_dropped_without_running(server, tmp_path):
    log, release = tmp_path / "starts", tmp_path / "release"
    args = {"log": str(log), "release": str(release), "work_ms": 0}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(call, server, "serial", {"tag": "held", **args})
        wait_for(lambda: started(log) == ["held"], what="the first call to start")
        body = json.dumps({"tag": "gone", **args}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/tasks/serial HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: waiting(server) == 1, what="the second call to wait")
        wait_for(lambda: waiting(server) == 0, what="the hung-up call to leave the line")
        release.touch()
        assert first.result(60).status == 200
    # Had the dropped call stayed in line, it would run before this one (first come, first served).
    assert call(server, "serial", {"tag": "after", **args}).status == 200
    assert started(log) == ["held", "after"]


def timed(server: Any, task: str, args: dict[str, Any], query: str = "") -> tuple[Reply, float]:
    began = time.monotonic()
    reply = call(server, task, args, query)
    return reply, time.monotonic() - began


def test_the_tasks_timeout_is_504_without_a_timeout_query(server):
    reply, elapsed = timed(server, "capped", {"seconds": 300})
    assert reply.status == 504 and reply.json()["type"] == "/problems/task-timeout"
    assert 4.0 <= elapsed < WIDE  # its own 4 s, not --task-timeout's 60
    assert call(server, "capped", {"seconds": 0.01}).json()["result"] == 0.01


def test_a_timeout_query_cannot_lengthen_the_tasks_timeout(server):
    reply, elapsed = timed(server, "capped", {"seconds": 300}, "?timeout=60")
    assert reply.status == 504 and reply.json()["type"] == "/problems/task-timeout"
    assert 4.0 <= elapsed < WIDE


def test_a_timeout_query_shortens_the_tasks_timeout(server):
    reply, elapsed = timed(server, "capped", {"seconds": 300}, "?timeout=0.3")
    assert reply.status == 504 and reply.json()["type"] == "/problems/task-timeout"
    assert elapsed < 3.0  # well under the task's 4 s


def test_map_items_get_the_tasks_timeout(server):
    began = time.monotonic()
    reply = post_json(f"{server.url}/v1/tasks/capped/map?timeout=60",
                      {"items": [{"seconds": 0.01}, {"seconds": 300}]}, timeout=90)
    elapsed = time.monotonic() - began
    assert reply.status == 200
    lines = [json.loads(line) for line in reply.body.splitlines()]
    assert lines[0] == {"index": 0, "result": 0.01}
    assert lines[1]["error"]["type"] == "/problems/task-timeout"
    assert elapsed < WIDE


def test_a_jobs_timeout_cannot_lengthen_the_tasks_timeout(server):
    reply = post_json(f"{server.url}/v1/jobs", {"task": "capped", "args": {"seconds": 300}, "timeout": 60})
    assert reply.status == 202
    location = server.url + reply.headers["location"]

    def finished() -> dict[str, Any] | None:
        job: dict[str, Any] = http("GET", location).json()
        return job if job["status"] not in ("queued", "running") else None

    job = wait_for(finished, WIDE + 10, 0.05, "the job to end")
    assert job["status"] == "failed" and job["error"]["type"] == "/problems/task-timeout"
    assert job["finished_at"] - job["started_at"] < WIDE


def test_sigterm_lets_the_calls_waiting_for_their_slot_finish(server_factory, tmp_path):
    srv = server_factory("--workers", "2", "--tasks", TASKS, "--shutdown-grace", "60")
    log, release = tmp_path / "starts", tmp_path / "release"
    args = {"log": str(log), "release": str(release), "work_ms": 0}
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(call, srv, "serial", {"tag": "a", **args})
        wait_for(lambda: started(log) == ["a"], what="the first call to start")
        second = pool.submit(call, srv, "serial", {"tag": "b", **args})
        wait_for(lambda: waiting(srv) == 1, what="the second call to wait")
        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: http("GET", srv.url + "/readyz").status == 503, what="the drain to begin")
        release.touch()
        assert [first.result(60).status, second.result(60).status] == [200, 200]
    assert started(log) == ["a", "b"]
    assert srv.proc.wait(30) == 0
