"""Issue 19's promises through real servers, on each store (SQLite, and a real Redis): priority, delay and
run_at, retries with back-off (raised, crashed, timed out; never for a synchronous call), a cancel beating
a retry, SSE ids and Last-Event-ID resume, paged listing while jobs are added, and all of it across a
SIGKILL and a restart.

Tasks are tests/support/job_tasks.py (jt_*): gates and reports are files; nothing waits by sleeping.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess, http, post_json, serving, start_server, wait_for
from tests.e2e.test_jobs import job, sse_stream, submit, wait_final
from tests.support.redis_server import RedisServer

TASKS = "tests.support.fault_tasks,tests.support.job_tasks"
BACKOFF = 0.25  # --retry-backoff: the first retry's back-off (the second's is twice that)
SERVER_ARGS = ("--workers", "2", "--job-concurrency", "1", "--tasks", TASKS, "--retry-backoff", str(BACKOFF))
MARGIN = 1.0  # how long past a time something must still not have happened
Event = tuple[str | None, str, Any]  # (id, event, data) of one SSE event


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The servers' store: SQLite (start_server's default, a file in the server's folder), or a key
    prefix of its own on the session's redis-server."""
    if request.param == "sqlite":
        return {}
    redis: RedisServer = request.getfixturevalue("redis_server")
    return {"PROCBRIDGE_STORE": redis.url(f"further-{uuid.uuid4().hex[:8]}:")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, store_env: dict[str, str]) -> Iterator[ServerProcess]:
    with serving(tmp_path_factory.mktemp("jobs-further"), *SERVER_ARGS, env=store_env) as srv:
        yield srv


def enqueue(url: str, task: str, args: dict[str, Any], **options: Any) -> dict[str, Any]:
    reply = submit(url, task, args, **options)
    assert reply.status == 202, reply.body
    created: dict[str, Any] = reply.json()
    return created


def attempt_times(folder: Path) -> list[float]:
    """When each attempt of a jt_ task began (its `attempts` file)."""
    path = folder / "attempts"
    return [float(line) for line in path.read_text().split()] if path.exists() else []


def events_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/events"


def take_until(stream: Iterator[Event], stop: Callable[[Event], bool]) -> list[Event]:
    """The events of an open stream up to the first one `stop` accepts (the connection stays open)."""
    seen: list[Event] = []
    for event in stream:
        seen.append(event)
        if stop(event):
            return seen
    raise AssertionError(f"the stream ended before the awaited event: {seen}")


def read_until(url: str, path: str, stop: Callable[[Event], bool]) -> list[Event]:
    """Read a stream up to the first event `stop` accepts, then cut the connection."""
    with contextlib.closing(sse_stream(url, path)) as stream:
        return take_until(stream, stop)


def is_item(value: int) -> Callable[[Event], bool]:
    return lambda event: event[1] == "item" and event[2] == {"item": value}


def event_order(event_id: str | None) -> tuple[float, float]:
    """Where an id sorts in a stream: `run-seq` in order, then end-1 and end-2."""
    assert event_id is not None
    run, _, seq = event_id.partition("-")
    return (float("inf") if run == "end" else int(run), int(seq))


def assert_queued_until_run_at(url: str, jobs: list[dict[str, Any]]) -> None:
    """Poll each job until its run_at has passed: every answer that came back before it says queued."""
    latest = max(j["run_at"] for j in jobs)
    while True:  # bounded by the clock: ends once the latest run_at has passed
        docs = [job(url, j["id"]) for j in jobs]
        answered = time.time()
        for doc, submitted in zip(docs, jobs, strict=True):
            if answered < submitted["run_at"]:
                assert doc["status"] == "queued" and doc["started_at"] is None, doc
        if answered >= latest:
            return
        time.sleep(0.02)  # a poll period, not a synchronisation: only the clock ends this loop


def assert_started_in_order(done: list[dict[str, Any]], priorities: list[int]) -> None:
    """Highest priority first, equal priorities in submission order (the order of `done`)."""
    expected = sorted(range(len(done)), key=lambda i: (-priorities[i], i))
    by_start = sorted(range(len(done)), key=lambda i: done[i]["started_at"])
    assert by_start == expected, [(done[i]["priority"], done[i]["started_at"]) for i in by_start]


