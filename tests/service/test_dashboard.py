"""The dashboard over HTTP, in-process (aiohttp's test client, the real worker pool): the page and its
files, the snapshot stream (at once, then at most one a second, one producer only while watched), what
the snapshots say under load (calls, workers, CPU, restarts, jobs and their progress), keys, and the
end of the streams at a drain."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from yarl import URL

from service.app import create_app
from service.config import Config
from service.dashboard.handlers import ASSETS, HUB
from service.dashboard.static import CSP, load
from service.state import SERVICE
from tests.conftest import started_client, wait_until
from tests.support.sse import SseParser

KEY = "dashboard-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]

WORKER_KEYS = {"slot", "pid", "state", "task", "cpu_percent", "cpu_seconds", "rss_bytes", "tasks_done", "restarts"}
JOB_KEYS = {"id", "task", "status", "progress", "priority", "attempts", "created_at", "started_at", "finished_at"}


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path) -> MakeClient:
    async def make(assets: Path | None = None, **settings: Any) -> TestClient[Any, Any]:
        config = Config(**{"workers": 2, "store": str(tmp_path / "jobs.db"), "access_log": "off", **settings})
        app = create_app(config)
        if assets is not None:
            app[ASSETS] = load(assets)
        client: TestClient[Any, Any] = await started_client(aiohttp_client, app)
        return client

    return make


class Events:
    """A text/event-stream response read event by event: (arrival time, event name, data)."""

    def __init__(self, resp: ClientResponse) -> None:
        self.resp = resp
        self.parser = SseParser()

    async def next(self, timeout: float = 5.0) -> tuple[float, str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                line = await self.resp.content.readline()
                if not line:
                    raise EOFError("the stream ended")
                event = self.parser.feed(line)
                if event is not None:
                    return time.monotonic(), event[1], event[2]

    async def snapshot(self, timeout: float = 5.0) -> dict[str, Any]:
        _, name, data = await self.next(timeout)
        assert name == "snapshot"
        return data  # type: ignore[no-any-return]

    async def until(self, condition: Callable[[dict[str, Any]], Any], timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            snap = await self.snapshot(max(0.1, deadline - time.monotonic()))
            if condition(snap):
                return snap
            assert time.monotonic() < deadline, "no snapshot showed it in time"

    def close(self) -> None:
        self.resp.close()


async def watch(client: TestClient[Any, Any], headers: dict[str, str] | None = None) -> Events:
    resp = await client.get("/v1/dashboard/events", headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/event-stream"
    return Events(resp)


def check_snapshot(snap: dict[str, Any]) -> None:
    """Every key of the format (docs/api.md "Dashboard"), with its type."""
    assert set(snap) == {"at", "executor", "ready", "draining", "pending", "workers", "restarts", "calls", "jobs",
                         "job_counts"}
    assert isinstance(snap["at"], float) and abs(snap["at"] - time.time()) < 5
    assert snap["executor"] == "local"
    assert isinstance(snap["ready"], bool) and isinstance(snap["draining"], bool)
    assert isinstance(snap["pending"], int)
    for worker in snap["workers"]:
        assert set(worker) == WORKER_KEYS
        assert isinstance(worker["slot"], int) and isinstance(worker["tasks_done"], int)
        assert isinstance(worker["restarts"], int) and isinstance(worker["cpu_seconds"], float)
        assert worker["pid"] is None or isinstance(worker["pid"], int)
        assert worker["state"] in ("starting", "idle", "busy", "retiring", "empty")
        assert worker["task"] is None or isinstance(worker["task"], str)
        assert worker["cpu_percent"] is None or isinstance(worker["cpu_percent"], float)
        assert worker["rss_bytes"] is None or isinstance(worker["rss_bytes"], int)
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in snap["restarts"].items())
    assert "crashed" in snap["restarts"]
    calls = snap["calls"]
    assert set(calls) == {"window_s", "series", "rate_1m", "latency_ms_1m", "latency_ms_5m"}
    assert calls["window_s"] == 300 and len(calls["series"]) == 300
    times = [entry[0] for entry in calls["series"]]
    assert times == list(range(times[0], times[0] + 300)) and abs(times[-1] - time.time()) < 3
    for t, n, p50, p99 in calls["series"]:
        assert isinstance(t, int) and isinstance(n, int)
        assert (p50 is None) == (p99 is None)
    assert isinstance(calls["rate_1m"], int | float)
    for window in ("latency_ms_1m", "latency_ms_5m"):
        assert calls[window] is None or set(calls[window]) == {"p50", "p95", "p99"}
    for job in snap["jobs"]:
        assert set(job) == JOB_KEYS
    assert set(snap["job_counts"]) == {"queued", "running", "succeeded", "failed", "cancelled"}


# -- the page and its files -----------------------------------------------------------------------


async def test_the_page_and_its_files_are_open_with_their_types_and_security_headers(
    make_client: MakeClient, tmp_path: Path
) -> None:
    assets = tmp_path / "static"
    assets.mkdir()
    (assets / "index.html").write_text("<!doctype html><title>x</title>")
    (assets / "app.js").write_text("console.log(1)")
    (assets / "style.css").write_text("body{}")
    client = await make_client(assets=assets, api_keys=(KEY,))
    page = await client.get("/dashboard")  # no key: the page holds no data
    assert page.status == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert await page.text() == "<!doctype html><title>x</title>"
    assert page.headers["Content-Security-Policy"] == CSP
    assert "script-src 'self'" in CSP and "frame-ancestors 'none'" in CSP and "connect-src 'self'" in CSP
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["Cache-Control"] == "no-cache"
    for name, kind in (("app.js", "text/javascript; charset=utf-8"), ("style.css", "text/css; charset=utf-8"),
                       ("index.html", "text/html; charset=utf-8")):
        resp = await client.get(f"/dashboard/static/{name}")
        assert resp.status == 200 and resp.headers["Content-Type"] == kind, name
        assert resp.headers["Cache-Control"] == "no-cache" and resp.headers["X-Content-Type-Options"] == "nosniff"
        assert await resp.read() == (assets / name).read_bytes()
        again = await client.get(f"/dashboard/static/{name}", headers={"If-None-Match": resp.headers["ETag"]})
        assert again.status == 304 and await again.read() == b""
    slash = await client.get("/dashboard/", allow_redirects=False)
    assert slash.status == 308 and slash.headers["Location"] == "/dashboard"


async def test_no_path_leads_out_of_the_static_folder(make_client: MakeClient) -> None:
    client = await make_client()
    for raw in ("/dashboard/static/..%2Fhandlers.py", "/dashboard/static/%2e%2e%2fhandlers.py",
                "/dashboard/static/%2e%2e", "/dashboard/static/..%2F..%2Fapp.py", "/dashboard/static/nope.js",
                "/dashboard/static/", "/dashboard/static/.%2Findex.html"):
        resp = await client.get(URL(raw, encoded=True))
        body = await resp.read()
        assert resp.status == 404, (raw, resp.status)
        assert b"import" not in body and resp.content_type == "application/problem+json", raw


async def test_the_installed_page_is_there() -> None:
    """The real static folder (the one the wheel ships) has the page."""
    assert "index.html" in load()


# -- the stream -----------------------------------------------------------------------------------


async def test_the_stream_needs_a_key_and_the_page_does_not(make_client: MakeClient) -> None:
    client = await make_client(api_keys=(KEY,))
    refused = await client.get("/v1/dashboard/events")
    assert refused.status == 401 and refused.content_type == "application/problem+json"
    wrong = await client.get("/v1/dashboard/events", headers={"Authorization": "Bearer not-the-key-0123456789"})
    assert wrong.status == 401
    assert (await client.get("/dashboard")).status == 200
    events = await watch(client, AUTH)
    check_snapshot(await events.snapshot())
    events.close()


async def test_a_snapshot_comes_at_once_then_at_most_one_a_second(make_client: MakeClient) -> None:
    client = await make_client()
    started = time.monotonic()
    events = await watch(client)
    arrived, name, first = await events.next(timeout=2.0)
    assert name == "snapshot" and arrived - started < 1.0
    check_snapshot(first)
    assert first["ready"] is True and first["draining"] is False and len(first["workers"]) == 2
    times = [arrived]
    stamps = [first["at"]]
    while time.monotonic() - started < 4.2:
        arrived, _, snap = await events.next(timeout=3.0)
        check_snapshot(snap)
        times.append(arrived)
        stamps.append(snap["at"])
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.9, gaps  # at most one a second (a little jitter on the way)
    assert min(b - a for a, b in itertools.pairwise(stamps)) >= 0.95
    assert 4 <= len(times) <= 6, times  # and it keeps coming
    events.close()


async def test_one_producer_runs_only_while_someone_watches(make_client: MakeClient) -> None:
    client = await make_client()
    hub = client.app[HUB]
    await asyncio.sleep(1.2)
    assert hub.producer is None and hub.builds == 0  # nobody watched: nothing was built
    a = await watch(client)
    await a.snapshot()
    producer = hub.producer
    assert producer is not None and not producer.done()
    b = await watch(client)
    await b.snapshot()
    assert hub.producer is producer and len(hub.watchers) == 2
    builds = hub.builds
    began = time.monotonic()
    for _ in range(3):
        await asyncio.gather(a.snapshot(), b.snapshot())
    elapsed = time.monotonic() - began
    assert hub.builds - builds <= elapsed + 1.5  # one build a second for both watchers, not one each
    a.close()
    await wait_until(lambda: len(hub.watchers) == 1, 5.0, "the first watcher to leave")
    assert hub.producer is producer
    b.close()
    await wait_until(lambda: hub.producer is None, 5.0, "the producer to stop")
    assert producer.done() and not hub.watchers
    built = hub.builds
    await asyncio.sleep(1.5)
    assert hub.builds == built


# -- what the snapshots say -----------------------------------------------------------------------


async def test_calls_workers_and_cpu_move_under_load(make_client: MakeClient) -> None:
    client = await make_client()
    events = await watch(client)
    before = await events.snapshot()
    done_before = sum(w["tasks_done"] for w in before["workers"])
    burn = asyncio.ensure_future(client.post("/v1/tasks/burn", json={"ms": 4000}))
    # Seen while it runs (before the other calls, which a loaded machine may make slow). Any CPU at all:
    # the workers run at nice 10, so beside other busy processes they may get only a sliver of a core.
    busy = await events.until(lambda s: any(w["task"] == "burn" and w["state"] == "busy"
                                            and (w["cpu_percent"] or 0) > 0 for w in s["workers"]))
    worker = next(w for w in busy["workers"] if w["task"] == "burn")
    assert worker["rss_bytes"] > 1_000_000 and worker["pid"] and worker["cpu_seconds"] > 0
    for _ in range(40):
        resp = await client.post("/v1/tasks/primes", json={"limit": 1000})
        assert resp.status == 200
    after = await events.until(lambda s: sum(entry[1] for entry in s["calls"]["series"]) >= 40)
    check_snapshot(after)
    assert sum(w["tasks_done"] for w in after["workers"]) >= done_before + 40
    assert after["calls"]["rate_1m"] > 0
    latency = after["calls"]["latency_ms_1m"]
    assert latency is not None and 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert max(entry[2] or 0 for entry in after["calls"]["series"]) > 0
    assert (await burn).status == 200
    events.close()


async def test_a_replaced_worker_is_counted_on_its_slot(make_client: MakeClient) -> None:
    client = await make_client()
    events = await watch(client)
    first = await events.snapshot()
    victim = first["workers"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    snap = await events.until(lambda s: s["workers"][1]["restarts"] == 1 and s["workers"][1]["pid"] not in
                              (None, victim["pid"]))
    assert snap["restarts"]["crashed"] == 1 and snap["workers"][0]["restarts"] == 0
    events.close()


async def test_the_job_list_shows_a_running_jobs_progress(make_client: MakeClient) -> None:
    client = await make_client()
    submitted = await client.post("/v1/jobs", json={"task": "burn", "args": {"ms": 4000}, "priority": 3})
    assert submitted.status == 202
    job_id = (await submitted.json())["id"]
    events = await watch(client)

    def progress(snap: dict[str, Any]) -> float:
        job = next((j for j in snap["jobs"] if j["id"] == job_id), None)
        return job["progress"]["done"] if job and job["status"] == "running" and job["progress"] else 0

    first = await events.until(lambda s: progress(s) > 0)
    job = next(j for j in first["jobs"] if j["id"] == job_id)
    assert job["task"] == "burn" and job["priority"] == 3 and job["attempts"] >= 1 and job["started_at"]
    assert set(job["progress"]) == {"done", "total", "message"} and job["progress"]["total"] == 100
    assert first["job_counts"]["running"] == 1
    await events.until(lambda s: progress(s) > progress(first))  # the bar moves
    cancelled = await client.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status == 200
    end = await events.until(lambda s: any(j["id"] == job_id and j["status"] == "cancelled" for j in s["jobs"]))
    assert end["job_counts"]["cancelled"] == 1 and end["job_counts"]["running"] == 0
    events.close()


async def test_a_drain_ends_the_streams_after_a_last_snapshot(make_client: MakeClient) -> None:
    client = await make_client()
    events = await watch(client)
    await events.snapshot()
    client.app[SERVICE].stop_taking_work()
    last = await events.snapshot(timeout=2.0)
    assert last["draining"] is True and last["ready"] is False
    with pytest.raises(EOFError):
        await events.next(timeout=2.0)
    refused = await client.get("/v1/dashboard/events")
    assert refused.status == 503 and (await refused.json())["type"] == "/problems/draining"
