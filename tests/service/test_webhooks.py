"""service/jobs/webhooks.py: the signature, the back-off, and the sender end to end: the real stores
(`store` is tests/service/conftest.py's: SQLite and Redis), and a real aiohttp receiver on a free loopback
port that fails, hangs or redirects on cue and checks every signature it gets. (The allow-list:
test_webhook_allow.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from service.jobs.model import CANCELLED, SUCCEEDED, WEBHOOK_DELIVERED, WEBHOOK_FAILED, WEBHOOK_PENDING, Job, new_job_id
from service.jobs.store import open_store
from service.jobs.store.base import JobStore
from service.jobs.webhooks import WebhookPolicy, WebhookSender, retry_delay, sign
from service.metrics import Metrics
from tests.conftest import free_port, wait_until

SECRET = b"a-test-secret-of-32-characters!!"
ERROR = {"type": "/problems/job-cancelled", "title": "cancelled", "status": 409, "detail": "cancelled"}


# -- the signature and the back-off -------------------------------------------------------------------


def test_signature_is_hex_hmac_sha256_of_the_body():
    # RFC 4231, test case 2
    assert sign(b"Jefe", b"what do ya want for nothing?") == (
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


def test_back_off_doubles_to_five_minutes_each_jittered_between_half_and_all():
    assert [retry_delay(n, rng=lambda: 1.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert [retry_delay(n, rng=lambda: 0.0) for n in range(1, 4)] == [0.5, 1.0, 2.0]
    assert retry_delay(9, rng=lambda: 1.0) == 256.0
    assert retry_delay(10, rng=lambda: 1.0) == retry_delay(1000, rng=lambda: 1.0) == 300.0
    assert retry_delay(3, base=0.01, rng=lambda: 1.0) == pytest.approx(0.04)
    assert all(0.5 <= retry_delay(1) <= 1.0 for _ in range(200))


# -- the sender, end to end ---------------------------------------------------------------------------


@dataclass
class Receiver:
    """A webhook receiver on a free loopback port. `plan` says how to answer each request in turn
    ("hang", "302", or a status code); once it runs out, 200. Every request is kept, with whether its
    signature was right."""

    port: int = field(default_factory=free_port)
    plan: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    redirect_hits: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/elsewhere", self.elsewhere)  # where the redirects point
        app.router.add_post("/{path:.*}", self.hook)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.redirect_hits += 1
        return web.Response(status=200)

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        signature = request.headers.get("X-Procbridge-Signature")
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        self.requests.append({
            "path": request.path_qs, "headers": dict(request.headers), "job": json.loads(body),
            "signed": signature is not None and hmac.compare_digest(signature, expected),
        })
        action = self.plan.pop(0) if self.plan else "200"
        if action == "hang":
            await asyncio.wait_for(self.release.wait(), 30)
            action = "200"
        if action == "302":
            return web.Response(status=302, headers={"Location": self.url("/elsewhere")})
        if action.startswith("slow"):  # answer 200 once released, however long that takes
            await asyncio.wait_for(self.release.wait(), 30)
            action = "200"
        return web.Response(status=int(action), text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def sender(store: JobStore) -> AsyncIterator[Callable[..., Any]]:
    """Start a sender on the test's store: fast back-off, and a poll far above every wait in the tests,
    so they pass only through notify() and the store's next_webhook_at timer."""
    started: list[WebhookSender] = []

    async def make(**options: Any) -> WebhookSender:
        options.setdefault("policy", WebhookPolicy(("127.0.0.1:*",)))
        options.setdefault("secret", SECRET)
        options.setdefault("timeout", 5.0)
        options.setdefault("backoff", 0.02)
        options.setdefault("poll", 60.0)
        s = WebhookSender(options.pop("store", store), **options)
        await s.start()
        started.append(s)
        return s

    yield make
    for s in started:
        await s.close()