def list_pages(url: str, query: str, between: Callable[[], object] | None = None) -> list[list[dict[str, Any]]]:
    """Every page of GET /v1/jobs?<query>, following `next`; `between` runs after each page but the last."""
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    for _ in range(1000):
        more = "" if cursor is None else f"&cursor={urllib.parse.quote(cursor)}"
        reply = http("GET", f"{url}/v1/jobs?{query}{more}")
        assert reply.status == 200, reply.body
        body = reply.json()
        pages.append(body["jobs"])
        cursor = body["next"]
        if cursor is None:
            return pages
        if between is not None:
            between()
    raise AssertionError("the listing never gave `next: null`")


def assert_each_once_newest_first(pages: list[list[dict[str, Any]]], ids: set[str], limit: int) -> None:
    listed = [j for page in pages for j in page]
    assert sorted(j["id"] for j in listed) == sorted(ids)  # every one, exactly once, and nothing else
    keys = [(j["created_at"], j["id"]) for j in listed]
    assert all(a > b for a, b in pairwise(keys)), "not strictly newest first"
    assert all(len(page) == limit for page in pages[:-1]) and 0 < len(pages[-1]) <= limit


# -- priority and delay -----------------------------------------------------------------------------------


def test_higher_priority_runs_first_and_equal_priorities_in_submission_order(
    server: ServerProcess, tmp_path: Path
) -> None:
    started, release, order = tmp_path / "started", tmp_path / "release", tmp_path / "order"
    blocker = enqueue(server.url, "mark_then_wait", {"path": str(started), "release": str(release)})
    wait_for(started.exists, 10, what="the blocker to hold the one job slot")
    priorities = [0, 5, 0, 5, 10, -3, 0]
    jobs = [enqueue(server.url, "jt_log", {"path": str(order), "label": str(i)}, priority=p)
            for i, p in enumerate(priorities)]
    assert [(j["status"], j["priority"]) for j in jobs] == [("queued", p) for p in priorities]
    release.touch()
    done = [wait_final(server.url, j["id"]) for j in jobs]
    assert [(d["status"], d["priority"]) for d in done] == [("succeeded", p) for p in priorities]
    assert_started_in_order(done, priorities)
    assert order.read_text().split() == ["4", "1", "3", "0", "2", "6", "5"]
    assert wait_final(server.url, blocker["id"])["priority"] == 0  # the default


def test_a_delayed_job_stays_queued_until_its_run_at_then_runs(server: ServerProcess, tmp_path: Path) -> None:
    order = tmp_path / "order"
    by_delay = enqueue(server.url, "jt_log", {"path": str(order), "label": "delay"}, delay=1.5)
    at = time.time() + 1.0
    by_time = enqueue(server.url, "jt_log", {"path": str(order), "label": "run_at"}, run_at=at)
    assert by_delay["run_at"] == pytest.approx(by_delay["created_at"] + 1.5, abs=1e-3)
    assert by_time["run_at"] == pytest.approx(at, abs=1e-6)
    assert_queued_until_run_at(server.url, [by_delay, by_time])
    for created in (by_delay, by_time):
        done = wait_final(server.url, created["id"])
        assert done["status"] == "succeeded" and done["run_at"] == created["run_at"]
        assert done["started_at"] >= done["run_at"]
    assert order.read_text().split() == ["run_at", "delay"]


def test_a_delayed_job_does_not_hold_up_a_later_one(server: ServerProcess, tmp_path: Path) -> None:
    order = tmp_path / "order"
    delayed = enqueue(server.url, "jt_log", {"path": str(order), "label": "delayed"}, delay=3600, priority=10)
    later = enqueue(server.url, "jt_log", {"path": str(order), "label": "later"})
    assert wait_final(server.url, later["id"])["status"] == "succeeded"
    assert job(server.url, delayed["id"])["status"] == "queued"
    assert http("DELETE", f"{server.url}/v1/jobs/{delayed['id']}").json()["status"] == "cancelled"
    assert order.read_text().split() == ["later"]


