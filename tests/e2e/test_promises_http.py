"""Documented promises of the HTTP API (docs/api.md) and of the access log (docs/security.md), each
proved against a real server process: the headers of a bytes result, the length rule of
`Idempotency-Key`, the 409s of `GET /v1/jobs/{id}/result`, the exact `Retry-After` of 503
`overloaded` and `draining`, and the mode of the access-log file.

Jobs that must stay running are held by a gate file (tests/support/job_tasks.py), never by sleeping.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Reply,
    ServerProcess,
    http,
    joined,
    metric,
    post_json,
    run_in_thread,
    serving,
    start_server,
    wait_for,
)
from tests.e2e.test_jobs import job, submit, wait_final

JOB_TASKS = "tests.support.job_tasks"
FAULTS = "tests.support.fault_tasks"
UMASK_0 = ("sh", "-c", 'umask 0 && exec "$0" "$@"')  # the server creates files with exactly the mode it asks for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests that do not disturb one another; its access log is a file it creates."""
    folder = tmp_path_factory.mktemp("promises")
    access_log = str(folder / "access.log")
    srv = start_server(folder, "--workers", "2", "--job-concurrency", "2", "--tasks", JOB_TASKS,
                       "--access-log", access_log, prefix=UMASK_0)
    try:
        yield srv
    finally:
        srv.stop(timeout=15)
        srv.kill_all()


def problem_of(reply: Reply, status: int, slug: str) -> dict[str, Any]:
    assert reply.status == status, reply.body
    assert reply.headers["content-type"].startswith("application/problem+json"), reply.headers
    problem: dict[str, Any] = reply.json()
    assert problem["type"] == f"/problems/{slug}", problem
    return problem


# -- a bytes result's headers (docs/api.md, POST /v1/tasks/{name}) ----------------------------------------


def test_a_bytes_result_names_its_worker_and_its_elapsed_ms_with_three_decimals(server: ServerProcess) -> None:
    reply = post_json(server.url + "/v1/tasks/mandelbrot", {"width": 32, "height": 24})
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "image/png" and reply.body.startswith(b"\x89PNG\r\n\x1a\n")
    elapsed = reply.headers["x-procbridge-elapsed-ms"]
    assert re.fullmatch(r"\d+\.\d{3}", elapsed), elapsed  # a non-negative decimal, three decimals
    assert float(elapsed) >= 0
    pids = {w["pid"] for w in http("GET", server.url + "/v1/workers").json()["workers"]}
    assert int(reply.headers["x-procbridge-worker"]) in pids, (reply.headers, pids)


# -- Idempotency-Key: 1 to 200 characters (docs/api.md, Jobs) -----------------------------------------------


def test_an_idempotency_key_of_200_characters_is_taken_and_an_empty_or_201_character_one_is_422(
    server: ServerProcess,
) -> None:
    longest = f"{os.getpid()}-".ljust(200, "k")
    taken = submit(server.url, "jt_log", {"path": os.devnull, "label": "a"}, key=longest)
    assert taken.status == 202, taken.body
    again = submit(server.url, "jt_log", {"path": os.devnull, "label": "b"}, key=longest)
    assert again.status == 202 and again.json()["id"] == taken.json()["id"]  # the key was kept whole
    for key in (longest + "k", ""):
        problem = problem_of(submit(server.url, "jt_log", {"path": os.devnull, "label": "c"}, key=key),
                             422, "invalid-arguments")
        assert problem["errors"] == [{"field": "Idempotency-Key", "message": "bad length"}], problem
        assert "1 to 200 characters" in problem["detail"]


# -- GET /v1/jobs/{id}/result before and after the end (docs/api.md, Jobs) ------------------------------------


def test_the_result_of_a_queued_or_running_job_is_409_job_not_finished(
    server: ServerProcess, tmp_path: Path
) -> None:
    queued = submit(server.url, "jt_log", {"path": os.devnull, "label": "later"}, delay=3600).json()
    assert job(server.url, queued["id"])["status"] == "queued"
    problem_of(http("GET", f"{server.url}/v1/jobs/{queued['id']}/result"), 409, "job-not-finished")
    assert http("DELETE", f"{server.url}/v1/jobs/{queued['id']}").status == 200

    gate = tmp_path / "gate"
    running = submit(server.url, "jt_flaky", {"folder": str(tmp_path), "gate": str(gate)}).json()
    wait_for((tmp_path / "attempts").exists, 30, what="the job to start")  # it waits for the gate now
    assert job(server.url, running["id"])["status"] == "running"
    problem_of(http("GET", f"{server.url}/v1/jobs/{running['id']}/result"), 409, "job-not-finished")
    gate.touch()
    assert wait_final(server.url, running["id"])["status"] == "succeeded"
    result = http("GET", f"{server.url}/v1/jobs/{running['id']}/result")
    assert result.status == 200 and result.json()["attempt"] == 1, result.body


