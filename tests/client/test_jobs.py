"""Jobs, further (docs/api.md "Jobs"; the service since issue 19) from the client, against a real server: `submit`'s
options in the job document, `iter_jobs` page by page, and job event streams that go on after their
connection is cut for real (tests/support/tcp_proxy.py between the client and the server: the client's
socket sees the server go away mid-answer) with each event exactly once, the same as an uncut read.

Every test here shares the module's server; each lists its own task's jobs (`task=`), so the jobs of
the others do not show. Nothing waits by sleeping: gates are files, conditions are polled with deadlines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import procbridge
from procbridge import AsyncClient, Client, Event
from procbridge._core import Settings
from procbridge._events import StreamResume
from tests.conftest import ServerProcess, joined, run_in_thread, wait_for, wait_until
from tests.support.tcp_proxy import CuttingProxy

BUDGET = 1500  # bytes a cut connection forwards from the server: headers and a few dozen events


@pytest.fixture
def pb(server: ServerProcess) -> Iterator[Client]:
    with Client(server.url, timeout=30) as client:
        yield client


def items(events: list[Event]) -> list[int]:
    return [e.data["item"] for e in events if e.type == "item"]


def test_submit_options_are_sent_when_given_and_show_in_the_job_document(pb: Client, server: ServerProcess) -> None:
    with CuttingProxy(server.port) as proxy, Client(proxy.url, timeout=30) as via:
        delayed = via.submit("echo", {"value": 1}, priority=7, delay=3600, retries=2, timeout=5).info()
        assert (delayed["status"], delayed["priority"], delayed["retries"], delayed["attempts"]) == ("queued", 7, 2, 0)
        assert delayed["run_at"] == pytest.approx(delayed["created_at"] + 3600)
        at = float(int(time.time()) + 7200)
        later = via.submit("echo", run_at=at, priority=-3).info()
        assert (later["status"], later["run_at"], later["priority"]) == ("queued", at, -3)
        sent_before = len(proxy.sent)
        plain = via.submit("echo", value=2)
        assert plain.result(timeout=30)["value"] == 2
        body = bytes(proxy.sent[sent_before:])
        for option in (b'"priority"', b'"delay"', b'"run_at"', b'"retries"', b'"webhook"', b'"timeout"'):
            assert option not in body  # not given: not sent, the service's default holds
        doc = plain.info()
        assert (doc["priority"], doc["retries"], doc["attempts"]) == (0, 0, 1) and "webhook" not in doc

        with pytest.raises(ValueError, match="not both"):
            via.submit("echo", delay=1, run_at=at)
        # Unset --webhook-allow: the service refuses every webhook (docs/api.md: 422), naming the field
        with pytest.raises(procbridge.InvalidArguments) as refused:
            via.submit("echo", value=3, webhook="http://127.0.0.1:9/hook")
        assert "--webhook-allow" in refused.value.detail
        assert b'"webhook":"http://127.0.0.1:9/hook"' in proxy.sent
    assert {j["id"] for j in pb.jobs(task="echo", status="queued")} == {delayed["id"], later["id"]}


def test_iter_jobs_pages_through_every_job_newest_first(pb: Client, server: ServerProcess) -> None:
    with ThreadPoolExecutor(16) as pool:  # delayed an hour: they stay queued while listed
        submitted = set(pool.map(lambda i: pb.submit("nap", ms=i, delay=3600).id, range(250)))
    assert len(submitted) == 250
    with CuttingProxy(server.port) as proxy, Client(proxy.url, timeout=30) as via:
        listed = list(via.iter_jobs(task="nap", page_size=40))
        assert proxy.sent.count(b"GET /v1/jobs?") == 7  # 250 jobs, 40 a page: one request per page
        assert proxy.sent.count(b"cursor=") == 6
    assert len(listed) == 250 and {j["id"] for j in listed} == submitted  # each exactly once
    order = [(j["created_at"], j["id"]) for j in listed]
    assert order == sorted(order, reverse=True) and len(set(order)) == 250  # newest first
    assert [j["id"] for j in pb.jobs(task="nap", limit=1000)] == [j["id"] for j in listed]
    assert [j["id"] for j in pb.jobs(task="nap", limit=40)] == [j["id"] for j in listed[:40]]
    queued = pb.iter_jobs(status="queued", task="nap", page_size=100)
    assert [j["id"] for j in queued] == [j["id"] for j in listed]
    assert list(pb.iter_jobs(status="succeeded", task="nap")) == []


def test_events_go_on_after_the_connection_is_cut_each_event_once(pb: Client, server: ServerProcess,
                                                                  gate: Path) -> None:
    job = pb.submit("st_count", n=300, gate=str(gate))  # item 0, then it waits for the gate
    wait_for(lambda: job.status() == "running", 30, what="the job to be claimed")
    with CuttingProxy(server.port) as proxy, Client(proxy.url, timeout=30) as via:
        seen: list[Event] = []

        def read() -> None:
            seen.extend(via.job(job.id).events())

        thread, box = run_in_thread(read)
        wait_for(lambda: items(seen) == [0], 30, what="item 0, while the job waits on the gate")
        proxy.budget = BUDGET  # every connection from now on is cut after BUDGET bytes
        assert proxy.cut(reset=True) == 1  # a reset while the job runs (not final)
        wait_for(lambda: proxy.accepted >= 2, 30, what="the client to reconnect")
        gate.touch()
        joined(thread, box, 60)
        cuts = proxy.accepted - 1
        assert via.job(job.id).result(timeout=30) == list(range(300))  # its stream cut too, from the store
        assert proxy.accepted > cuts + 2

    reference = list(pb.job(job.id).events())  # uncut, after the end
    assert seen == reference  # ids, types and data: no duplicate, no gap
    assert cuts >= 6 and items(seen) == list(range(300))
    assert (seen[0].id, seen[0].data["status"], seen[-2].id, seen[-1].id) == ("1-1", "running", "end-1", "end-2")
    assert len({e.id for e in seen}) == len(seen)

    with Client(server.url) as elsewhere:  # another process would resume a stream it read earlier so
        assert list(elsewhere.job(job.id).events(last_event_id=reference[150].id)) == reference[151:]
        assert list(elsewhere.job(job.id).events(last_event_id="end-1")) == reference[-1:]
        assert list(elsewhere.job(job.id).events(last_event_id="end-2")) == []


def test_a_retried_jobs_stream_shows_both_runs_through_cuts(pb: Client, server: ServerProcess) -> None:
    job = pb.submit("st_count", n=30, fail_at=20, retries=1)  # each attempt: 20 items, then it fails
    with CuttingProxy(server.port, budget=BUDGET) as proxy, Client(proxy.url, timeout=30) as via:
        seen = list(via.job(job.id).events())
        with pytest.raises(procbridge.TaskFailed, match="failed at item 20"):
            via.job(job.id).result(timeout=30)
        assert proxy.accepted >= 3
    assert [e for e in seen if e.id != "0-0"] == list(pb.job(job.id).events())  # 0-0: seen before the claim
    statuses = [(e.id, e.data["status"], e.data.get("attempt")) for e in seen if e.type == "status"]
    assert [s for s in statuses if s[0] != "0-0"] == [
        ("1-1", "running", 1), ("1-22", "queued", 1), ("2-1", "running", 2), ("end-1", "failed", None)]
    retry = next(e.data for e in seen if e.id == "1-22")
    assert retry["retry_at"] > 0 and "failed at item 20" in retry["error"]["detail"]
    assert items(seen) == list(range(20)) * 2 and seen[-1].type == "error"
    assert pb.job(job.id).info()["attempts"] == 2


def test_a_stream_that_keeps_breaking_gives_up_after_the_clients_retries(pb: Client, server: ServerProcess) -> None:
    job = pb.submit("echo", value="done")
    assert job.result(timeout=30)["value"] == "done"
    with CuttingProxy(server.port, budget=40) as proxy:  # cut within the answer's headers: never an event
        with Client(proxy.url, retries=2) as via:
            with pytest.raises(procbridge.ServiceUnreachable):
                list(via.job(job.id).events())
            assert proxy.accepted == 3  # the first connection and two reopenings
        with Client(proxy.url, retries=0) as via:
            with pytest.raises(procbridge.ServiceUnreachable):
                via.job(job.id).result(timeout=30)
            assert proxy.accepted == 4


async def test_async_client_options_iter_jobs_and_events_resumed_after_a_cut(server: ServerProcess,
                                                                           gate: Path) -> None:
    async with AsyncClient(server.url, timeout=30) as pb:
        delayed = [await pb.submit("spin", ms=1, delay=3600, priority=i, retries=i) for i in range(5)]
        docs = [d async for d in pb.iter_jobs(task="spin", page_size=2)]
        assert [d["id"] for d in docs] == [j.id for j in reversed(delayed)]
        assert [(d["priority"], d["retries"], d["status"]) for d in docs] == [(i, i, "queued") for i in (4, 3, 2, 1, 0)]
        assert len(await pb.jobs(task="spin", limit=2)) == 2

        job = await pb.submit("st_count", n=200, gate=str(gate))

        async def claimed() -> bool:
            return await job.status() == "running"

        await wait_until(claimed, 30, what="the job to be claimed")
        seen: list[Event] = []
        with CuttingProxy(server.port) as proxy:
            async with AsyncClient(proxy.url, timeout=30) as via:

                async def read() -> None:
                    async for event in via.job(job.id).events():
                        seen.append(event)

                reader = asyncio.create_task(read())
                await wait_until(lambda: items(seen) == [0], 30, what="item 0, while the job waits on the gate")
                proxy.budget = BUDGET
                assert proxy.cut() == 1  # a FIN mid-answer while the job runs
                await wait_until(lambda: proxy.accepted >= 2, 30, what="the client to reconnect")
                await asyncio.to_thread(gate.touch)
                await asyncio.wait_for(reader, 60)
                assert proxy.accepted >= 4
                assert await via.job(job.id).result(timeout=30) == list(range(200))
        reference = [e async for e in pb.job(job.id).events()]
        assert seen == reference and items(seen) == list(range(200)) and seen[-1].id == "end-2"
        resumed = [e async for e in pb.job(job.id).events(last_event_id=reference[100].id)]
        assert resumed == reference[101:]


def test_the_resume_policy_counts_failures_in_a_row_and_gives_up_after_retries() -> None:
    settings = Settings.resolve("http://127.0.0.1:9", None, None, 2)
    resume = StreamResume(settings, "here", last_event_id="1-4")
    assert resume.headers() == {"Last-Event-ID": "1-4"} and not resume.finished
    broken = procbridge.ServiceUnreachable("cut")
    assert 0.1 <= (resume.broke(broken) or 0) <= 0.12  # nothing came yet: back off
    resume.seen(Event("item", {"item": 1}, "1-5"))
    assert resume.broke(None) == 0.0  # the first reopening after events: at once
    assert 0.2 <= (resume.broke(broken) or 0) <= 0.24  # the second failure in a row
    with pytest.raises(procbridge.ServiceUnreachable, match="ended before the job's final event"):
        resume.broke(None)  # the third: more than `retries`
    assert resume.headers() == {"Last-Event-ID": "1-5"}
    assert StreamResume(settings, "here", last_event_id="end-2").finished  # nothing follows end-2
    resume = StreamResume(settings, "here")
    resume.seen(Event("item", {"item": 1}))  # a service that sends no ids: no resuming
    assert resume.broke(None) is None
    with pytest.raises(procbridge.ServiceUnreachable, match="cut"):
        resume.broke(broken)
    timed = StreamResume(Settings.resolve("http://127.0.0.1:9", None, 0.05, 5), "here")
    with pytest.raises(procbridge.Overloaded):  # its Retry-After would end past the client's timeout
        timed.broke(procbridge.problem_error({"type": "/problems/overloaded", "status": 503}, retry_after=1.0))
