"""The pieces of issue 19 that need no server: a run's event log (events.py), the submit options and the
listing cursor (options.py), and the SQLite store's migration of a file written before them."""

from __future__ import annotations

import base64
import itertools
import sqlite3
import time
from pathlib import Path

import orjson
import pytest

from service.jobs.events import END_RESULT, END_STATUS, JobEvents, RunLog, final_events
from service.jobs.model import FAILED, SUCCEEDED, EventId, Job, new_created_at, new_job_id
from service.jobs.options import MAX_DELAY, decode_cursor, encode_cursor, scheduling
from service.jobs.store.sqlite import SCHEMA_VERSION, SQLiteJobStore
from service.problems import Problem


def test_event_ids_order_by_run_then_seq_and_round_trip_as_text() -> None:
    ids = [EventId(2, 1), EventId(1, 10), EventId(1, 2), EventId(0, 0)]
    assert sorted(ids) == [EventId(0, 0), EventId(1, 2), EventId(1, 10), EventId(2, 1)]
    assert [EventId.parse(str(i)) for i in ids] == ids
    for bad in ("", "1", "1-", "-1", "a-1", "1-b", "1-2-3", "end-1", "1" * 50 + "-1"):
        with pytest.raises(ValueError):
            EventId.parse(bad)


def test_run_log_numbers_events_and_replaces_only_unwritten_progress() -> None:
    log = RunLog("job", run=3)
    log.add("status", {"status": "running"})
    log.add("progress", {"done": 1})
    log.add("progress", {"done": 2})  # replaces done=1: not written yet
    assert [(str(e.id), orjson.loads(e.data)) for e in log.events] == [
        ("3-1", {"status": "running"}), ("3-3", {"done": 2})]
    log.flushed = len(log.events)  # written: the next progress is a new event
    log.add("progress", {"done": 3})
    log.add("item", {"item": 0})
    log.add("progress", {"done": 4})  # after an item: kept apart
    assert [str(e.id) for e in log.events] == ["3-1", "3-3", "3-4", "3-5", "3-6"]
    assert [str(e.id) for e in log.after(EventId(3, 3))] == ["3-4", "3-5", "3-6"]
    assert [str(e.id) for e in log.after(EventId(3, 2))] == ["3-3", "3-4", "3-5", "3-6"]  # replaced id: no gap
    assert log.after(EventId(3, 6)) == []


def test_final_events_of_a_succeeded_and_a_failed_job() -> None:
    ok = Job(id="a", task="t", args={}, status=SUCCEEDED, result=[1, 2])
    assert [(i, e, orjson.loads(d)) for i, e, d in final_events(ok)] == [
        (END_STATUS, "status", {"status": "succeeded"}),
        (END_RESULT, "result", {"id": "a", "status": "succeeded", "result": [1, 2]})]
    binary = Job(id="b", task="t", args={}, status=SUCCEEDED, result_bytes=b"xyz")
    assert orjson.loads(final_events(binary)[1][2])["result_url"] == "/v1/jobs/b/result"
    bad = Job(id="c", task="t", args={}, status=FAILED, error={"type": "/problems/task-failed"})
    assert final_events(bad)[1][1:] == ("error", b'{"type":"/problems/task-failed"}')


async def test_a_listener_reads_a_local_run_without_the_store_and_its_end_from_the_store(tmp_path: Path) -> None:
    store = SQLiteJobStore(str(tmp_path / "jobs.db"))
    await store.open()
    try:
        job, _ = await store.create(Job(id=new_job_id(), task="t", args={}))
        claimed = await store.claim("me", 30)
        assert claimed is not None and claimed.runs == 1
        events = JobEvents(store)
        events.start_run(job.id, claimed.runs)
        with events.listen(job.id) as woken:
            events.emit(job.id, "status", {"status": "running"})
            assert woken.is_set()
            events.emit(job.id, "item", {"item": 1})
            batch = await events.read(job.id, None)  # from the start: the store has nothing yet, the log all
            assert [str(e.id) for e in batch.events] == ["1-1", "1-2"] and batch.final is None
            assert (await events.read(job.id, EventId(1, 1))).events[0].data == b'{"item":1}'
            await events.flush(job.id)
            assert [str(e.id) for e in await store.events(job.id)] == ["1-1", "1-2"]
            await store.finish(job.id, SUCCEEDED, result=1)
            events.end_run(job.id)
            batch = await events.read(job.id, EventId(1, 1))
            assert [str(e.id) for e in batch.events] == ["1-2"]
            assert batch.final is not None and [i for i, _, _ in batch.final] == [END_STATUS, END_RESULT]
        assert not events.listening(job.id)
        await store.expire(time.time() + 1)
        assert (await events.read(job.id, None)).gone
    finally:
        await store.close()