async def ended_job(store: JobStore, url: str, *, status: str = SUCCEEDED) -> Job:
    """A job with a webhook, taken to a final state the way the runner does (claim, then finish or cancel)."""
    job, _ = await store.create(Job(id=new_job_id(), task="count", args={"n": 1}, webhook=url))
    if status == CANCELLED:
        await store.cancel(job.id, ERROR)
    else:
        claimed = await store.claim("runner-1", 30.0)
        assert claimed is not None and claimed.id == job.id
        assert await store.finish(job.id, status, result={"words": 3})
    ended = await store.get(job.id)
    assert ended is not None and ended.webhook_state == WEBHOOK_PENDING
    return ended


async def webhook_done(store: JobStore, job_id: str, state: str, timeout: float = 15.0) -> Job:
    async def done() -> Job | None:
        job = await store.get(job_id)
        return job if job is not None and job.webhook_state == state else None

    return await wait_until(done, timeout, what=f"job {job_id}'s webhook {state}")


async def counted(metrics: Metrics, **counts: int) -> None:
    """The deliveries counter reads `counts` (others 0): it is counted just after the store write the
    tests wait for, so wait for it too."""
    want = {"delivered": 0, "failed": 0, "gave_up": 0, **counts}
    await wait_until(lambda: metrics.webhooks.counts == want, 5.0, what=f"the counts {want}")


async def test_a_final_job_is_posted_once_signed_with_its_document(receiver, store, sender):
    metrics = Metrics(lambda: None)
    s = await sender(metrics=metrics.webhooks)
    job = await ended_job(store, receiver.url("/hook?token=t1"))
    s.notify()
    done = await webhook_done(store, job.id, WEBHOOK_DELIVERED)
    assert (done.webhook_attempts, done.webhook_error) == (1, None)
    await counted(metrics, delivered=1)
    [request] = receiver.requests
    assert request["signed"] and request["path"] == "/hook?token=t1"
    headers = request["headers"]
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Procbridge-Job"] == job.id and headers["X-Procbridge-Delivery"] == "1"
    assert headers["User-Agent"] == "procbridge-webhook"
    assert request["job"]["id"] == job.id and request["job"]["status"] == SUCCEEDED
    assert request["job"]["result"] == {"words": 3} and request["job"]["webhook"] == receiver.url("/hook?token=t1")
    await wait_until(lambda: s.pending == metrics.webhooks.pending == 0, 5.0, what="nothing pending")
    text = metrics.render().decode()
    assert 'procbridge_webhook_deliveries_total{outcome="delivered"} 1.0' in text
    assert 'procbridge_webhook_deliveries_total{outcome="failed"} 0.0' in text
    assert "procbridge_webhooks_pending 0.0" in text


async def test_a_scheduled_retry_counts_as_pending(receiver, store, sender):
    receiver.plan = ["500"]
    metrics = Metrics(lambda: None)
    s = await sender(metrics=metrics.webhooks, backoff=60.0)  # the retry stays scheduled for the test's length

    job = await ended_job(store, receiver.url())
    s.notify()

    async def failed_once() -> bool:
        stored = await store.get(job.id)
        return stored is not None and stored.webhook_attempts == 1

    await wait_until(failed_once, what="the first attempt to fail")
    await wait_until(lambda: s.pending == metrics.webhooks.pending == 1 and not s.delivering, 5.0,
                     what="one retry scheduled, no delivery in flight")
    stored = await store.get(job.id)
    assert stored.webhook_state == WEBHOOK_PENDING and stored.webhook_error == "HTTP 500"
    assert stored.webhook_next_at > stored.finished_at + 29  # 60 s drawn between half and all of it
    assert "procbridge_webhooks_pending 1.0" in metrics.render().decode()


async def test_a_cancelled_job_is_posted_too(receiver, store, sender):
    s = await sender()
    job = await ended_job(store, receiver.url(), status=CANCELLED)
    s.notify()
    await webhook_done(store, job.id, WEBHOOK_DELIVERED)
    assert receiver.requests[0]["job"]["status"] == CANCELLED and receiver.requests[0]["signed"]


