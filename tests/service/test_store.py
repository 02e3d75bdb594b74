"""One suite for every JobStore implementation (service/jobs/store/base.py), run against SQLite (a file in a
tmp dir) and Redis (a real redis-server on a free loopback port, started once for the session; each test
gets its own key prefix). The store fixtures live in tests/service/conftest.py; test_store_further.py
covers the semantics of issue 19 (priorities, delays, retries, webhooks, event logs, paged listing)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from service.jobs.model import CANCELLED, FAILED, QUEUED, RUNNING, STATUSES, SUCCEEDED, Job, new_job_id
from service.jobs.store import DEFAULT_REDIS_PREFIX, open_store, parse_store
from service.jobs.store.base import JobStore
from service.jobs.store.redis import RedisJobStore
from service.jobs.store.sqlite import SQLiteJobStore
from tests.conftest import ROOT
from tests.service.conftest import Stores
from tests.support.redis_server import RedisServer

ERROR = {"type": "/problems/job-cancelled", "title": "cancelled", "status": 409, "detail": "cancelled"}


def make_job(created_at: float | None = None, key: str | None = None, **args: Any) -> Job:
    job = Job(id=new_job_id(), task="primes", args=args or {"limit": 100}, idempotency_key=key)
    if created_at is not None:
        job.created_at = created_at
    job.run_at = job.created_at  # as stored (a store fills in run_at = created_at), so jobs compare equal
    return job


async def make_jobs(store: JobStore, n: int) -> list[Job]:
    """n queued jobs, in arrival order (created_at strictly increasing, all past: due at once)."""
    base = time.time() - 1 - n / 1000
    jobs = [make_job(created_at=base + i / 1000, index=i) for i in range(n)]
    for job in jobs:
        await store.create(job)
    return jobs


# -- the suite ----------------------------------------------------------------------------------------


async def test_create_and_get(store: JobStore) -> None:
    job = make_job(limit=10, nested={"a": [1, 2.5, "é\u2028", None, True]})
    job.timeout = 2.5
    stored, created = await store.create(job)
    assert created and stored == job
    got = await store.get(job.id)
    assert got == job
    assert got is not None and got.status == QUEUED and got.attempts == 0 and got.owner is None
    assert got.public() == job.public()
    assert await store.get("no-such-job") is None
    running = make_job()
    running.status = RUNNING
    with pytest.raises(ValueError):
        await store.create(running)


async def test_idempotency_key_returns_the_first_job(store: JobStore) -> None:
    first, second, other = make_job(key="k1", limit=1), make_job(key="k1", limit=2), make_job(key="k2")
    assert (await store.create(first))[1]
    again, created = await store.create(second)
    assert not created and again == first
    assert await store.get(second.id) is None
    assert (await store.create(other))[1]
    assert all([(await store.create(make_job()))[1], (await store.create(make_job()))[1]])  # no key: all new
    empty = make_job(key="")  # an empty key is still a key
    assert (await store.create(empty))[1]
    assert (await store.create(make_job(key=""))) == (empty, False)
    assert (await store.counts())[QUEUED] == 5


async def test_concurrent_creates_with_one_key_make_one_job(stores: Stores) -> None:
    a, b = await stores.open(), await stores.open()
    jobs = [make_job(key="same", limit=i) for i in range(20)]
    results = await asyncio.gather(*((a if i % 2 else b).create(job) for i, job in enumerate(jobs)))
    winners = [job for job, created in results if created]
    assert len(winners) == 1
    assert {job.id for job, _ in results} == {winners[0].id}
    assert all(job == winners[0] for job, _ in results)
    assert (await a.counts())[QUEUED] == 1
    assert [j.id for j in await b.list()] == [winners[0].id]


async def test_list_newest_first_by_status_with_limit(store: JobStore) -> None:
    jobs = await make_jobs(store, 5)
    ids = [job.id for job in jobs]
    claimed = [await store.claim("runner", 60), await store.claim("runner", 60)]
    assert [job.id for job in claimed if job] == ids[:2]
    assert await store.finish(ids[1], SUCCEEDED, result=1)

    assert [j.id for j in await store.list()] == ids[::-1]
    assert [j.id for j in await store.list(limit=2)] == [ids[4], ids[3]]
    assert [j.id for j in await store.list(QUEUED)] == [ids[4], ids[3], ids[2]]
    assert [j.id for j in await store.list(QUEUED, limit=1)] == [ids[4]]
    assert [j.id for j in await store.list(RUNNING)] == [ids[0]]
    listed = await store.list(SUCCEEDED)
    assert [j.id for j in listed] == [ids[1]] and listed[0].result == 1 and listed[0].status == SUCCEEDED
    assert await store.list(FAILED) == []
    assert await store.list(limit=0) == []


async def test_claim_takes_jobs_in_arrival_order(store: JobStore) -> None:
    base = time.time() - 10  # past: run_at = created_at, so every job is due
    jobs = [make_job(created_at=base + i / 1000, index=i) for i in range(6)]
    tied = sorted([make_job(created_at=base + 1, tie=1), make_job(created_at=base + 1, tie=2)], key=lambda j: j.id)
    expected = [job.id for job in jobs + tied]
    inserted = jobs + tied
    random.Random(7).shuffle(inserted)
    for job in inserted:
        await store.create(job)

    got = []
    before = time.time()
    while (claimed := await store.claim("runner-1", 30)) is not None:
        assert claimed.status == RUNNING and claimed.owner == "runner-1" and claimed.attempts == 1
        assert claimed.started_at is not None and claimed.started_at >= before
        assert claimed.lease_until is not None and abs(claimed.lease_until - (claimed.started_at + 30)) < 1e-3
        assert await store.get(claimed.id) == claimed
        got.append(claimed.id)
    assert got == expected
    assert await store.claim("runner-1", 30) is None


async def test_concurrent_claimers_never_share_a_job(stores: Stores) -> None:
    a, b = await stores.open(), await stores.open()
    jobs = await make_jobs(a, 20)
    claims = await asyncio.gather(*((a, b)[i % 2].claim(f"owner-{i % 2}", 60) for i in range(30)))
    claimed = [job for job in claims if job is not None]
    assert len(claimed) == 20
    assert sorted(job.id for job in claimed) == sorted(job.id for job in jobs)
    assert all(job.attempts == 1 for job in claimed)
    counts = await b.counts()
    assert counts[RUNNING] == 20 and counts[QUEUED] == 0


async def test_progress_only_while_running(store: JobStore) -> None:
    (job,) = await make_jobs(store, 1)
    await store.set_progress(job.id, {"done": 1, "total": 10, "message": None})
    assert (await store.get(job.id)).progress is None  # type: ignore[union-attr]
    assert await store.claim("r", 60) is not None
    progress = {"done": 5, "total": 10, "message": "half way"}
    await store.set_progress(job.id, progress)
    assert (await store.get(job.id)).progress == progress  # type: ignore[union-attr]
    assert await store.finish(job.id, SUCCEEDED, result={"n": 1})
    await store.set_progress(job.id, {"done": 6, "total": 10, "message": "late"})
    assert (await store.get(job.id)).progress == progress  # type: ignore[union-attr]
    await store.set_progress("no-such-job", progress)


async def test_finish_first_writer_wins(stores: Stores) -> None:
    a, b = await stores.open(), await stores.open()
    jobs = await make_jobs(a, 3)
    claimed = await a.claim("r", 60)
    assert claimed is not None and claimed.id == jobs[0].id
    assert await a.finish(claimed.id, SUCCEEDED, result={"n": 25})
    assert not await b.finish(claimed.id, FAILED, error=ERROR)
    assert not await a.finish(claimed.id, SUCCEEDED, result={"n": 0})
    done = await b.get(claimed.id)
    assert done is not None and done.status == SUCCEEDED and done.result == {"n": 25} and done.error is None
    assert done.finished_at is not None and done.finished_at >= claimed.started_at  # type: ignore[operator]
    assert done.lease_until is None and done.final

    # concurrent writers on a running job: exactly one wins, and its outcome is what is stored
    second = await b.claim("r", 60)
    assert second is not None
    outcomes: list[tuple[str, dict[str, Any]]] = [
        (SUCCEEDED, {"result": 1}), (FAILED, {"error": ERROR}), (CANCELLED, {"error": ERROR})
    ] * 4
    wins = await asyncio.gather(
        *((a, b)[i % 2].finish(second.id, status, **kw) for i, (status, kw) in enumerate(outcomes))
    )
    assert wins.count(True) == 1
    winner = outcomes[wins.index(True)][0]
    assert (await a.get(second.id)).status == winner  # type: ignore[union-attr]

    # a queued job can be finished directly (it then leaves the queue)
    assert await a.finish(jobs[2].id, FAILED, error=ERROR)
    assert await a.claim("r", 60) is None
    assert not await a.finish("no-such-job", SUCCEEDED)
    with pytest.raises(ValueError):
        await a.finish(jobs[2].id, RUNNING)


async def test_cancel_queued_running_final_and_missing(store: JobStore) -> None:
    queued, running, finished, after = await make_jobs(store, 4)
    claimed = [await store.claim("r", 60), await store.claim("r", 60), await store.claim("r", 60)]
    assert [job.id for job in claimed if job] == [queued.id, running.id, finished.id]
    assert await store.finish(finished.id, SUCCEEDED, result="ok")
    # queued -> cancelled: put `queued` back in the queue first, through a lease that ran out
    await store.renew("r", [queued.id], -1)
    assert await store.recover() == 1
    assert (await store.get(queued.id)).status == QUEUED  # type: ignore[union-attr]

    job = await store.cancel(queued.id, ERROR)
    assert job is not None and job.status == CANCELLED and job.error == ERROR and job.finished_at is not None
    claimed_next = await store.claim("r", 60)
    assert claimed_next is not None and claimed_next.id == after.id  # a cancelled job is never claimed

    job = await store.cancel(running.id, ERROR)
    assert job is not None and job.status == CANCELLED and job.lease_until is None
    assert not await store.finish(running.id, SUCCEEDED, result=1)  # the runner's late result loses
    assert (await store.get(running.id)).status == CANCELLED  # type: ignore[union-attr]

    job = await store.cancel(finished.id, ERROR)
    assert job is not None and job.status == SUCCEEDED and job.result == "ok" and job.error is None
    assert await store.cancel("no-such-job", ERROR) is None
    assert (await store.counts())[CANCELLED] == 2


async def test_renew_and_recover_expired_leases(store: JobStore) -> None:
    expired, alive, renewed = await make_jobs(store, 3)
    assert (await store.claim("a", -5)).id == expired.id  # type: ignore[union-attr]
    assert (await store.claim("b", 60)).id == alive.id  # type: ignore[union-attr]
    assert (await store.claim("c", -5)).id == renewed.id  # type: ignore[union-attr]
    await store.renew("c", [renewed.id], 60)
    await store.renew("intruder", [expired.id], 60)  # not the owner: no effect
    await store.renew("c", [], 60)
    await store.set_progress(expired.id, {"done": 1, "total": 2, "message": None})

    assert await store.recover() == 1
    job = await store.get(expired.id)
    assert job is not None and job.status == QUEUED and job.owner is None and job.lease_until is None
    assert job.progress is None and job.attempts == 0  # the interrupted attempt does not count
    assert (await store.get(alive.id)).status == RUNNING  # type: ignore[union-attr]
    assert (await store.get(renewed.id)).lease_until > time.time() + 30  # type: ignore[operator,union-attr]
    assert await store.recover() == 0

    again = await store.claim("d", 60)
    assert again is not None and again.id == expired.id and again.attempts == 1 and again.owner == "d"
    assert again.runs == 2
    assert await store.finish(again.id, SUCCEEDED, result=1)
    assert await store.recover() == 0  # a finished job is never requeued


async def test_recover_with_owner_gone_requeues_every_running_job(store: JobStore) -> None:
    jobs = await make_jobs(store, 3)
    assert (await store.claim("a", 600)) is not None
    assert (await store.claim("b", 600)) is not None
    assert await store.recover() == 0  # leases still valid
    assert await store.recover(owner_gone=True) == 2
    counts = await store.counts()
    assert counts[QUEUED] == 3 and counts[RUNNING] == 0
    assert await store.recover(owner_gone=True) == 0
    order = [await store.claim("c", 60) for _ in range(3)]
    assert [job.id for job in order if job] == [job.id for job in jobs]
    assert [job.attempts for job in order if job] == [1, 1, 1]
    assert [job.runs for job in order if job] == [2, 2, 1]


async def test_expire_deletes_only_old_final_jobs(store: JobStore) -> None:
    jobs = await make_jobs(store, 5)
    for _ in range(4):
        assert await store.claim("r", 60) is not None
    keyed = make_job(key="kept-until-expiry")
    assert (await store.create(keyed))[1]
    assert await store.finish(jobs[0].id, SUCCEEDED, result=[1, 2])
    assert await store.finish(jobs[1].id, FAILED, error=ERROR)
    assert await store.cancel(jobs[2].id, ERROR) is not None
    assert await store.finish(keyed.id, SUCCEEDED, result_bytes=b"\x00png")  # queued -> final directly
    # jobs[3] running, jobs[4] queued: never expired, however old
    finished = [(await store.get(job.id)).finished_at for job in (*jobs[:3], keyed)]  # type: ignore[union-attr]
    assert None not in finished

    assert await store.expire(min(t for t in finished if t is not None) - 1) == 0
    assert await store.expire(time.time() + 1) == 4
    assert [await store.get(job.id) for job in (*jobs[:3], keyed)] == [None] * 4
    assert {job.id for job in await store.list()} == {jobs[3].id, jobs[4].id}
    assert await store.list(SUCCEEDED) == []
    assert await store.counts() == {QUEUED: 1, RUNNING: 1, SUCCEEDED: 0, FAILED: 0, CANCELLED: 0}
    assert await store.expire(time.time() + 1) == 0
    # the idempotency key of an expired job is free again
    fresh, created = await store.create(make_job(key="kept-until-expiry"))
    assert created and fresh.id != keyed.id


async def test_counts(store: JobStore) -> None:
    assert await store.counts() == dict.fromkeys(STATUSES, 0)
    jobs = await make_jobs(store, 5)
    for _ in range(3):
        await store.claim("r", 60)
    await store.finish(jobs[0].id, SUCCEEDED, result=None)
    await store.finish(jobs[1].id, FAILED, error=ERROR)
    await store.cancel(jobs[3].id, ERROR)
    assert await store.counts() == {QUEUED: 1, RUNNING: 1, SUCCEEDED: 1, FAILED: 1, CANCELLED: 1}


@pytest.mark.parametrize("payload", [bytes(range(256)) * 64, b"", b"\x00", b"\x89PNG\r\n\x1a\n\x00\xff"])
async def test_binary_results_round_trip(store: JobStore, payload: bytes) -> None:
    (job,) = await make_jobs(store, 1)
    await store.claim("r", 60)
    assert await store.finish(job.id, SUCCEEDED, result_bytes=payload)
    got = await store.get(job.id)
    assert got is not None and got.result_bytes == payload and type(got.result_bytes) is bytes
    assert got.result is None
    public = got.public()
    assert public["result_size"] == len(payload) and public["result_url"] == f"/v1/jobs/{job.id}/result"
    assert (await store.list(SUCCEEDED))[0].result_bytes == payload


@pytest.mark.parametrize(
    "result", [0, "", [], {}, False, 1.5, "ü\u2028\x00", {"nested": [1, None, {"x": "y"}]}, 2**70, None]
)
async def test_json_results_round_trip(store: JobStore, result: Any) -> None:
    (job,) = await make_jobs(store, 1)
    await store.claim("r", 60)
    assert await store.finish(job.id, SUCCEEDED, result=result)
    got = await store.get(job.id)
    assert got is not None and got.result == result and type(got.result) is type(result)
    assert got.result_bytes is None and got.public()["result"] == result


async def test_failed_job_keeps_its_error(store: JobStore) -> None:
    (job,) = await make_jobs(store, 1)
    error = {"type": "/problems/task-failed", "title": "Task failed", "status": 500, "detail": "ValueError: é"}
    assert await store.finish(job.id, FAILED, error=error)
    got = await store.get(job.id)
    assert got is not None and got.status == FAILED and got.error == error and got.public()["error"] == error


async def test_cancelled_calls_leave_the_store_usable(stores: Stores) -> None:
    """A caller cancelled at any point of a write (a request handler torn down) never wedges the store."""
    a, b = await stores.open(), await stores.open()
    for steps in range(12):
        task = asyncio.ensure_future(a.create(make_job()))
        for _ in range(steps):
            await asyncio.sleep(0)  # let the call get that far, then cancel it there
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    job = make_job()
    assert (await b.create(job))[1]  # another store on the same data can still write
    assert (await a.create(make_job()))[1]
    assert await a.get(job.id) == job
    assert len(await b.list()) == (await a.counts())[QUEUED]


# -- durability ---------------------------------------------------------------------------------------


async def test_job_survives_a_store_dropped_without_close(store_url: str) -> None:
    first = open_store(store_url)
    await first.open()
    job = make_job(key="dropped")
    assert (await first.create(job))[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del first
        gc.collect()
    second = open_store(store_url)
    await second.open()
    try:
        assert await second.get(job.id) == job
        assert (await second.create(make_job(key="dropped")))[0].id == job.id
    finally:
        await second.close()


_CREATOR = """
import asyncio, sys
from service.jobs.model import Job, new_job_id
from service.jobs.store import open_store