def test_the_result_of_a_failed_or_cancelled_job_is_409_job_failed_with_its_error(
    server: ServerProcess, tmp_path: Path
) -> None:
    failed = submit(server.url, "jt_flaky", {"folder": str(tmp_path), "fail_first": 1}).json()
    final = wait_final(server.url, failed["id"])
    assert final["status"] == "failed"
    problem = problem_of(http("GET", f"{server.url}/v1/jobs/{failed['id']}/result"), 409, "job-failed")
    assert problem["error"] == final["error"] and final["error"]["type"] == "/problems/task-failed", problem

    cancelled = submit(server.url, "jt_log", {"path": os.devnull, "label": "never"}, delay=3600).json()
    assert http("DELETE", f"{server.url}/v1/jobs/{cancelled['id']}").status == 200
    problem = problem_of(http("GET", f"{server.url}/v1/jobs/{cancelled['id']}/result"), 409, "job-failed")
    assert problem["error"]["type"] == "/problems/job-cancelled", problem


# -- the access-log file (docs/security.md, Logs) ----------------------------------------------------------


def test_the_access_log_file_is_created_with_mode_0640(server: ServerProcess) -> None:
    log = server.log_path.parent / "access.log"
    assert http("GET", server.url + "/healthz").status == 200
    wait_for(lambda: log.exists() and b'"path":"/healthz"' in log.read_bytes(), 30, what="the access line")
    assert stat.S_IMODE(log.stat().st_mode) == 0o640  # the server ran with umask 0: nothing masked


def test_an_existing_access_log_keeps_its_mode_and_contents_and_is_appended_to(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(b"an earlier line\n")
    log.chmod(0o604)
    with serving(tmp_path, "--workers", "1", "--access-log", str(log)) as srv:
        assert http("GET", srv.url + "/healthz").status == 200
        wait_for(lambda: b'"path":"/healthz"' in log.read_bytes(), 30, what="the access line")
    assert stat.S_IMODE(log.stat().st_mode) == 0o604
    first, *rest = log.read_bytes().splitlines()
    assert first == b"an earlier line" and rest
    assert all(json.loads(line)["event"] == "access" for line in rest)


# -- Retry-After of 503 overloaded and draining (docs/api.md, errors) ------------------------------------------


def test_overloaded_says_retry_after_1_and_draining_says_retry_after_5(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    srv = start_server(tmp_path, "--workers", "1", "--max-pending", "1", "--shutdown-grace", "60", "--tasks", FAULTS)
    held = []
    try:
        def gated(name: str) -> Reply:
            return post_json(srv.url + "/v1/tasks/mark_then_wait",
                             {"path": str(tmp_path / name), "release": str(gate)}, timeout=60)

        held.append(run_in_thread(gated, "running"))
        wait_for((tmp_path / "running").exists, 30, what="the first call to hold the only worker")
        held.append(run_in_thread(gated, "queued"))
        wait_for(lambda: metric(srv, "procbridge_pending_tasks") == 1, 30, what="the second call to wait")

        overloaded = post_json(srv.url + "/v1/tasks/echo", {"value": 1})
        problem_of(overloaded, 503, "overloaded")
        assert overloaded.headers["retry-after"] == "1"

        srv.proc.send_signal(signal.SIGTERM)  # the held calls keep the drain open
        draining = wait_for(
            lambda: (r := post_json(srv.url + "/v1/tasks/echo", {"value": 2})).json()["type"] == "/problems/draining"
            and r,
            30, 0.02, "a new call to be refused as draining",
        )
        problem_of(draining, 503, "draining")
        assert draining.headers["retry-after"] == "5"
    finally:
        gate.touch()
        replies = [joined(thread, box, 60) for thread, box in held]
        code = srv.stop(timeout=60)
        srv.kill_all()
    assert [r.status for r in replies] == [200, 200], [r.body for r in replies]  # admitted calls still finish
    assert code == 0