async def test_failed_attempts_are_retried_with_back_off_until_delivered(receiver, store, sender, caplog):
    caplog.set_level(logging.DEBUG, "procbridge.webhooks")
    receiver.plan = ["500", "503", "404"]
    metrics = Metrics(lambda: None)
    s = await sender(metrics=metrics.webhooks)
    job = await ended_job(store, receiver.url("/hook?token=s3cr3t-token"))
    s.notify()
    done = await webhook_done(store, job.id, WEBHOOK_DELIVERED)
    assert done.webhook_attempts == 4
    assert [r["headers"]["X-Procbridge-Delivery"] for r in receiver.requests] == ["1", "2", "3", "4"]
    assert all(r["signed"] for r in receiver.requests)
    await counted(metrics, delivered=1, failed=3)
    assert "HTTP 503" in caplog.text and job.id in caplog.text
    assert "s3cr3t-token" not in caplog.text and SECRET.decode() not in caplog.text  # URLs and the secret stay out


async def test_attempts_are_given_up_after_the_last_one(receiver, store, sender):
    receiver.plan = ["500"] * 10
    metrics = Metrics(lambda: None)
    s = await sender(max_attempts=3, metrics=metrics.webhooks)
    job = await ended_job(store, receiver.url())
    s.notify()
    done = await webhook_done(store, job.id, WEBHOOK_FAILED)
    assert (done.webhook_attempts, done.webhook_error) == (3, "HTTP 500")
    assert len(receiver.requests) == 3
    await counted(metrics, failed=2, gave_up=1)
    assert done.public()["webhook_delivery"] == {"state": WEBHOOK_FAILED, "attempts": 3, "error": "HTTP 500"}


async def test_a_redirect_is_a_failed_attempt_and_is_never_followed(receiver, store, sender):
    receiver.plan = ["302", "302"]
    s = await sender(max_attempts=2)
    job = await ended_job(store, receiver.url())
    s.notify()
    done = await webhook_done(store, job.id, WEBHOOK_FAILED)
    assert done.webhook_error == "HTTP 302 (redirects are not followed)"
    assert len(receiver.requests) == 2 and receiver.redirect_hits == 0


async def test_a_receiver_that_does_not_answer_in_time_fails_the_attempt(receiver, store, sender):
    receiver.plan = ["hang"]
    s = await sender(timeout=1.0)
    job = await ended_job(store, receiver.url())
    s.notify()
    done = await webhook_done(store, job.id, WEBHOOK_DELIVERED)
    assert done.webhook_attempts == 2 and len(receiver.requests) == 2


async def test_no_connection_fails_the_attempt_with_a_reason(store, sender):
    port = free_port()  # nothing listens there
    s = await sender(max_attempts=1)
    job = await ended_job(store, f"http://127.0.0.1:{port}/hook")
    s.notify()
    done = await webhook_done(store, job.id, WEBHOOK_FAILED)
    assert done.webhook_error is not None and done.webhook_error.startswith(f"cannot connect to 127.0.0.1:{port}")


async def test_a_slow_receiver_holds_up_no_other_delivery(receiver, store, sender):
    receiver.plan = ["slow"]
    s = await sender()
    slow = await ended_job(store, receiver.url("/slow"))
    s.notify()
    await wait_until(lambda: receiver.requests, what="the slow delivery to start")
    fast = await ended_job(store, receiver.url("/fast"))
    s.notify()
    await webhook_done(store, fast.id, WEBHOOK_DELIVERED)
    assert (await store.get(slow.id)).webhook_state == WEBHOOK_PENDING  # still waiting on its receiver
    receiver.release.set()
    await webhook_done(store, slow.id, WEBHOOK_DELIVERED)
    assert [r["path"] for r in receiver.requests] == ["/slow", "/fast"]