# -- retries ------------------------------------------------------------------------------------------


def test_a_job_with_retries_succeeds_on_its_third_attempt_after_growing_back_offs(
    server: ServerProcess, tmp_path: Path
) -> None:
    created = enqueue(server.url, "jt_flaky", {"folder": str(tmp_path), "fail_first": 2}, retries=2)
    assert (created["retries"], created["attempts"]) == (2, 0)
    done = wait_final(server.url, created["id"])
    assert done["status"] == "succeeded" and done["result"]["attempt"] == 3, done
    assert done["attempts"] == 3 and "error" not in done
    assert done["last_error"]["type"] == "/problems/task-failed"
    assert "attempt 2 failed" in done["last_error"]["detail"]
    times = attempt_times(tmp_path)
    assert len(times) == 3
    assert times[1] - times[0] >= BACKOFF / 2 and times[2] - times[1] >= BACKOFF, times  # base, then 2·base


def test_a_job_whose_retries_run_out_fails_with_its_last_error(server: ServerProcess, tmp_path: Path) -> None:
    created = enqueue(server.url, "jt_flaky", {"folder": str(tmp_path), "fail_first": 99}, retries=1)
    done = wait_final(server.url, created["id"])
    assert done["status"] == "failed" and done["attempts"] == 2, done
    assert done["error"] == done["last_error"] and "attempt 2 failed" in done["error"]["detail"]
    assert len(attempt_times(tmp_path)) == 2


def test_the_tasks_retries_apply_unless_the_job_gives_its_own(server: ServerProcess, tmp_path: Path) -> None:
    default, override = tmp_path / "default", tmp_path / "override"
    default.mkdir()
    override.mkdir()
    by_task = enqueue(server.url, "jt_flaky_retries2", {"folder": str(default), "fail_first": 99})
    by_job = enqueue(server.url, "jt_flaky_retries2", {"folder": str(override), "fail_first": 99}, retries=0)
    assert (by_task["retries"], by_job["retries"]) == (2, 0)
    assert wait_final(server.url, by_job["id"])["attempts"] == 1
    done = wait_final(server.url, by_task["id"])
    assert done["status"] == "failed" and done["attempts"] == 3, done
    assert (len(attempt_times(default)), len(attempt_times(override))) == (3, 1)


@pytest.mark.parametrize(("how", "timeout", "slug"), [("crash", None, "worker-crashed"),
                                                      ("hang", 0.5, "task-timeout")])