def test_new_jobs_get_strictly_increasing_creation_times() -> None:
    times = [new_created_at() for _ in range(10_000)]
    assert all(a < b for a, b in itertools.pairwise(times))


def test_scheduling_defaults_delay_run_at_and_refusals() -> None:
    now = time.time()
    plan = scheduling({}, now, task_retries=2)
    assert (plan.priority, plan.run_at, plan.retries) == (0, now, 2)
    assert scheduling({"delay": 1.5, "priority": -4, "retries": 0}, now, 2).run_at == now + 1.5
    assert scheduling({"retries": 0}, now, 2).retries == 0  # the job's own overrides the task's
    assert scheduling({"run_at": now + 60}, now, 0).run_at == now + 60
    assert scheduling({"run_at": now - 60}, now, 0).run_at == now  # a past time: now
    for bad in ({"priority": True}, {"priority": "1"}, {"priority": 2**31}, {"delay": -0.1}, {"delay": "1"},
                {"delay": MAX_DELAY + 1}, {"delay": float("nan")}, {"run_at": now + MAX_DELAY + 60},
                {"delay": 1, "run_at": now}, {"retries": 101}, {"retries": 1.0}):
        with pytest.raises(Problem) as refused:
            scheduling(bad, now, 0)
        assert refused.value.status == 422, bad


def test_cursors_round_trip_and_foreign_ones_are_refused() -> None:
    at, job_id = new_created_at(), new_job_id()
    assert decode_cursor(encode_cursor(at, job_id)) == (at, job_id)
    forged = base64.urlsafe_b64encode(b'{"a": 1}').decode()
    for bad in ("", "!!!", "bm90IGpzb24", forged, base64.urlsafe_b64encode(b'[1e999, "x"]').decode(),
                base64.urlsafe_b64encode(b'[true, "x"]').decode()):
        with pytest.raises(Problem) as refused:
            decode_cursor(bad)
        assert refused.value.status == 422


_V1_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, task TEXT NOT NULL, args TEXT NOT NULL, timeout REAL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, progress TEXT, result TEXT, result_bytes BLOB,
    error TEXT, idempotency_key TEXT UNIQUE, attempts INTEGER NOT NULL DEFAULT 0, owner TEXT, lease_until REAL
);
CREATE INDEX jobs_status_created ON jobs (status, created_at, id);
CREATE INDEX jobs_created ON jobs (created_at, id);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
PRAGMA user_version = 1;
"""


async def test_a_file_written_before_issue_19_is_migrated_with_every_job_kept(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_V1_SCHEMA)
        conn.execute("INSERT INTO jobs (id, task, args, status, created_at) "
                     "VALUES ('q1', 'primes', '{}', 'queued', 10)")
        conn.execute("INSERT INTO jobs (id, task, args, status, created_at, finished_at, result) "
                     "VALUES ('d1', 'primes', '{}', 'succeeded', 5, 6, '168')")
    store = SQLiteJobStore(str(path))
    await store.open()
    try:
        done = await store.get("d1")
        assert done is not None and done.result == 168 and done.priority == 0 and done.webhook is None
        assert await store.next_run_at() == 10.0  # run_at filled from created_at
        claimed = await store.claim("me", 30)
        assert claimed is not None and claimed.id == "q1" and claimed.runs == 1
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer = SQLiteJobStore(str(path))
    with pytest.raises(RuntimeError, match="newer procbridge"):
        await newer.open()
