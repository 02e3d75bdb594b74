"""Async jobs through the real server: submit, poll, list, result, cancel, SSE, recovery, expiry."""

from __future__ import annotations

import contextlib
import http.client as httpclient
import json
import os
import signal
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import http, post_json, start_server, wait_for
from tests.support.redis_server import RedisServer, need_redis_server
from tests.support.sse import SseParser

FAULTS = "tests.support.fault_tasks"


def submit(
    url: str, task: str, args: dict[str, Any], key: str | None = None, timeout: float | None = None, **options: Any
) -> Any:
    """POST /v1/jobs; `options` are the job's other fields (priority, delay, run_at, retries, webhook)."""
    body: dict[str, Any] = {"task": task, "args": args, **options}
    if timeout is not None:
        body["timeout"] = timeout
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return http("POST", url + "/v1/jobs", json.dumps(body).encode(), headers)


def job(url: str, job_id: str) -> dict[str, Any]:
    reply = http("GET", f"{url}/v1/jobs/{job_id}")
    assert reply.status == 200, reply.body
    return reply.json()


def wait_final(url: str, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    return wait_for(
        lambda: (j := job(url, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
        timeout, 0.02, f"job {job_id} to finish",
    )


def sse_events(url: str, path: str, timeout: float = 30.0) -> Iterator[tuple[str, Any]]:
    """Read a server-sent-event stream with a plain HTTP client until the server ends it."""
    for _id, event, data in sse_stream(url, path, timeout=timeout):
        yield event, data


def sse_stream(
    url: str, path: str, *, last_event_id: str | None = None, timeout: float = 30.0
) -> Generator[tuple[str | None, str, Any], None, None]:
    """(id, event, data) of each event of a stream, sending `Last-Event-ID` when given; closing it
    (or leaving a `with contextlib.closing(...)` block) cuts the connection."""
    host, port = url.removeprefix("http://").split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("Content-Type", "").startswith("text/event-stream")
    parser = SseParser()
    try:
        for raw in resp:
            event = parser.feed(raw)
            if event is not None:
                yield event
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jobs")
    srv = start_server(tmp, "--workers", "2", "--job-concurrency", "2", "--tasks", FAULTS)
    yield srv
    srv.stop()
    srv.kill_all()


def test_submit_poll_and_result(server):
    reply = submit(server.url, "primes", {"limit": 100000})
    assert reply.status == 202, reply.body
    created = reply.json()
    assert reply.headers["location"] == f"/v1/jobs/{created['id']}"
    assert created["task"] == "primes" and created["status"] in ("queued", "running", "succeeded")
    assert set(created) >= {"id", "task", "status", "created_at", "started_at", "finished_at", "progress"}
    done = wait_final(server.url, created["id"])
    assert done["status"] == "succeeded" and done["result"] == 9592
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    result = http("GET", f"{server.url}/v1/jobs/{created['id']}/result")
    assert result.status == 200 and result.json() == 9592


def test_binary_result_is_served_raw(server):
    created = submit(server.url, "mandelbrot", {"width": 32, "height": 24}).json()
    done = wait_final(server.url, created["id"])
    assert done["status"] == "succeeded"
    result = http("GET", f"{server.url}/v1/jobs/{created['id']}/result")
    assert result.status == 200 and result.headers["content-type"] == "image/png"
    assert result.body.startswith(b"\x89PNG\r\n\x1a\n")


def test_args_that_are_not_an_object_are_named_in_the_422(server):
    reply = post_json(server.url + "/v1/jobs", {"task": "primes", "args": [1]})
    assert reply.status == 422, reply.body
    problem = reply.json()
    assert problem["detail"].startswith("args: ") and problem["errors"] == [
        {"field": "args", "message": "must be a JSON object"}
    ]


@pytest.mark.parametrize(
    ("body", "status", "slug"),
    [
        ({"task": "nope", "args": {}}, 404, "unknown-task"),
        ({"task": "primes", "args": {"limit": -1}}, 422, "invalid-arguments"),
        ({"task": "primes", "args": {"limit": 5, "x": 1}}, 422, "invalid-arguments"),
        ({"task": "primes", "args": {"limit": 5}, "timeout": -1}, 422, "invalid-arguments"),
        ({"task": "primes", "args": {"limit": 5}, "timeout": "soon"}, 422, "invalid-arguments"),
        ({"args": {"limit": 5}}, 422, "invalid-arguments"),
        ({"task": "primes", "args": {"limit": 5}, "priority": "high"}, 422, "invalid-arguments"),
        ({"task": "primes", "args": {"limit": 5}, "priority": 1.5}, 422, "invalid-arguments"),
        ({"task": "primes", "args": {"limit": 5}, "priority": 2**31}, 422, "invalid-arguments"),
        ({"task": "primes", "args": {"limit": 5}, "delay": -1}, 422, "invalid-arguments"),
        ({"task": "primes", "args": {"limit": 5}, "delay": 1, "run_at": 5}, 422, "invalid-arguments"),
        ({"task": "primes", "args": {"limit": 5}, "run_at": "tomorrow"}, 422, "invalid-arguments"),
        ({"task": "primes", "args": {"limit": 5}, "retries": 101}, 422, "invalid-arguments"),
        ({"task": "primes", "args": {"limit": 5}, "retries": -1}, 422, "invalid-arguments"),
        ({"task": "primes", "args": {"limit": 5}, "unknown": 1}, 422, "invalid-arguments"),
        ([1, 2], 400, "invalid-json"),
    ],
)
def test_submit_is_validated_like_a_call(server, body, status, slug):
    reply = post_json(server.url + "/v1/jobs", body)
    assert reply.status == status, reply.body
    assert reply.headers["content-type"].startswith("application/problem+json")
    assert reply.json()["type"] == f"/problems/{slug}"


def test_unknown_job_is_404(server):
    for method, path in [("GET", ""), ("DELETE", ""), ("GET", "/result"), ("GET", "/events")]:
        reply = http(method, f"{server.url}/v1/jobs/0000000000000000{path}")
        assert reply.status == 404 and reply.json()["type"] == "/problems/unknown-job"


def test_idempotency_key_returns_the_first_job(server):
    key = f"k-{time.time_ns()}"
    first = submit(server.url, "primes", {"limit": 10}, key=key)
    second = submit(server.url, "primes", {"limit": 10}, key=key)
    other = submit(server.url, "primes", {"limit": 10}, key=key + "-other")
    assert first.status == second.status == 202
    assert first.json()["id"] == second.json()["id"] != other.json()["id"]


def test_list_newest_first_with_filters(server):
    ids = [submit(server.url, "primes", {"limit": i}).json()["id"] for i in range(3)]
    for job_id in ids:
        wait_final(server.url, job_id)
    listing = http("GET", f"{server.url}/v1/jobs?limit=3").json()["jobs"]
    assert [j["id"] for j in listing] == ids[::-1]
    succeeded = http("GET", f"{server.url}/v1/jobs?status=succeeded&limit=1000").json()["jobs"]
    assert set(ids) <= {j["id"] for j in succeeded}
    assert all(j["status"] == "succeeded" for j in succeeded)
    for query in ("status=done", "limit=0", "limit=x"):
        assert http("GET", f"{server.url}/v1/jobs?{query}").status == 422
    empty = http("GET", f"{server.url}/v1/jobs?status=&limit=")  # the contract's own spelling: no filter, default limit
    assert empty.status == 200 and set(ids) <= {j["id"] for j in empty.json()["jobs"]}


def test_failed_and_timed_out_jobs(server):
    failed = submit(server.url, "fail", {"message": "no luck"}).json()
    timed = submit(server.url, "spin_forever", {}, timeout=0.3).json()
    f, t = wait_final(server.url, failed["id"]), wait_final(server.url, timed["id"])
    assert f["status"] == "failed" and f["error"]["type"] == "/problems/task-failed"
    assert "no luck" in f["error"]["detail"]
    assert t["status"] == "failed" and t["error"]["type"] == "/problems/task-timeout"
    reply = http("GET", f"{server.url}/v1/jobs/{failed['id']}/result")
    assert reply.status == 409


def test_cancel_queued_running_and_finished(tmp_path):
    srv = start_server(tmp_path, "--workers", "1", "--job-concurrency", "1", "--tasks", FAULTS)
    try:
        started, release = tmp_path / "started", tmp_path / "release"
        running = submit(srv.url, "mark_then_wait", {"path": str(started), "release": str(release)}).json()
        queued_marker = tmp_path / "queued-ran"
        queued = submit(srv.url, "mark", {"path": str(queued_marker)}).json()
        wait_for(lambda: started.exists() and started.read_text(), 10, what="the first job to start")
        worker_pid = int(started.read_text())  # written, not just created (write_text is not atomic)

        cancel_q = http("DELETE", f"{srv.url}/v1/jobs/{queued['id']}")
        assert cancel_q.status == 200 and cancel_q.json()["status"] == "cancelled"

        cancel_r = http("DELETE", f"{srv.url}/v1/jobs/{running['id']}")
        assert cancel_r.status == 200 and cancel_r.json()["status"] == "cancelled"
        # the worker that ran it was stopped (and replaced)
        wait_for(lambda: not _alive(worker_pid), 5, what="the cancelled job's worker to be killed")
        assert job(srv.url, running["id"])["status"] == "cancelled"

        again = http("DELETE", f"{srv.url}/v1/jobs/{running['id']}")
        assert again.status == 409 and again.json()["type"] == "/problems/job-finished"
        # the queued one never ran, even once a worker is free again
        after = submit(srv.url, "primes", {"limit": 10}).json()
        assert wait_final(srv.url, after["id"])["status"] == "succeeded"
        assert not queued_marker.exists()
        assert job(srv.url, queued["id"])["started_at"] is None
    finally:
        srv.stop()
        srv.kill_all()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_events_stream_progress_then_result(server):
    created = submit(server.url, "burn", {"ms": 400}).json()
    events = list(sse_events(server.url, f"/v1/jobs/{created['id']}/events"))
    names = [e for e, _ in events]
    assert names[-1] == "result", names
    assert names.count("result") == 1 and "error" not in names
    assert any(e == "status" and d["status"] == "running" for e, d in events) or names[0] == "progress"
    progress = [d for e, d in events if e == "progress"]
    assert progress, names
    assert progress[-1]["total"] == 100 and 0 < progress[-1]["done"] <= 100
    assert events[-1][1]["result"]["pid"] > 0
    # the stored job keeps the last report the task made (burn ends on 100%)
    assert job(server.url, created["id"])["progress"] == {"done": 100.0, "total": 100.0, "message": "100%"}


def test_late_listener_gets_the_whole_log_then_the_end_each_with_an_id(server):
    created = submit(server.url, "primes", {"limit": 1000}).json()
    wait_final(server.url, created["id"])
    events = list(sse_stream(server.url, f"/v1/jobs/{created['id']}/events"))
    assert [(i, e) for i, e, _ in events] == [("1-1", "status"), ("end-1", "status"), ("end-2", "result")]
    assert events[0][2] == {"status": "running", "attempt": 1}
    assert events[1][2] == {"status": "succeeded"} and events[2][2]["result"] == 168


def test_several_listeners_each_get_the_whole_stream(server):
    created = submit(server.url, "burn", {"ms": 500}).json()
    results: list[list[tuple[str, Any]]] = []

    def listen() -> None:
        results.append(list(sse_events(server.url, f"/v1/jobs/{created['id']}/events")))

    threads = [threading.Thread(target=listen) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 3
    for events in results:
        assert events[-1][0] == "result"
        assert events[-1][1]["result"]["ms"] >= 500


def test_cancelled_job_stream_ends_with_error(tmp_path):
    srv = start_server(tmp_path, "--workers", "1", "--job-concurrency", "1", "--tasks", FAULTS)
    try:
        started, release = tmp_path / "started", tmp_path / "release"
        created = submit(srv.url, "mark_then_wait", {"path": str(started), "release": str(release)}).json()
        wait_for(started.exists, 10, what="the job to start")
        got: list[list[tuple[str, Any]]] = []
        listener = threading.Thread(target=lambda: got.append(list(sse_events(srv.url,
                                                                              f"/v1/jobs/{created['id']}/events"))))
        listener.start()
        wait_for(lambda: job(srv.url, created["id"])["status"] == "running", 5)
        assert http("DELETE", f"{srv.url}/v1/jobs/{created['id']}").status == 200
        listener.join(15)
        assert got and got[0][-1][0] == "error"
        assert ("status", {"status": "cancelled"}) in got[0]
    finally:
        srv.stop()
        srv.kill_all()


def test_jobs_survive_a_crash_and_run_to_the_end(tmp_path):
    """SIGKILL the service with jobs queued and running; restart on the same store: every accepted
    job reaches a final state, exactly once in the listing."""
    srv = start_server(tmp_path, "--workers", "1", "--job-concurrency", "1", "--tasks", FAULTS)
    started, release = tmp_path / "started", tmp_path / "release"
    first = submit(srv.url, "mark_then_wait", {"path": str(started), "release": str(release), "limit_s": 5}).json()
    rest = [submit(srv.url, "primes", {"limit": 1000 + i}).json()["id"] for i in range(5)]
    wait_for(started.exists, 10, what="the first job to start")
    srv.descendants()
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(10)
    release.touch()  # the orphaned worker may finish its task; the job must still run again
    wait_for(lambda: not srv.leftovers(), 15, what="the killed server's processes to go")

    again = start_server(tmp_path, "--workers", "1", "--job-concurrency", "1", "--tasks", FAULTS)  # same store
    try:
        for job_id in [first["id"], *rest]:
            assert wait_final(again.url, job_id)["status"] == "succeeded"
        listing = http("GET", f"{again.url}/v1/jobs?limit=1000").json()["jobs"]
        ids = [j["id"] for j in listing]
        assert sorted(ids) == sorted({first["id"], *rest})
        recovered = job(again.url, first["id"])
        assert recovered["result"]["released"] is True
    finally:
        again.stop()
        again.kill_all()


def test_finished_jobs_expire(tmp_path):
    srv = start_server(tmp_path, "--workers", "1", "--job-ttl", "1")
    try:
        created = submit(srv.url, "primes", {"limit": 10}).json()
        wait_final(srv.url, created["id"])
        wait_for(lambda: http("GET", f"{srv.url}/v1/jobs/{created['id']}").status == 404, 15,
                 0.1, "the finished job to expire")
    finally:
        srv.stop()
        srv.kill_all()


def test_queued_jobs_stay_for_the_next_start(tmp_path):
    srv = start_server(tmp_path, "--workers", "1", "--job-concurrency", "1", "--tasks", FAULTS,
                       "--shutdown-grace", "0.5")
    started, release = tmp_path / "started", tmp_path / "release"
    busy = submit(srv.url, "mark_then_wait", {"path": str(started), "release": str(release), "limit_s": 3}).json()
    queued = submit(srv.url, "primes", {"limit": 100}).json()
    wait_for(started.exists, 10, what="the first job to start")
    assert srv.stop() == 0
    release.touch()
    again = start_server(tmp_path, "--workers", "1", "--tasks", FAULTS)
    try:
        assert wait_final(again.url, queued["id"])["status"] == "succeeded"
        assert wait_final(again.url, busy["id"])["status"] == "succeeded"
    finally:
        again.stop()
        again.kill_all()


def test_job_concurrency_caps_running_jobs(tmp_path):
    """Two workers, --job-concurrency 1: a second job waits even though a worker is free, and a
    synchronous call still gets that worker."""
    srv = start_server(tmp_path, "--workers", "2", "--job-concurrency", "1", "--tasks", FAULTS)
    try:
        started, release = tmp_path / "started", tmp_path / "release"
        first = submit(srv.url, "mark_then_wait", {"path": str(started), "release": str(release)}).json()
        second = submit(srv.url, "primes", {"limit": 10}).json()
        wait_for(started.exists, 10, what="the first job to start")
        assert post_json(srv.url + "/v1/tasks/primes", {"limit": 10}).json()["result"] == 4
        assert job(srv.url, second["id"])["status"] == "queued"
        release.touch()
        assert wait_final(srv.url, first["id"])["status"] == "succeeded"
        assert wait_final(srv.url, second["id"])["status"] == "succeeded"
    finally:
        srv.stop()
        srv.kill_all()


def test_two_replicas_share_a_redis_store(tmp_path):
    need_redis_server()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    url = redis.url("pbe2e:")
    a = start_server(tmp_path / "a", "--workers", "1", "--tasks", FAULTS, env={"PROCBRIDGE_STORE": url})
    b = start_server(tmp_path / "b", "--workers", "1", "--tasks", FAULTS, env={"PROCBRIDGE_STORE": url})
    try:
        ids = [submit(a.url, "primes", {"limit": 100 + i}).json()["id"] for i in range(6)]
        for job_id in ids:  # any replica answers for any job
            assert wait_final(b.url, job_id)["status"] == "succeeded"
        listing = {j["id"] for j in http("GET", f"{b.url}/v1/jobs?limit=1000").json()["jobs"]}
        assert set(ids) <= listing
        # a job running on one replica is cancelled through the other
        started, release = tmp_path / "started", tmp_path / "release"
        running = submit(a.url, "mark_then_wait", {"path": str(started), "release": str(release)}).json()
        wait_for(lambda: started.exists() and started.read_text(), 10, what="the job to start on some replica")
        pid = int(started.read_text())
        assert http("DELETE", f"{b.url}/v1/jobs/{running['id']}").json()["status"] == "cancelled"
        wait_for(lambda: not _alive(pid), 5, what="the worker running the cancelled job to be stopped")
        events = list(sse_events(a.url, f"/v1/jobs/{running['id']}/events"))
        assert events[-1][0] == "error"
    finally:
        for srv in (a, b):
            srv.stop()
            srv.kill_all()
        redis.stop()


def test_a_killed_replicas_running_job_runs_again_on_the_other(tmp_path):
    """Two replicas on Redis: SIGKILL the one running a job. While the job's lease (--job-lease 6) holds,
    it stays running; once it has run out, the surviving replica queues it again and runs it to the
    end, with no restart. (The status is read right after the kill: 6 s is a wide margin over that.)"""
    need_redis_server()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    env = {"PROCBRIDGE_STORE": redis.url("pblease:"), "PROCBRIDGE_JOB_LEASE": "6"}
    a = start_server(tmp_path / "a", "--workers", "1", "--tasks", FAULTS, env=env)
    b = start_server(tmp_path / "b", "--workers", "1", "--tasks", FAULTS, env=env)
    try:
        started, release = tmp_path / "started", tmp_path / "release"
        running = submit(a.url, "mark_then_wait", {"path": str(started), "release": str(release),
                                                   "limit_s": 20}).json()
        wait_for(lambda: started.exists() and started.read_text(), 10, what="the job to start on some replica")
        first_pid = int(started.read_text())
        owner, survivor = (a, b) if first_pid in {p.pid for p in a.descendants()} else (b, a)
        assert first_pid in {p.pid for p in owner.descendants()}
        owner.proc.send_signal(signal.SIGKILL)
        owner.proc.wait(10)
        assert job(survivor.url, running["id"])["status"] == "running"  # the dead replica's lease still holds it
        # Its orphaned worker too: the job must run again elsewhere, not finish there. The rest of
        # what it started (the resource tracker, which unlinks its shared memory) goes by itself.
        with contextlib.suppress(ProcessLookupError):
            os.kill(first_pid, signal.SIGKILL)
        wait_for(lambda: not owner.leftovers(), 15, what="the killed replica's processes to go")
        wait_for(lambda: started.read_text() != str(first_pid), 40, 0.05, "the survivor to run the job again")
        release.touch()
        final = wait_final(survivor.url, running["id"])
        assert final["status"] == "succeeded" and final["result"]["released"] is True
        assert final["result"]["pid"] in {p.pid for p in survivor.descendants()}
    finally:
        for srv in (a, b):
            srv.stop()
            srv.kill_all()
        redis.stop()


def test_openapi_documents_jobs_and_map(server):
    doc = http("GET", server.url + "/openapi.json").json()
    paths = doc["paths"]
    assert {"post", "get"} <= set(paths["/v1/jobs"])
    assert {"get", "delete"} <= set(paths["/v1/jobs/{id}"])
    assert "get" in paths["/v1/jobs/{id}/result"] and "get" in paths["/v1/jobs/{id}/events"]
    item = paths["/v1/tasks/primes/map"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert item["properties"]["items"]["items"]["properties"]["limit"]["maximum"] == 10**8
    assert "Job" in doc["components"]["schemas"]
