"""service.access_log in-process: timestamps, the bounded non-blocking sink (flush by time, by size,
at shutdown; drops counted and a stuck writer abandoned, not waited for), the JSON lines of a real
app behind aiohttp's access-log hook (fields, slugs, key ids, no key, no query string, aiohttp's own
errors), and the coalesced audit lines of refused keys."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from service.access_log import AccessLogSink, AuditLog, IsoClock
from service.app import create_app
from service.auth import key_id
from service.config import Config, RateLimit
from service.problems import SLUG, Problem
from service.state import SERVICE
from tests.conftest import wait_until

KEY_A = "alpha-0123456789abcdef0123456789"
WRONG = "wrong-0123456789abcdef0123456789"
ACCESS_FIELDS = {"event", "time", "method", "path", "status", "slug", "latency_ms", "key_id", "remote"}
AUDIT_FIELDS = {"event", "time", "remote", "method", "path", "reason", "key_id", "count"}




def lines_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.mark.parametrize("t", [0.0, 1795669972.3105, 1795669972.9999, 1795669973.0005, 951782400.5])
def test_iso_clock_formats_utc_with_milliseconds(t):
    expected = datetime.fromtimestamp(int(t * 1000) / 1000, UTC).isoformat(timespec="milliseconds")
    assert IsoClock(lambda: t)() == expected.replace("+00:00", "Z")


def test_iso_clock_follows_time():
    now = [1795669972.001]
    clock = IsoClock(lambda: now[0])
    assert clock().endswith("52.001Z")
    now[0] = 1795669973.250
    assert clock().endswith("53.250Z")


def test_problem_responses_carry_their_slug():
    assert Problem(429, "rate-limited", "slow down").response()[SLUG] == "rate-limited"


# -- the sink ------------------------------------------------------------------------------------------


async def test_lines_are_written_within_the_flush_interval(tmp_path):
    path = tmp_path / "access.log"
    sink = AccessLogSink(str(path), flush_interval=0.05)
    sink.start()
    for i in range(3):
        sink.write(orjson.dumps({"n": i}) + b"\n")
    await wait_until(lambda: len(lines_of(path)) == 3, what="three lines")
    assert lines_of(path) == [{"n": 0}, {"n": 1}, {"n": 2}]
    await sink.aclose()
    assert (sink.written, sink.dropped) == (3, 0)


async def test_a_full_buffer_is_written_at_once(tmp_path):
    path = tmp_path / "access.log"
    sink = AccessLogSink(str(path), flush_interval=3600, flush_bytes=100)  # the timer would never fire in time
    sink.start()
    for i in range(20):
        sink.write(orjson.dumps({"n": i, "pad": "x" * 10}) + b"\n")
    await wait_until(lambda: len(lines_of(path)) >= 10, what="a flush by size")
    await sink.aclose()


async def test_close_writes_what_is_left(tmp_path):
    path = tmp_path / "access.log"
    sink = AccessLogSink(str(path), flush_interval=3600, flush_bytes=1 << 20)
    sink.start()
    for i in range(5):
        sink.write(orjson.dumps({"n": i}) + b"\n")
    assert lines_of(path) == []
    await sink.aclose(timeout=5)
    assert [line["n"] for line in lines_of(path)] == [0, 1, 2, 3, 4]


def test_an_unopenable_log_stops_the_start(tmp_path):
    sink = AccessLogSink(str(tmp_path / "missing-dir" / "access.log"))

    async def start() -> None:
        sink.start()

    with pytest.raises(RuntimeError, match="cannot open the access log"):
        asyncio.run(start())


async def test_a_stuck_writer_drops_lines_and_never_blocks_the_loop(caplog):
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(write_end, False)
        with pytest.raises(BlockingIOError):
            for _ in range(100_000):  # a bounded fill: a pipe holds 64 KiB to 1 MiB
                os.write(write_end, b"x" * 65536)
        os.set_blocking(write_end, True)  # as stdout would be: a write now blocks until someone reads

        sink = AccessLogSink("pipe", fd=write_end, max_buffer=8192, flush_bytes=1024, flush_interval=0.01)
        sink.start()
        line = b"y" * 99 + b"\n"
        started = time.monotonic()
        for i in range(5000):
            sink.write(line)
            if i % 500 == 0:
                await asyncio.sleep(0)  # let a flush reach the (stuck) writer
        took = time.monotonic() - started
        assert took < 1.0, f"5000 writes took {took:.3f} s: the loop was blocked"
        assert sink.dropped > 0
        assert sink._buffered <= 8192  # bounded, whatever the writer does
        with caplog.at_level(logging.WARNING, "procbridge.access"):
            started = time.monotonic()
            await sink.aclose(timeout=0.2)
            assert time.monotonic() - started < 2.0  # a stuck writer costs the deadline, not the exit
        assert sink.written == 0 and sink.dropped == 5000
        assert "dropped" in caplog.text

        os.set_blocking(read_end, False)
        writer = sink._writer
        assert writer is not None
        deadline = time.monotonic() + 10
        while writer.is_alive() and time.monotonic() < deadline:  # unstick the thread so it can end
            try:
                os.read(read_end, 1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        assert not writer.is_alive()
    finally:
        os.close(read_end)
        os.close(write_end)


# -- the audit -----------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


class ListSink:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, line: bytes) -> None:
        self.lines.append(orjson.loads(line))


def refused(remote: str = "192.0.2.1", path: str = "/v1/tasks") -> Any:
    return SimpleNamespace(remote=remote, method="GET", path=path)


async def test_audit_coalesces_a_flood_per_address_and_reason():
    sink, clock = ListSink(), FakeClock()
    audit = AuditLog(sink, clock=clock)  # type: ignore[arg-type]
    audit(refused(), "unknown-key", "1234abcd")
    assert sink.lines == [{"event": "auth-rejected", "time": sink.lines[0]["time"], "remote": "192.0.2.1",
                           "method": "GET", "path": "/v1/tasks", "reason": "unknown-key", "key_id": "1234abcd",
                           "count": 1}]
    for i in range(999):
        clock.now += 0.0005
        audit(refused(path=f"/v1/jobs/{i}"), "unknown-key", "1234abcd")
    audit(refused(), "missing", None)  # another reason: its own line
    audit(refused("192.0.2.2"), "unknown-key", "1234abcd")  # another address: its own line
    assert [(line["remote"], line["reason"], line["count"]) for line in sink.lines] == [
        ("192.0.2.1", "unknown-key", 1), ("192.0.2.1", "missing", 1), ("192.0.2.2", "unknown-key", 1)]
    clock.now += 1.0
    audit.expire(clock())
    assert (sink.lines[-1]["reason"], sink.lines[-1]["count"], sink.lines[-1]["path"]) == (
        "unknown-key", 999, "/v1/jobs/998")  # the window's refusals, with the latest one's fields
    assert len(sink.lines) == 4 and len(audit) == 0


async def test_audit_table_is_bounded_and_evictions_are_reported():
    sink, clock = ListSink(), FakeClock()
    audit = AuditLog(sink, max_pairs=10, clock=clock)  # type: ignore[arg-type]
    for i in range(1000):
        audit(refused(f"10.0.{i // 256}.{i % 256}"), "missing", None)
        audit(refused(f"10.0.{i // 256}.{i % 256}"), "missing", None)
        assert len(audit) <= 10
    audit.close()
    assert sum(line["count"] for line in sink.lines) == 2000  # every refusal is accounted for
    assert len(audit) == 0


# -- a real app ----------------------------------------------------------------------------------------


async def serve(app: web.Application) -> TestServer:
    """The app on a test server whose runner gets the app's runner options, as service/server.py
    does (TestServer(app, **kwargs) does not pass its kwargs to the runner; start_server does)."""
    server = TestServer(app)
    await server.start_server(**app[SERVICE].runner_options())
    return server


async def test_a_real_app_logs_every_response_as_json(aiohttp_client, tmp_path):
    log_path = tmp_path / "access.log"
    config = Config(workers=1, store=str(tmp_path / "jobs.db"), api_keys=(KEY_A,), rate_limit=RateLimit(4, 60),
                    access_log=str(log_path))
    app = create_app(config)
    client = await aiohttp_client(await serve(app))
    auth = {"Authorization": f"Bearer {KEY_A}"}
    expected = []  # (method, path, status, slug, key id)

    async def request(method: str, url: str, status: int, slug: str | None, kid: str | None, **kw: Any) -> None:
        resp = await client.request(method, url, **kw)
        assert resp.status == status, await resp.text()
        expected.append((method, url.split("?")[0], status, slug, kid))

    await request("GET", "/healthz", 200, None, None)
    await request("POST", "/v1/tasks/primes?timeout=7.5", 200, None, key_id(KEY_A), json={"limit": 100},
                  headers=auth)
    await request("GET", "/v1/tasks", 401, "unauthorized", None)
    await request("GET", "/v1/tasks", 401, "unauthorized", None, headers={"Authorization": f"Bearer {WRONG}"})
    await request("GET", "/v1/nothing-here", 404, "not-found", key_id(KEY_A), headers=auth)
    await request("POST", "/v1/tasks/primes", 422, "invalid-arguments", key_id(KEY_A), json={"limit": -1},
                  headers=auth)
    await request("GET", "/v1/tasks", 200, None, key_id(KEY_A), headers=auth)
    await request("GET", "/v1/tasks", 429, "rate-limited", key_id(KEY_A), headers=auth)

    # aiohttp's own answer to a request it cannot parse goes through the same hook.
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /v1/tasks HTTP/1.1\r\nHost: x\r\nThis is not a header\r\n\r\n")
    assert (await asyncio.wait_for(reader.readline(), 10)).split()[1] == b"400"
    writer.close()

    def access() -> list[dict[str, Any]]:
        return [line for line in lines_of(log_path) if line["event"] == "access"]

    await wait_until(lambda: len(access()) == len(expected) + 1, what="every access line")
    lines = access()
    for line in lines:
        assert set(line) == ACCESS_FIELDS
        assert line["remote"] == "127.0.0.1"
        assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
        assert datetime.fromisoformat(line["time"]).tzinfo is not None
    got = [(line["method"], line["path"], line["status"], line["slug"], line["key_id"]) for line in lines]
    assert got[:-1] == expected
    assert got[-1][2] == 400
    text = log_path.read_text()
    assert KEY_A not in text and WRONG not in text
    assert "timeout=7.5" not in text  # paths only: a query string can hold arguments

    audit = [line for line in lines_of(log_path) if line["event"] == "auth-rejected"]
    assert [(a["reason"], a["key_id"], a["count"]) for a in audit] == [("missing", None, 1),
                                                                       ("unknown-key", key_id(WRONG), 1)]
    assert all(set(a) == AUDIT_FIELDS and a["path"] == "/v1/tasks" for a in audit)


async def test_off_means_no_access_log_and_audit_lines_on_stderr(aiohttp_client, tmp_path, capfd):
    app = create_app(Config(workers=1, store=str(tmp_path / "jobs.db"), api_keys=(KEY_A,), access_log="off"))
    assert app[SERVICE].runner_options() == {"access_log": None}
    client = await aiohttp_client(await serve(app))
    assert (await client.get("/v1/tasks", headers={"Authorization": f"Bearer {WRONG}"})).status == 401
    seen: list[str] = []

    def audited() -> bool:
        out, err = capfd.readouterr()
        seen.append(err)
        assert '"event":"access"' not in out + err
        return '"event":"auth-rejected"' in "".join(seen)

    await wait_until(audited, what="the audit line on stderr")
    line = next(json_line for json_line in "".join(seen).splitlines() if '"auth-rejected"' in json_line)
    assert orjson.loads(line)["key_id"] == key_id(WRONG)
    assert WRONG not in "".join(seen)
