"""Faults through the real server (a subprocess on loopback): what each costs a client over HTTP.

The tasks come from tests/support/fault_tasks.py (`--tasks tests.support.fault_tasks`); every fault
is real (a SIGKILL from outside, a task that never ends, a flood, a client that hangs up, SIGTERM).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import Reply, ServerProcess, http, metric, post_json, wait_for

TASKS = ("--tasks", "tests.support.fault_tasks")
SHM = Path("/dev/shm")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pending(server: ServerProcess) -> float:
    return metric(server, "procbridge_pending_tasks")


def worker_pids(server: ServerProcess) -> set[int]:
    rows = http("GET", server.url + "/v1/workers").json()["workers"]
    return {row["pid"] for row in rows if row["pid"] and row["state"] in ("idle", "busy")}


def read_pid(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text(), 10.0, what=f"{path.name} to be written"))


def assert_problem(reply: Reply, status: int, slug: str) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"].startswith("application/problem+json")
    body = reply.json()
    assert body["type"] == f"/problems/{slug}" and body["status"] == status, body
    return dict(body)


def call(server: ServerProcess, task: str, args: dict[str, Any], query: str = "") -> Reply:
    return post_json(f"{server.url}/v1/tasks/{task}{query}", args, timeout=60)


def test_a_sigkilled_busy_worker_costs_its_request_a_502_and_the_next_request_succeeds(
    server_factory: Any, tmp_path: Path
) -> None:
    server = server_factory("--workers", "2", *TASKS)
    marker, release = tmp_path / "marker", tmp_path / "release"
    with cf.ThreadPoolExecutor(4) as threads:
        victim = threads.submit(call, server, "mark_then_wait", {"path": str(marker), "release": str(release)})
        try:
            pid = read_pid(marker)
            bystanders = [threads.submit(call, server, "nap", {"ms": 50}) for _ in range(3)]
            os.kill(pid, signal.SIGKILL)
        finally:
            release.write_text("go")  # a no-op once the worker is dead; it bounds a failed test
        body = assert_problem(victim.result(30), 502, "worker-crashed")
        assert str(pid) in body["detail"] and "SIGKILL" in body["detail"]
        assert all(b.result(30).status == 200 for b in bystanders)
    nxt = call(server, "echo", {"value": "next"})
    assert nxt.status == 200 and nxt.json()["result"]["value"] == "next"
    wait_for(lambda: len(worker_pids(server)) == 2 and pid not in worker_pids(server), 5.0, what="a replacement")
    server.descendants()
    assert metric(server, "procbridge_worker_restarts_total", 'reason="crashed"') == 1.0
    assert not alive(pid)
    assert server.stop() == 0
    assert server.leftovers() == []


def test_a_task_past_its_timeout_gets_a_504_and_its_worker_is_replaced(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory("--workers", "1", "--task-timeout", "30", *TASKS)
    marker = tmp_path / "marker"
    with cf.ThreadPoolExecutor(1) as threads:
        stuck = threads.submit(call, server, "fault", {"kind": "spin_forever", "marker": str(marker)}, "?timeout=0.5")
        pid = read_pid(marker)
        body = assert_problem(stuck.result(30), 504, "task-timeout")
    assert "0.5 s" in body["detail"]
    wait_for(lambda: not alive(pid), 15.0, what="the runaway worker to be gone (its CPU free)")
    nxt = call(server, "echo", {"value": 1})
    assert nxt.status == 200 and nxt.json()["worker"] != pid
    server.descendants()
    assert metric(server, "procbridge_worker_restarts_total", 'reason="timeout"') == 1.0
    assert server.stop() == 0
    assert server.leftovers() == []


def test_a_flood_beyond_max_pending_gets_503_overloaded_with_retry_after(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory("--workers", "1", "--max-pending", "2", *TASKS)
    release = tmp_path / "release"
    with cf.ThreadPoolExecutor(3) as threads:
        try:
            admitted = [threads.submit(call, server, "mark_then_wait", {"path": str(tmp_path / "m0"),
                                                                        "release": str(release)})]
            read_pid(tmp_path / "m0")  # the worker is busy
            admitted += [
                threads.submit(call, server, "mark_then_wait", {"path": str(tmp_path / f"m{i}"),
                                                                "release": str(release)})
                for i in (1, 2)
            ]
            wait_for(lambda: pending(server) == 2, 10.0, what="two requests waiting for the worker")
            for _ in range(5):
                body = assert_problem(call(server, "echo", {"value": 1}), 503, "overloaded")
                assert body["detail"]
            refused = call(server, "echo", {"value": 1})
            assert refused.status == 503 and refused.headers.get("retry-after", "").isdigit(), refused.headers
        finally:
            release.write_text("go")
        assert [a.result(30).status for a in admitted] == [200, 200, 200]
    assert call(server, "echo", {"value": 2}).status == 200
    assert metric(server, "procbridge_tasks_total", 'outcome="overloaded",task="echo"') == 6.0
    assert server.stop() == 0
    assert server.leftovers() == []


def test_a_client_that_hangs_up_before_its_call_starts_costs_no_work(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory("--workers", "1", *TASKS)
    marker, release, never = tmp_path / "busy", tmp_path / "release", tmp_path / "never-ran"
    with cf.ThreadPoolExecutor(1) as threads:
        busy = threads.submit(call, server, "mark_then_wait", {"path": str(marker), "release": str(release)})
        try:
            read_pid(marker)
            body = json.dumps({"path": str(never)}).encode()
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
                client.sendall(
                    b"POST /v1/tasks/mark HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
                )
                wait_for(lambda: pending(server) == 1, 10.0, what="the call to wait for the worker")
            # the client is gone: its call leaves the queue without running
            wait_for(lambda: pending(server) == 0, 10.0, what="the abandoned call to leave the queue")
        finally:
            release.write_text("go")
        assert busy.result(30).status == 200
    after = call(server, "echo", {"value": "after"})  # the worker has moved past where it would have run
    assert after.status == 200
    assert not never.exists(), "the abandoned call ran"
    assert server.stop() == 0
    assert server.leftovers() == []


def shm_segments(pid: int) -> set[Path]:
    """The /dev/shm segments a process has mapped (the pool's worker table)."""
    return {Path(m.path) for m in psutil.Process(pid).memory_maps() if m.path.startswith(str(SHM) + "/")}


def test_sigterm_lets_calls_in_flight_finish_then_exits_cleanly(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory("--workers", "2", "--shutdown-grace", "20", *TASKS)
    segments = shm_segments(server.proc.pid)
    assert segments, "the service maps its worker table"
    release = tmp_path / "release"
    with cf.ThreadPoolExecutor(2) as threads:
        in_flight = [
            threads.submit(call, server, "mark_then_wait", {"path": str(tmp_path / f"m{i}"), "release": str(release)})
            for i in range(2)
        ]
        try:
            pids = [read_pid(tmp_path / f"m{i}") for i in range(2)]
            server.descendants()
            server.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: http("GET", server.url + "/readyz").status == 503, 10.0, what="/readyz to turn 503")
            assert_problem(call(server, "echo", {"value": 1}), 503, "draining")
            assert server.proc.poll() is None, "still waiting for the calls in flight"
        finally:
            release.write_text("go")
        replies = [f.result(30) for f in in_flight]
    assert [r.status for r in replies] == [200, 200]
    assert all(r.json()["result"]["released"] for r in replies)
    assert server.proc.wait(30) == 0
    assert server.leftovers() == [] and not any(alive(pid) for pid in pids)
    assert not any(segment.exists() for segment in segments), "a shared-memory segment was left"