def test_a_crashed_or_timed_out_attempt_is_retried(
    server: ServerProcess, tmp_path: Path, how: str, timeout: float | None, slug: str
) -> None:
    args = {"folder": str(tmp_path), "fail_first": 1, "how": how}
    created = enqueue(server.url, "jt_flaky", args, retries=1, timeout=timeout)
    done = wait_final(server.url, created["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert done["last_error"]["type"] == f"/problems/{slug}"
    assert len(attempt_times(tmp_path)) == 2


def test_a_synchronous_call_of_a_task_with_retries_is_never_retried(server: ServerProcess, tmp_path: Path) -> None:
    reply = post_json(server.url + "/v1/tasks/jt_flaky_retries2", {"folder": str(tmp_path), "fail_first": 99})
    assert reply.status == 500 and reply.json()["type"] == "/problems/task-failed", reply.body
    assert len(attempt_times(tmp_path)) == 1


def test_a_cancel_while_a_retry_waits_ends_the_job_for_good(server: ServerProcess, tmp_path: Path) -> None:
    """The retry waits behind a blocker in the one job slot, so the cancel comes while it waits
    whatever the back-off; once the slot is free and the retry long due, it still never runs."""
    gate, started, release = tmp_path / "gate", tmp_path / "started", tmp_path / "release"
    created = enqueue(server.url, "jt_flaky", {"folder": str(tmp_path), "fail_first": 99, "gate": str(gate)},
                      retries=3)
    wait_for(lambda: attempt_times(tmp_path), 10, what="the first attempt to hold the job slot")
    blocker = enqueue(server.url, "mark_then_wait", {"path": str(started), "release": str(release)}, priority=10)
    gate.touch()  # the first attempt fails; the blocker (priority 10) takes the slot before any retry
    with contextlib.closing(sse_stream(server.url, events_path(created["id"]))) as stream:
        seen = take_until(stream, lambda e: e[1] == "status" and e[2]["status"] == "queued" and "retry_at" in e[2])
        waiting = seen[-1][2]
        assert waiting["attempt"] == 1 and waiting["error"]["type"] == "/problems/task-failed"
        assert waiting["retry_at"] >= attempt_times(tmp_path)[0] + BACKOFF / 2
        wait_for(started.exists, 10, what="the blocker to hold the slot")
        reply = http("DELETE", f"{server.url}/v1/jobs/{created['id']}")
        assert reply.status == 200 and reply.json()["status"] == "cancelled", reply.body
        rest = list(stream)  # the listener still connected hears of the cancel, and its stream ends
    assert [(i, e) for i, e, _ in rest] == [("end-1", "status"), ("end-2", "error")], rest
    assert rest[0][2] == {"status": "cancelled"} and rest[1][2]["type"] == "/problems/job-cancelled"
    release.touch()
    freed = wait_final(server.url, blocker["id"])["finished_at"]
    while time.time() < max(freed, waiting["retry_at"]) + MARGIN:  # bounded by the clock
        doc = job(server.url, created["id"])
        assert doc["status"] == "cancelled" and doc["attempts"] == 1, doc
        assert len(attempt_times(tmp_path)) == 1
        time.sleep(0.05)  # a poll period: only the clock ends this loop


# -- SSE ids and resume ---------------------------------------------------------------------------------


def test_a_stream_resumed_with_last_event_id_continues_with_no_gap_and_no_repeat(
    server: ServerProcess, tmp_path: Path
) -> None:
    created = enqueue(server.url, "jt_items", {"folder": str(tmp_path), "n": 6, "pauses": [3, 5]})
    path = events_path(created["id"])
    wait_for((tmp_path / "waiting-3").exists, 10, what="items 0 to 2 to be yielded")
    first = read_until(server.url, path, is_item(2))
    (tmp_path / "go-3").touch()
    wait_for((tmp_path / "waiting-5").exists, 10, what="items 3 and 4 to be yielded while nobody listens")
    second: list[Event] = []
    with contextlib.closing(sse_stream(server.url, path, last_event_id=first[-1][0])) as stream:
        for event in stream:
            second.append(event)
            if is_item(4)(event):  # caught up: the rest comes live on this connection
                (tmp_path / "go-5").touch()
    full = list(sse_stream(server.url, path))  # another listener, after the end
    assert first + second == full
    ids = [i for i, _, _ in full]
    assert None not in ids and len(set(ids)) == len(ids)
    assert ids == sorted(ids, key=event_order)
    assert [e for _, e, _ in full] == ["status"] + ["item"] * 6 + ["status", "result"]
    assert [d["item"] for _, e, d in full if e == "item"] == list(range(6))
    assert full[0][:2] == ("1-1", "status") and full[0][2]["status"] == "running"
    assert full[-2] == ("end-1", "status", {"status": "succeeded"})
    assert full[-1][0] == "end-2" and full[-1][2]["result"] == list(range(6))


def test_a_job_never_claimed_streams_queued_as_0_0_then_its_end_events(server: ServerProcess, tmp_path: Path) -> None:
    created = enqueue(server.url, "jt_log", {"path": str(tmp_path / "ran"), "label": "x"}, delay=3600)
    with contextlib.closing(sse_stream(server.url, events_path(created["id"]))) as stream:
        assert next(stream) == ("0-0", "status", {"status": "queued"})
        assert http("DELETE", f"{server.url}/v1/jobs/{created['id']}").status == 200
        rest = list(stream)
    assert [(i, e, d.get("status")) for i, e, d in rest] == [("end-1", "status", "cancelled"),
                                                            ("end-2", "error", 409)]
    again = list(sse_stream(server.url, events_path(created["id"]), last_event_id="0-0"))
    assert again == rest  # a cancelled job that never ran logged nothing after 0-0


def test_resuming_after_the_end_events_gives_only_what_follows_and_a_bad_id_is_refused(
    server: ServerProcess, tmp_path: Path
) -> None:
    created = enqueue(server.url, "jt_flaky", {"folder": str(tmp_path)})
    wait_final(server.url, created["id"])
    path = events_path(created["id"])
    after_log = list(sse_stream(server.url, path, last_event_id="1-1"))
    assert [(i, e) for i, e, _ in after_log] == [("end-1", "status"), ("end-2", "result")]
    assert list(sse_stream(server.url, path, last_event_id="end-1")) == [after_log[1]]
    assert list(sse_stream(server.url, path, last_event_id="end-2")) == []
    for bad in ("garbage", "1-", "-1", "end-3"):
        reply = http("GET", server.url + path, headers={"Accept": "text/event-stream", "Last-Event-ID": bad})
        assert reply.status == 422 and reply.json()["type"] == "/problems/invalid-arguments", (bad, reply.body)


# -- paging (its own server: a thousand queued jobs) -----------------------------------------------------


def test_paging_lists_every_job_once_newest_first_while_jobs_are_added(
    tmp_path: Path, store_env: dict[str, str]
) -> None:
    env = {k: v.replace("further-", "paging-") for k, v in store_env.items()}  # a store of its own
    with serving(tmp_path, "--workers", "1", "--tasks", TASKS, env=env) as srv:
        def make(i: int) -> dict[str, Any]:
            task = "jt_flaky" if i % 10 == 0 else "jt_log"
            args = {"folder": str(tmp_path)} if task == "jt_flaky" else {"path": str(tmp_path / "ran"), "label": "x"}
            return enqueue(srv.url, task, args, delay=3600)

        with ThreadPoolExecutor(8) as pool:
            jobs = list(pool.map(make, range(1000)))
        ids = {j["id"] for j in jobs}
        added: list[str] = []
        pages = list_pages(srv.url, "limit=37", lambda: added.append(make(1)["id"]))
        assert len(added) == len(pages) - 1 == 27  # 1000 = 27·37 + 1
        assert_each_once_newest_first(pages, ids, 37)  # and none added after the first page

        flaky = {j["id"] for j in jobs if j["task"] == "jt_flaky"}
        assert_each_once_newest_first(list_pages(srv.url, "task=jt_flaky&limit=7"), flaky, 7)
        cancelled = set(sorted(flaky)[:15] + sorted(ids - flaky)[:15])
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda i: http("DELETE", f"{srv.url}/v1/jobs/{i}"), cancelled))
        assert {r.status for r in replies} == {200}
        assert_each_once_newest_first(list_pages(srv.url, "status=cancelled&limit=4"), cancelled, 4)
        assert_each_once_newest_first(list_pages(srv.url, "task=jt_flaky&status=queued&limit=9"),
                                      flaky - cancelled, 9)
        for bad in ("nope", "WzFd", "WzEsMl0", "x" * 500):  # not base64 JSON; [1]; [1,2]; garbage bytes
            reply = http("GET", f"{srv.url}/v1/jobs?limit=5&cursor={bad}")
            assert reply.status == 422, (bad, reply.body)
            problem = reply.json()
            assert problem["type"] == "/problems/invalid-arguments" and problem["errors"][0]["field"] == "cursor"
        assert not (tmp_path / "ran").exists() and attempt_times(tmp_path) == []  # none of them ran


