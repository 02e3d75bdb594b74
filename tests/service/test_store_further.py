"""The store semantics of issue 19 (service/jobs/store/base.py): priorities, delays (run_at), retries,
recovery's attempt accounting, webhook deliveries, the event log and paged listing; one suite for every
JobStore (the fixtures of tests/service/conftest.py run each test on SQLite and on Redis)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

import service.jobs.store.redis as redis_store
from service.jobs.model import (
    CANCELLED,
    FAILED,
    PRIORITY_MAX,
    PRIORITY_MIN,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    WEBHOOK_DELIVERED,
    WEBHOOK_FAILED,
    WEBHOOK_PENDING,
    EventId,
    Job,
    LoggedEvent,
    new_created_at,
)
from service.jobs.store import open_store
from service.jobs.store.base import JobStore
from tests.service.conftest import Stores
from tests.service.test_store import ERROR, make_job
from tests.support.redis_server import RedisServer

HOOK = "https://hooks.example.test/done"
FAILURE = {"type": "/problems/task-failed", "title": "Task failed", "status": 500, "detail": "boom"}


def job_at(created_at: float, *, priority: int = 0, run_at: float | None = None, task: str = "primes",
           webhook: str | None = None, **args: Any) -> Job:
    job = make_job(created_at=created_at, **args)
    job.priority, job.task, job.webhook = priority, task, webhook
    job.run_at = created_at if run_at is None else run_at
    return job


async def claim_all(store: JobStore, owner: str = "r") -> list[Job]:
    claimed = []
    while (job := await store.claim(owner, 60)) is not None:
        claimed.append(job)
    return claimed


async def finished_with_webhook(store: JobStore, n: int, status: str = SUCCEEDED) -> list[Job]:
    base = time.time() - 100
    jobs = [job_at(base + i, webhook=HOOK, index=i) for i in range(n)]
    for job in jobs:
        await store.create(job)
    for job in jobs:
        assert await store.finish(job.id, status, result=1 if status == SUCCEEDED else None,
                                  error=FAILURE if status == FAILED else None)
    return [got for job in jobs if (got := await store.get(job.id)) is not None]


# -- create, priorities, delays ------------------------------------------------------------------------


async def test_create_fills_in_run_at_and_keeps_the_new_fields(store: JobStore) -> None:
    job = make_job()
    job.run_at = None
    job.priority, job.retries, job.webhook = -7, 3, HOOK
    stored, created = await store.create(job)
    assert created and stored.run_at == job.created_at and job.run_at is None  # the caller's job is untouched
    got = await store.get(job.id)
    assert got == stored
    assert got is not None and (got.priority, got.retries, got.webhook, got.runs) == (-7, 3, HOOK, 0)
    assert got.webhook_state is None and got.webhook_attempts == 0 and got.last_error is None
    assert got.public()["run_at"] == job.created_at and got.public()["webhook_delivery"]["state"] is None


async def test_claim_takes_the_highest_priority_then_arrival_order(store: JobStore) -> None:
    base = time.time() - 100
    rng = random.Random(19)
    priorities = [PRIORITY_MIN, -5, 0, 0, 1, 5, 5, PRIORITY_MAX]
    jobs = [job_at(base + i / 100, priority=rng.choice(priorities), index=i) for i in range(60)]
    jobs += [job_at(base + 50, priority=3, tie=i) for i in range(4)]  # one created_at: then by id
    jobs += [job_at(base + 0.1 + i * 1e-6, priority=2, micro=i) for i in range(4)]  # a microsecond apart
    expected = [job.id for job in sorted(jobs, key=lambda j: (-j.priority, j.created_at, j.id))]
    shuffled = list(jobs)
    rng.shuffle(shuffled)
    for job in shuffled:
        await store.create(job)
    claimed = await claim_all(store)
    assert [job.id for job in claimed] == expected
    assert all(job.attempts == 1 and job.runs == 1 and job.status == RUNNING for job in claimed)


async def test_a_delayed_job_waits_for_its_run_at(store: JobStore) -> None:
    assert await store.next_run_at() is None
    now = time.time()
    later = job_at(now - 10, run_at=now + 3600, priority=9)
    soon = job_at(now - 9, run_at=now + 0.4, priority=5)
    await store.create(later)
    await store.create(soon)
    assert await store.claim("r", 60) is None  # nothing is due, however high its priority
    assert await store.next_run_at() == soon.run_at

    due = job_at(now - 8, priority=0)
    await store.create(due)
    at = await store.next_run_at()
    assert at is not None and at <= time.time()  # a job is due
    claimed = await store.claim("r", 60)
    assert claimed is not None and claimed.id == due.id
    assert await store.next_run_at() == soon.run_at  # a running job is not queued

    await asyncio.sleep(soon.run_at - time.time() + 0.05)  # type: ignore[operator]
    other = job_at(now - 7, priority=4)  # due, but below `soon` now that it has come
    await store.create(other)
    assert [job.id for job in await claim_all(store)] == [soon.id, other.id]
    assert await store.next_run_at() == later.run_at
    assert (await store.cancel(later.id, ERROR)).status == CANCELLED  # type: ignore[union-attr]
    assert await store.next_run_at() is None and await store.claim("r", 60) is None


# -- retry and recover ---------------------------------------------------------------------------------


async def test_retry_requeues_at_run_at_with_the_last_error(store: JobStore) -> None:
    base = time.time() - 10
    job, other = job_at(base, retries=2), job_at(base + 1)
    await store.create(job)
    await store.create(other)
    claimed = await store.claim("r", 60)
    assert claimed is not None and claimed.id == job.id
    await store.set_progress(job.id, {"done": 1, "total": 2, "message": None})
    assert not await store.retry(job.id, "someone-else", time.time(), FAILURE)  # not the owner

    run_at = time.time() + 0.3
    assert await store.retry(job.id, "r", run_at, FAILURE)
    got = await store.get(job.id)
    assert got is not None and got.status == QUEUED and got.run_at == run_at and got.last_error == FAILURE
    assert got.owner is None and got.lease_until is None and got.progress is None and got.attempts == 1
    assert not await store.retry(job.id, "r", run_at, FAILURE)  # no longer running
    assert (await store.counts())[QUEUED] == 2 and [j.id for j in await store.list(QUEUED)] == [other.id, job.id]

    assert [j.id for j in await claim_all(store)] == [other.id]  # the retry is not due yet
    assert await store.next_run_at() == run_at
    await asyncio.sleep(run_at - time.time() + 0.05)
    again = await store.claim("r2", 60)
    assert again is not None and again.id == job.id and again.attempts == 2 and again.runs == 2
    assert again.last_error == FAILURE and again.owner == "r2"

    assert await store.retry(job.id, "r2", time.time() - 1, FAILURE)  # a run_at already past: due at once
    assert (await store.claim("r3", 60)).id == job.id  # type: ignore[union-attr]


async def test_cancel_or_finish_beats_a_retry(store: JobStore) -> None:
    base = time.time() - 10
    first, second = job_at(base), job_at(base + 1)
    await store.create(first)
    await store.create(second)
    assert [j.id for j in await claim_all(store)] == [first.id, second.id]

    assert (await store.cancel(first.id, ERROR)).status == CANCELLED  # type: ignore[union-attr]
    assert not await store.retry(first.id, "r", time.time(), FAILURE)
    assert await store.finish(second.id, SUCCEEDED, result=1)
    assert not await store.retry(second.id, "r", time.time(), FAILURE)
    assert [(j.status, j.last_error) for j in (await store.get(first.id), await store.get(second.id)) if j] == [
        (CANCELLED, None), (SUCCEEDED, None)
    ]
    assert await store.claim("r", 60) is None and await store.next_run_at() is None

    # a retried job waiting for its run_at is cancelled like any queued job, and never claimed
    third = job_at(base + 2)
    await store.create(third)
    assert await store.claim("r", 60) is not None
    assert await store.retry(third.id, "r", time.time() + 3600, FAILURE)
    assert (await store.cancel(third.id, ERROR)).status == CANCELLED  # type: ignore[union-attr]
    assert await store.next_run_at() is None and (await store.counts())[QUEUED] == 0


async def test_recover_gives_back_the_interrupted_attempt(store: JobStore) -> None:
    base = time.time() - 10
    job, low = job_at(base, priority=1), job_at(base + 1)
    await store.create(job)
    await store.create(low)
    assert (await store.claim("a", 60)).id == job.id  # type: ignore[union-attr]
    assert await store.retry(job.id, "a", time.time() - 1, FAILURE)  # a failed attempt: counts
    assert (await store.claim("a", -1)).id == job.id  # type: ignore[union-attr]  # lease already over
    before = time.time()
    assert await store.recover() == 1
    got = await store.get(job.id)
    assert got is not None and got.status == QUEUED and got.attempts == 1 and got.runs == 2
    assert got.run_at is not None and before <= got.run_at <= time.time() and got.last_error == FAILURE
    again = await store.claim("b", 60)  # due at once, and still first by priority
    assert again is not None and again.id == job.id and again.attempts == 2 and again.runs == 3
    assert await store.recover(owner_gone=True) == 1
    assert (await store.get(job.id)).attempts == 1  # type: ignore[union-attr]

    # two interrupted at once: each gives back its own attempt
    assert (await store.claim("c", -1)).id == job.id  # type: ignore[union-attr]
    assert (await store.claim("c", -1)).id == low.id  # type: ignore[union-attr]
    assert await store.recover() == 2
    assert await store.recover() == 0
    assert [(j.id, j.attempts) for j in await claim_all(store)] == [(job.id, 2), (low.id, 1)]


# -- webhooks ------------------------------------------------------------------------------------------


async def test_finish_and_cancel_make_the_webhook_pending(store: JobStore) -> None:
    base = time.time() - 10
    done, failed, cancelled, queued_cancel, plain = (job_at(base + i, webhook=HOOK) for i in range(5))
    plain.webhook = None
    for job in (done, failed, cancelled, queued_cancel, plain):
        await store.create(job)
    assert len([await store.claim("r", 60) for _ in range(3)]) == 3
    assert await store.finish(done.id, SUCCEEDED, result={"n": 1})
    assert await store.finish(failed.id, FAILED, error=FAILURE)
    assert (await store.cancel(cancelled.id, ERROR)).webhook_state == WEBHOOK_PENDING  # type: ignore[union-attr]
    assert (await store.cancel(queued_cancel.id, ERROR)).webhook_state == WEBHOOK_PENDING  # type: ignore[union-attr]
    assert await store.finish(plain.id, SUCCEEDED, result=None)

    got = {job.id: await store.get(job.id) for job in (done, failed, cancelled, queued_cancel, plain)}
    for job_id in (done.id, failed.id, cancelled.id, queued_cancel.id):
        ended = got[job_id]
        assert ended is not None and ended.webhook_state == WEBHOOK_PENDING
        assert ended.webhook_next_at == ended.finished_at
        assert ended.webhook_attempts == 0 and ended.webhook_error is None
    assert got[plain.id].webhook_state is None and got[plain.id].webhook_next_at is None  # type: ignore[union-attr]
    assert got[failed.id].last_error == FAILURE  # type: ignore[union-attr]
    assert got[done.id].last_error is None and got[cancelled.id].last_error is None  # type: ignore[union-attr]
    assert await store.next_webhook_at() == got[done.id].finished_at  # type: ignore[union-attr]
    # a second final write loses, and does not touch the webhook either
    assert not await store.finish(done.id, FAILED, error=FAILURE)
    assert await store.get(done.id) == got[done.id]


async def test_claim_webhooks_leases_them(stores: Stores) -> None:
    a, b = await stores.open(), await stores.open()
    assert await a.next_webhook_at() is None and await a.claim_webhooks(time.time(), time.time() + 30, 10) == []
    jobs = await finished_with_webhook(a, 5)
    now = time.time()
    first = await a.claim_webhooks(now, now + 30, 3)
    assert [job.id for job in first] == [job.id for job in jobs[:3]]  # earliest first, at most `limit`
    assert all(job.webhook_next_at == now + 30 and job.webhook_state == WEBHOOK_PENDING for job in first)
    assert [job.id for job in await b.claim_webhooks(now, now + 30, 10)] == [job.id for job in jobs[3:]]
    assert await a.claim_webhooks(now + 29, now + 60, 10) == []  # all leased
    assert await b.next_webhook_at() == now + 30
    again = await b.claim_webhooks(now + 31, now + 90, 10)  # the leases ran out: a sender died
    assert sorted(job.id for job in again) == sorted(job.id for job in jobs)
    assert await a.claim_webhooks(now + 31, now + 90, 10) == []
    assert await a.claim_webhooks(now + 100, now + 130, 0) == []


async def test_concurrent_webhook_claims_never_share_one(stores: Stores) -> None:
    a, b = await stores.open(), await stores.open()
    jobs = await finished_with_webhook(a, 12)
    now = time.time()
    batches = await asyncio.gather(*((a, b)[i % 2].claim_webhooks(now, now + 60, 2) for i in range(10)))
    ids = [job.id for batch in batches for job in batch]
    assert sorted(ids) == sorted(job.id for job in jobs)


async def test_webhook_attempted_transitions(store: JobStore) -> None:
    retried, delivered, given_up = await finished_with_webhook(store, 3, FAILED)
    now = time.time()
    assert len(await store.claim_webhooks(now, now + 30, 10)) == 3

    await store.webhook_attempted(retried.id, delivered=False, next_at=now + 120, error="HTTP 503")
    await store.webhook_attempted(delivered.id, delivered=True)
    await store.webhook_attempted(given_up.id, delivered=False, next_at=None, error="connection refused")
    job = await store.get(retried.id)
    assert job is not None and job.webhook_state == WEBHOOK_PENDING and job.webhook_attempts == 1
    assert job.webhook_error == "HTTP 503" and job.webhook_next_at == now + 120
    assert await store.next_webhook_at() == now + 120
    assert await store.claim_webhooks(now + 60, now + 90, 10) == []  # not due before next_at
    assert [j.id for j in await store.claim_webhooks(now + 121, now + 150, 10)] == [retried.id]
    await store.webhook_attempted(retried.id, delivered=True)
    job = await store.get(retried.id)
    assert job is not None and job.webhook_state == WEBHOOK_DELIVERED and job.webhook_attempts == 2
    assert job.webhook_next_at is None and job.webhook_error is None

    job = await store.get(delivered.id)
    assert job is not None and job.webhook_state == WEBHOOK_DELIVERED and job.webhook_attempts == 1
    job = await store.get(given_up.id)
    assert job is not None and job.webhook_state == WEBHOOK_FAILED and job.webhook_attempts == 1
    assert job.webhook_error == "connection refused" and job.webhook_next_at is None
    assert job.public()["webhook_delivery"] == {"state": WEBHOOK_FAILED, "attempts": 1, "error": "connection refused"}

    assert await store.next_webhook_at() is None
    assert await store.claim_webhooks(now + 10_000, now + 10_030, 10) == []
    # a late report (a sender whose lease ran out) changes nothing once the delivery is settled
    await store.webhook_attempted(delivered.id, delivered=False, next_at=now + 5, error="late")
    job = await store.get(delivered.id)
    assert job is not None and job.webhook_state == WEBHOOK_DELIVERED and job.webhook_attempts == 1
    assert await store.next_webhook_at() is None
    await store.webhook_attempted("no-such-job", delivered=True)
    assert await store.get("no-such-job") is None


async def test_recover_with_owner_gone_makes_pending_webhooks_due(store: JobStore) -> None:
    leased, backing_off, delivered = await finished_with_webhook(store, 3)
    now = time.time()
    assert len(await store.claim_webhooks(now, now + 3600, 3)) == 3
    await store.webhook_attempted(backing_off.id, delivered=False, next_at=now + 7200, error="HTTP 500")
    await store.webhook_attempted(delivered.id, delivered=True)
    assert await store.recover() == 0
    assert await store.claim_webhooks(time.time(), time.time() + 30, 10) == []  # a live sender holds them

    assert await store.recover(owner_gone=True) == 0
    due = await store.next_webhook_at()
    assert due is not None and now <= due <= time.time()
    claimed = await store.claim_webhooks(time.time(), time.time() + 30, 10)
    assert sorted(job.id for job in claimed) == sorted([leased.id, backing_off.id])
    assert (await store.get(delivered.id)).webhook_state == WEBHOOK_DELIVERED  # type: ignore[union-attr]


# -- expiry --------------------------------------------------------------------------------------------


async def test_expire_keeps_pending_webhooks_and_deletes_event_logs(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "_EXPIRE_BATCH", 3)  # several batches, some all pending (Redis)
    base = time.time() - 100
    hooked = [job_at(base + i, webhook=HOOK, hooked=i) for i in range(7)]
    plain = [job_at(base + 10 + i, plain=i) for i in range(5)]
    for job in hooked + plain:
        await store.create(job)
        await store.append_events(job.id, [LoggedEvent(EventId(1, 1), "progress", b'{"done":1}')])
        assert await store.finish(job.id, SUCCEEDED, result=1)
    assert await store.expire(time.time() + 1) == len(plain)
    assert [await store.get(job.id) for job in plain] == [None] * len(plain)
    assert [await store.events(job.id) for job in plain] == [[]] * len(plain)
    assert None not in [await store.get(job.id) for job in hooked]
    assert len(await store.events(hooked[0].id)) == 1
    assert await store.list(task="primes") == await store.list() and len(await store.list()) == len(hooked)

    now = time.time()
    assert len(await store.claim_webhooks(now, now + 30, 100)) == len(hooked)
    await store.webhook_attempted(hooked[0].id, delivered=True)
    await store.webhook_attempted(hooked[1].id, delivered=False, error="HTTP 410")
    await store.webhook_attempted(hooked[2].id, delivered=False, next_at=now + 60, error="HTTP 503")
    assert await store.expire(time.time() + 1) == 2
    assert await store.get(hooked[0].id) is None and await store.get(hooked[1].id) is None
    assert await store.events(hooked[0].id) == [] and await store.get(hooked[2].id) is not None
    assert await store.expire(time.time() + 1) == 0
    assert (await store.counts())[SUCCEEDED] == len(hooked) - 2


# -- the event log -------------------------------------------------------------------------------------


def logged(run: int, seq: int, event: str = "progress") -> LoggedEvent:
    return LoggedEvent(EventId(run, seq), event, f'{{"run":{run},"seq":{seq},"text":"é"}}'.encode())


async def test_events_after_an_id_across_runs(store: JobStore) -> None:
    job, other = job_at(time.time()), job_at(time.time() + 1)
    await store.create(job)
    await store.create(other)
    assert await store.events(job.id) == []
    first = [logged(0, 1, "queued")] + [logged(1, seq) for seq in range(1, 6)]
    later = [logged(2, 1), logged(2, 2), logged(10, 1, "log")]  # run 10 after run 2: numeric order
    await store.append_events(job.id, first)
    await store.append_events(job.id, later)
    await store.append_events(job.id, [])
    await store.append_events(other.id, [logged(1, 1)])
    everything = first + later
    assert await store.events(job.id) == everything
    assert await store.events(job.id, None) == everything
    assert await store.events(job.id, EventId(1, 5)) == later  # (1,5) < (2,1)
    assert await store.events(job.id, EventId(1, 3)) == everything[4:]
    assert await store.events(job.id, EventId(0, 0)) == everything
    assert await store.events(job.id, EventId(2, 0)) == later
    assert await store.events(job.id, EventId(3, 99)) == later[2:]
    assert await store.events(job.id, EventId(10, 1)) == []
    assert await store.events(job.id, EventId(99, 0)) == []
    assert await store.events(other.id) == [logged(1, 1)]
    assert await store.events("no-such-job") == []
    event = (await store.events(job.id, EventId(9, 9)))[0]
    assert event.data == '{"run":10,"seq":1,"text":"é"}'.encode() and type(event.data) is bytes

    await store.append_events(job.id, later)  # replayed after a crash: nothing doubles
    assert await store.events(job.id) == everything


# -- listing -------------------------------------------------------------------------------------------


async def test_list_filters_by_task_and_status(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_store, "_LIST_SCAN", 3)  # filtering spans several chunks (Redis)
    base = time.time() - 100
    jobs = [job_at(base + i, task="resize" if i % 3 == 0 else "primes", index=i) for i in range(30)]
    for job in jobs:
        await store.create(job)
    claimed = await claim_all(store)
    for job in claimed[:10]:
        await store.finish(job.id, SUCCEEDED, result=1)
    for job in claimed[10:15]:
        await store.retry(job.id, "r", time.time() + 3600, FAILURE)
    states = {job.id: (await store.get(job.id)).status for job in jobs}  # type: ignore[union-attr]

    def expect(task: str | None = None, status: str | None = None) -> list[str]:
        return [j.id for j in reversed(jobs) if task in (None, j.task) and status in (None, states[j.id])]

    for task in (None, "resize", "primes", "nothing"):
        for status in (None, QUEUED, RUNNING, SUCCEEDED, FAILED):
            assert [j.id for j in await store.list(status, task=task)] == expect(task, status), (task, status)
            assert [j.id for j in await store.list(status, 2, task=task)] == expect(task, status)[:2]
    listed = await store.list(RUNNING, task="resize")
    assert all(j.status == RUNNING and j.task == "resize" for j in listed) and listed
    assert await store.list("no-such-status", task="resize") == [] and await store.list(limit=0, task="primes") == []


@pytest.mark.parametrize("scan", [1000, 4])
async def test_paging_with_before_while_jobs_arrive(
    store: JobStore, monkeypatch: pytest.MonkeyPatch, scan: int
) -> None:
    monkeypatch.setattr(redis_store, "_LIST_SCAN", scan)
    base = time.time() - 1000
    jobs = []
    for i in range(300):  # groups of three share one created_at: pages end inside them
        jobs.append(job_at(base + i // 3, task=("a", "b")[i % 2], index=i))
    for job in jobs:
        await store.create(job)
    newest_first = [job.id for job in sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)]
    late: set[str] = set()

    async def pages(size: int, **filters: Any) -> list[str]:
        """Every page until a short one; jobs created meanwhile never show up (nor do duplicates)."""
        earlier = set(late)  # arrived before this walk: its first page may list them
        seen: list[str] = []
        before: tuple[float, str] | None = None
        while True:
            page = await store.list(limit=size, before=before, **filters)
            for k in range(2):  # newer jobs arrive between pages: they sort before every page served
                job = job_at(new_created_at(), task=("a", "b")[k], late=True)  # newer than any job
                await store.create(job)
                late.add(job.id)
            seen += [job.id for job in page]
            if len(page) < size:
                break
            before = (page[-1].created_at, page[-1].id)
        assert len(seen) == len(set(seen)) and not set(seen) & (late - earlier)
        return [job_id for job_id in seen if job_id not in late]

    assert await pages(7) == newest_first
    assert await pages(3) == newest_first
    assert await pages(300) == newest_first
    by_task = [i for i in newest_first if next(j for j in jobs if j.id == i).task == "b"]
    assert await pages(9, task="b") == by_task
    assert await pages(10, task="a", status=QUEUED) == [i for i in newest_first if i not in by_task]
    # a cursor whose job is gone (expired) still marks its place
    cursor = next(j for j in jobs if j.id == newest_first[100])
    assert await store.finish(cursor.id, SUCCEEDED, result=1)
    assert await store.expire(time.time() + 1) == 1
    after = await store.list(limit=5, before=(cursor.created_at, cursor.id))
    assert [job.id for job in after] == newest_first[101:106]


# -- concurrency ---------------------------------------------------------------------------------------


async def test_concurrent_claimers_with_priorities_never_share_a_job(stores: Stores) -> None:
    a, b = await stores.open(), await stores.open()
    base = time.time() - 100
    rng = random.Random(4)
    jobs = [job_at(base + i / 100, priority=rng.randint(-3, 3), index=i) for i in range(40)]
    jobs.append(job_at(base, priority=100, run_at=time.time() + 3600))  # not due: never claimed
    for job in jobs:
        await a.create(job)
    claims = await asyncio.gather(*((a, b)[i % 2].claim(f"owner-{i % 2}", 60) for i in range(60)))
    claimed = [job for job in claims if job is not None]
    assert sorted(job.id for job in claimed) == sorted(job.id for job in jobs[:40])
    assert all(job.attempts == 1 and job.runs == 1 for job in claimed)
    counts = await b.counts()
    assert counts[RUNNING] == 40 and counts[QUEUED] == 1 and await b.next_run_at() == jobs[-1].run_at


# -- Redis only ----------------------------------------------------------------------------------------


async def test_redis_brings_a_store_from_before_issue_19_up_to_date(redis_server: RedisServer) -> None:
    """Jobs written by the layout before (no run_at, `status:queued` as the queue) are claimed and listed."""
    prefix = f"old-{time.time_ns()}:"
    raw = aioredis.Redis(port=redis_server.port)
    old = [make_job(created_at=time.time() - 10 + i, index=i) for i in range(3)]
    try:
        for job in old:
            await raw.hset(f"{prefix}job:{job.id}", mapping={
                "id": job.id, "task": job.task, "args": b'{"limit":1}', "status": QUEUED,
                "created_at": repr(job.created_at), "attempts": "0",
            })
            await raw.zadd(f"{prefix}index", {job.id: job.created_at})
            await raw.zadd(f"{prefix}status:queued", {job.id: job.created_at})
        store = open_store(redis_server.url(prefix))
        await store.open()
        try:
            assert await raw.get(f"{prefix}layout") == b"2"
            assert [j.id for j in await store.list(task="primes")] == [job.id for job in reversed(old)]
            claimed = await claim_all(store)
            assert [j.id for j in claimed] == [job.id for job in old]
            assert all(j.run_at == j.created_at and j.priority == 0 and j.runs == 1 for j in claimed)
        finally:
            await store.close()
        await raw.set(f"{prefix}layout", b"3")
        newer = open_store(redis_server.url(prefix))
        with pytest.raises(RuntimeError, match="newer"):
            await newer.open()
        await newer.close()
    finally:
        await raw.aclose()