async def main() -> None:
    store = open_store(sys.argv[1])
    await store.open()
    job, created = await store.create(Job(id=new_job_id(), task="primes", args={"limit": 7}, idempotency_key="k"))
    print(job.id, created, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_job_survives_sigkill_right_after_create(store_url: str) -> None:
    """A process creates a job, prints its id the moment `create` returns, and is SIGKILLed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CREATOR, store_url, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line:
            raise AssertionError(f"the creating process printed nothing:\n{(await proc.stderr.read()).decode()}")
        proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    job_id, created = line.decode().split()
    assert created == "True"
    store = open_store(store_url)
    await store.open()
    try:
        job = await store.get(job_id)
        assert job is not None and job.status == QUEUED and job.args == {"limit": 7}
        claimed = await store.claim("after-crash", 60)
        assert claimed is not None and claimed.id == job_id
    finally:
        await store.close()


async def test_redis_job_survives_a_redis_crash(own_redis_server: RedisServer) -> None:
    """appendonly + appendfsync always: what `create` (and `claim`, `finish`) returned survives SIGKILL of Redis."""
    store = open_store(own_redis_server.url())
    await store.open()
    try:
        jobs = await make_jobs(store, 3)
        assert await store.claim("r", 60) is not None
        assert await store.finish(jobs[0].id, SUCCEEDED, result_bytes=b"\x00\x01")
        assert await store.claim("r", 60) is not None
    finally:
        await store.close()
    own_redis_server.kill()
    own_redis_server.start()
    store = open_store(own_redis_server.url())
    await store.open()
    try:
        done = await store.get(jobs[0].id)
        assert done is not None and done.status == SUCCEEDED and done.result_bytes == b"\x00\x01"
        assert (await store.get(jobs[1].id)).status == RUNNING  # type: ignore[union-attr]
        assert await store.get(jobs[2].id) == jobs[2]
        assert await store.recover(owner_gone=True) == 1
        assert [j.id for j in await store.list(QUEUED)] == [jobs[2].id, jobs[1].id]
        raw = aioredis.Redis(port=own_redis_server.port)
        try:  # the documented layout, default prefix
            assert await raw.type(f"procbridge:job:{jobs[2].id}") == b"hash"
            assert await raw.zrange("procbridge:status:queued", 0, -1) == [jobs[1].id.encode(), jobs[2].id.encode()]
        finally:
            await raw.aclose()
    finally:
        await store.close()


# -- the factory --------------------------------------------------------------------------------------


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    sqlite_store = open_store(str(tmp_path / "x.db"))
    assert isinstance(sqlite_store, SQLiteJobStore) and sqlite_store.path == str(tmp_path / "x.db")
    for url in ("redis://localhost:6379/0", "rediss://h:1/2", "unix:///tmp/redis.sock"):
        redis_store = open_store(url)
        assert isinstance(redis_store, RedisJobStore)
        assert redis_store.url == url and redis_store.prefix == DEFAULT_REDIS_PREFIX
    prefixed = open_store("redis://h:1/0?prefix=pb:&socket_timeout=5")
    assert isinstance(prefixed, RedisJobStore)
    assert prefixed.prefix == "pb:" and prefixed.url == "redis://h:1/0?socket_timeout=5"
    parsed = parse_store("unix:///tmp/r.sock?prefix=x:")
    assert (parsed.location, parsed.prefix) == ("unix:///tmp/r.sock", "x:")
    for bad in ("", "postgres://db/jobs"):
        with pytest.raises(ValueError):
            open_store(bad)


async def test_store_not_open_raises(tmp_path: Path) -> None:
    for store in (open_store(str(tmp_path / "x.db")), open_store("redis://127.0.0.1:1/0")):
        with pytest.raises(RuntimeError):
            await store.get("x")
        await store.close()  # closing a store never opened is fine


async def test_sqlite_file_settings(tmp_path: Path) -> None:
    """WAL, synchronous=FULL on the connection that commits, and the indexes the hot queries use."""
    store = SQLiteJobStore(str(tmp_path / "jobs.db"))
    await store.open()
    try:
        conn = store._conn()
        assert [tuple(r) for r in await conn.execute_fetchall("PRAGMA journal_mode")] == [("wal",)]
        assert [tuple(r) for r in await conn.execute_fetchall("PRAGMA synchronous")] == [(2,)]  # FULL
        plan = " ".join(
            str(row[-1]) for row in await conn.execute_fetchall(
                "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at, id LIMIT 1"
            )
        )
        assert "jobs_status_created" in plan and "TEMP B-TREE" not in plan
        unique_columns = []
        for row in await conn.execute_fetchall("PRAGMA index_list(jobs)"):
            if row[2]:  # unique
                unique_columns += [tuple(r[2] for r in await conn.execute_fetchall(f"PRAGMA index_info({row[1]})"))]
        assert ("idempotency_key",) in unique_columns and ("id",) in unique_columns
    finally:
        await store.close()