async def test_many_deliveries_run_at_most_the_concurrency_at_once(receiver, store, sender):
    receiver.plan = ["slow"] * 5
    metrics = Metrics(lambda: None)
    s = await sender(concurrency=3, metrics=metrics.webhooks)
    jobs = [await ended_job(store, receiver.url(f"/{i}")) for i in range(5)]
    s.notify()
    await wait_until(lambda: len(receiver.requests) == 3, what="three deliveries in flight")
    assert s.pending == metrics.webhooks.pending == 3
    # the other two were never claimed (no place was free): still due, not leased
    now = time.time()
    waiting = [j for j in [await store.get(job.id) for job in jobs] if j.webhook_next_at <= now]
    assert len(waiting) == 2 and len(receiver.requests) == 3
    receiver.release.set()
    for job in jobs:
        await webhook_done(store, job.id, WEBHOOK_DELIVERED)


async def test_two_senders_on_one_store_deliver_each_job_once(receiver, stores, sender):
    """Two processes on one store (replicas on Redis; a restart overlapping on SQLite): the claim's lease
    keeps them from delivering the same webhook twice."""
    first, second = await sender(store=await stores.open()), await sender(store=await stores.open())
    jobs = [await ended_job(first.store, receiver.url(f"/{i}")) for i in range(8)]
    first.notify()
    second.notify()
    for job in jobs:
        done = await webhook_done(second.store, job.id, WEBHOOK_DELIVERED)
        assert done.webhook_attempts == 1
    assert sorted(r["path"] for r in receiver.requests) == sorted(f"/{i}" for i in range(8))


async def test_the_allow_list_is_checked_again_at_delivery(receiver, store, sender):
    metrics = Metrics(lambda: None)
    s = await sender(policy=WebhookPolicy(("hooks.example.com",)), metrics=metrics.webhooks)
    job = await ended_job(store, receiver.url())  # stored while 127.0.0.1 was allowed
    s.notify()
    done = await webhook_done(store, job.id, WEBHOOK_FAILED)
    assert done.webhook_attempts == 1 and receiver.requests == []
    assert done.webhook_error is not None and done.webhook_error.startswith("refused: webhook: 127.0.0.1:")
    await counted(metrics, gave_up=1)


async def test_unsigned_without_a_secret_and_a_warning_at_start(receiver, store, sender, caplog):
    with caplog.at_level(logging.WARNING, "procbridge.webhooks"):
        s = await sender(secret=None)
    assert "--webhook-secret" in caplog.text
    job = await ended_job(store, receiver.url())
    s.notify()
    await webhook_done(store, job.id, WEBHOOK_DELIVERED)
    assert "X-Procbridge-Signature" not in receiver.requests[0]["headers"]


async def test_close_cancels_deliveries_in_flight_and_the_next_start_makes_them_again(tmp_path, receiver):
    """At-least-once: a delivery cut short by a shutdown is made again after the restart."""
    path = str(tmp_path / "jobs.db")
    receiver.plan = ["hang"]
    first = open_store(path)
    await first.open()
    sender = WebhookSender(first, WebhookPolicy(("127.0.0.1:*",)), secret=SECRET, poll=60.0)
    await sender.start()
    job = await ended_job(first, receiver.url())
    sender.notify()
    await wait_until(lambda: receiver.requests, what="the delivery to start")
    await sender.close()
    assert sender.delivering == {}
    await first.close()

    second = open_store(path)  # the next start: the runner's recover() makes the webhook due at once
    await second.open()
    try:
        assert (await second.get(job.id)).webhook_state == WEBHOOK_PENDING
        await second.recover(owner_gone=True)
        again = WebhookSender(second, WebhookPolicy(("127.0.0.1:*",)), secret=SECRET, poll=60.0)
        await again.start()
        try:
            done = await webhook_done(second, job.id, WEBHOOK_DELIVERED)
        finally:
            await again.close()
    finally:
        await second.close()
    assert done.webhook_attempts == 1  # the cut attempt was never recorded
    assert [r["headers"]["X-Procbridge-Delivery"] for r in receiver.requests] == ["1", "1"]
    assert all(r["job"]["id"] == job.id for r in receiver.requests)


async def test_notify_after_close_is_harmless(store):
    s = WebhookSender(store, WebhookPolicy(()), secret=None)
    await s.start()
    await s.close()
    s.notify()