# -- SIGKILL and restart ---------------------------------------------------------------------------------

RESTART_DELAY = 5.0  # spans the kill, the old processes going and the next start (2 to 3 s on 2 cores)


def test_after_a_sigkill_and_a_restart_every_job_keeps_its_promises(
    tmp_path: Path, store_env: dict[str, str]
) -> None:
    """Before the kill: a job waiting for its retry, a generator job running (blocked on a gate),
    queued jobs of several priorities and a delayed one. SIGKILL to the whole process group, then a
    new server on the same store. On SQLite the new server queues the running job again at once; on
    Redis (shared by replicas) once its lease (2 s here) has run out."""
    env = {k: v.replace("further-", "restart-") for k, v in store_env.items()}
    args = (*SERVER_ARGS, "--job-lease", "2")
    shared = bool(env)
    retried_dir, running_dir, order = tmp_path / "retried", tmp_path / "running", tmp_path / "order"
    retried_dir.mkdir()
    running_dir.mkdir()
    first = start_server(tmp_path, *args, env=env, new_session=True)
    try:
        gate = tmp_path / "retried-gate"
        retried = enqueue(first.url, "jt_flaky", {"folder": str(retried_dir), "fail_first": 1, "gate": str(gate)},
                          retries=1, priority=50)
        wait_for(lambda: attempt_times(retried_dir), 10, what="the retried job's first attempt to hold the slot")
        running = enqueue(first.url, "jt_items", {"folder": str(running_dir), "n": 2, "pauses": [1]}, priority=100)
        priorities = [1, 3, 1, 3, -2]
        queued = [enqueue(first.url, "jt_log", {"path": str(order), "label": f"q{i}"}, priority=p)
                  for i, p in enumerate(priorities)]
        gate.touch()  # its first attempt fails; the running job takes the slot
        wait_for((running_dir / "waiting-1").exists, 10, what="the generator job to be running")
        before = job(first.url, retried["id"])
        assert (before["status"], before["attempts"]) == ("queued", 1) and before["last_error"], before
        seen = read_until(first.url, events_path(running["id"]), is_item(0))
        resume_from = seen[-1][0]
        assert resume_from is not None and resume_from.startswith("1-")
        delayed = enqueue(first.url, "jt_log", {"path": str(order), "label": "delayed"}, delay=RESTART_DELAY)
        first.descendants()
        os.killpg(first.proc.pid, signal.SIGKILL)  # no graceful stop
        first.proc.wait(10)
        wait_for(lambda: not first.leftovers(), 10, what="every process of the killed server to go")
    finally:
        first.kill_all()
    (running_dir / "go-1").touch()

    with serving(tmp_path, *args, env=env) as again:  # the same store: tmp_path/jobs.db, or the same prefix
        assert time.time() < delayed["run_at"], "the restart took longer than the delay: the test proves nothing"
        assert_queued_until_run_at(again.url, [delayed])
        late = wait_final(again.url, delayed["id"])
        assert late["status"] == "succeeded" and late["started_at"] >= late["run_at"] == delayed["run_at"]

        done = [wait_final(again.url, j["id"]) for j in (running, retried, *queued)]
        assert [d["status"] for d in done] == ["succeeded"] * len(done), done
        if shared:  # the interrupted job comes back when its lease has run out, after the due ones started
            assert_started_in_order(done[1:], [50, *priorities])
        else:
            assert_started_in_order(done, [100, 50, *priorities])  # the queue's order survived
        assert [line for line in order.read_text().split() if line != "delayed"] == ["q1", "q3", "q0", "q2", "q4"]
        rerun, kept = done[0], done[1]
        assert rerun["attempts"] == 1 and len(attempt_times(running_dir)) == 2  # ran twice, counted once
        assert rerun["result"] == [0, 1]
        assert kept["attempts"] == 2 and len(attempt_times(retried_dir)) == 2
        assert "attempt 1 failed" in kept["last_error"]["detail"]

        path = events_path(running["id"])
        resumed = list(sse_stream(again.url, path, last_event_id=resume_from))
        full = list(sse_stream(again.url, path))
        assert resumed == [e for e in full if event_order(e[0]) > event_order(resume_from)]
        assert [i for i, _, _ in resumed] == ["2-1", "2-2", "2-3", "end-1", "end-2"]
        assert resumed[0][2] == {"status": "running", "attempt": 1}
        assert [d for _, e, d in resumed if e == "item"] == [{"item": 0}, {"item": 1}]
        assert resumed[-1][2]["result"] == [0, 1]

        every = {j["id"] for j in (running, retried, delayed, *queued)}
        assert_each_once_newest_first(list_pages(again.url, "limit=3"), every, 3)
