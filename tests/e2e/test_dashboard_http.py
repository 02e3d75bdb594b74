"""The dashboard through the real server (a subprocess on loopback, as a user runs it, with API keys
and --cors-origins): the page is open, its files cannot be escaped with a raw `..`, the stream needs
the key and shows the workers /v1/workers lists and the calls made, carries the CORS headers for an
allowed origin, and ends with a last `draining` snapshot when the server gets SIGTERM."""

from __future__ import annotations

import http.client as httpclient
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess, http, post_json
from tests.support.sse import SseParser

KEY = "dashboard-e2e-key-5d1f3b7e9a2c4e6f8b0d"
APP = "https://app.example.com"


def raw_get(server: ServerProcess, path: str) -> tuple[int, bytes]:
    """GET with the path sent exactly as written (no client-side normalisation of `..`)."""
    conn = httpclient.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Stream:
    def __init__(self, server: ServerProcess, headers: dict[str, str]) -> None:
        self.conn = httpclient.HTTPConnection("127.0.0.1", server.port, timeout=10)
        self.conn.request("GET", "/v1/dashboard/events", headers=headers)
        self.resp = self.conn.getresponse()
        self.parser = SseParser()

    def snapshot(self) -> dict[str, Any] | None:
        """The next `snapshot` event's data; None at the end of the stream."""
        while True:
            line = self.resp.fp.readline()
            if not line:
                return None
            event = self.parser.feed(line)
            if event is not None:
                assert event[1] == "snapshot"
                return event[2]  # type: ignore[no-any-return]

    def close(self) -> None:
        self.conn.close()


def test_the_dashboard_behind_keys_with_cors_and_its_end_at_sigterm(server_factory: Any) -> None:
    server = server_factory("--workers", "2", "--api-keys", KEY, "--cors-origins", APP)
    page = http("GET", server.url + "/dashboard")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for path in ("/dashboard/static/../../service/app.py", "/dashboard/static/../handlers.py",
                 "/dashboard/static/%2e%2e/handlers.py", "/dashboard/static/..%2f..%2fservice%2fapp.py"):
        status, body = raw_get(server, path)
        assert status in (401, 404), (path, status)  # never the file
        assert b"import" not in body, path
    refused = http("GET", server.url + "/v1/dashboard/events")
    assert refused.status == 401

    auth = {"Authorization": f"Bearer {KEY}"}
    for _ in range(20):
        assert post_json(server.url + "/v1/tasks/primes", {"limit": 100}).status == 401  # no key
        reply = http("POST", server.url + "/v1/tasks/primes", json.dumps({"limit": 100}).encode(),
                     {**auth, "Content-Type": "application/json"})
        assert reply.status == 200
    listed = {w["pid"] for w in http("GET", server.url + "/v1/workers", headers=auth).json()["workers"]}

    stream = Stream(server, {**auth, "Origin": APP})
    try:
        assert stream.resp.status == 200
        assert stream.resp.getheader("Content-Type") == "text/event-stream"
        assert stream.resp.getheader("Access-Control-Allow-Origin") == APP
        first = stream.snapshot()
        assert first is not None and first["ready"] is True
        assert {w["pid"] for w in first["workers"]} == listed
        deadline = time.monotonic() + 10
        snap = first
        while sum(entry[1] for entry in snap["calls"]["series"]) < 20:
            assert time.monotonic() < deadline, "the calls never showed"
            got = stream.snapshot()
            assert got is not None
            snap = got
        assert sum(w["tasks_done"] for w in snap["workers"]) >= 20
        server.proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        last = None
        while (got := stream.snapshot()) is not None:
            last = got
        assert last is not None and last["draining"] is True
        assert time.monotonic() - began < 5  # not held until aiohttp gives up on the connection
    finally:
        stream.close()
    assert server.stop(timeout=20) == 0


@pytest.fixture
def dask(tmp_path: Path) -> Iterator[Any]:
    pytest.importorskip("distributed")
    from tests.support.dask_cluster import running_cluster

    with running_cluster(tmp_path / "dask", nthreads=2) as procs:
        yield procs


def test_the_snapshots_on_a_dask_cluster(dask: Any, server_factory: Any) -> None:
    """On the Dask executor the snapshot gives what the scheduler tells: each Dask worker's pid, state,
    task and the calls it answered; CPU figures are null."""
    server = server_factory("--executor", dask.url, "--tasks", "tests.support.dask_tasks")
    for _ in range(3):
        assert post_json(server.url + "/v1/tasks/shout", {"text": "x", "times": 1}).status == 200
    listed = http("GET", server.url + "/v1/workers").json()["workers"]
    stream = Stream(server, {})
    try:
        first = stream.snapshot()
        assert first is not None and first["executor"] == "dask" and first["ready"] is True
        assert [w["pid"] for w in first["workers"]] == [w["pid"] for w in listed]
        for worker in first["workers"]:
            assert set(worker) == {"slot", "pid", "state", "task", "cpu_percent", "cpu_seconds", "rss_bytes",
                                   "tasks_done", "restarts"}
            assert worker["state"] in ("idle", "busy") and worker["cpu_percent"] is None
            assert worker["cpu_seconds"] is None and worker["restarts"] == 0
        assert sum(w["tasks_done"] for w in first["workers"]) == 3
    finally:
        stream.close()
