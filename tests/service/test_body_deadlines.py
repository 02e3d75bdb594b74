"""docs/security.md, "Bodies" and "The HTTP layer": a body that arrives slower than BODY_MIN_RATE on
average once BODY_TIMEOUT has passed is 408 `request-timeout` (connection closed), one that keeps the
rate is served; a request head that is not complete HEADER_TIMEOUT after its first byte is 408 too.

The real app (create_app, with its worker pool) is served in-process by the service's own runner
(GuardedAppRunner with RUNNER_LIMITS, as service/server.py builds it) on a real TCP port, and the
requests are real bytes trickled over a raw socket. Only the deadlines are shortened, by patching the
module constants that service/body.py and service/http_protocol.py read each time they arm a timer
(30 s and 10 s in production would make each test that long), and the runner's LINGERING_TIME, the
wait before a connection answered early is closed; the mechanism is the production one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from service import body, http_protocol
from service.app import create_app
from service.config import Config
from service.http_protocol import RUNNER_LIMITS, GuardedAppRunner
from service.state import SERVICE

SHORT_BODY_TIMEOUT = 0.5  # seconds (production: 30)
SHORT_MIN_RATE = 1024  # bytes/s (production: 16 KiB/s)
SHORT_HEADER_TIMEOUT = 0.5  # seconds (production: 10)
SHORT_LINGERING_TIME = 0.5  # seconds spent discarding an unread body after an early answer (production: 5)
PATIENCE = 30.0  # the test's own deadline for any answer: far above every deadline under test


@pytest.fixture
async def port(tmp_path: Path) -> AsyncIterator[int]:
    """The service on a free loopback port, ready for calls (one worker)."""
    app = create_app(Config(workers=1, store=str(tmp_path / "jobs.db"), access_log="off"))
    runner = GuardedAppRunner(
        app, handle_signals=False, handler_cancellation=True, shutdown_timeout=5.0,
        **{**RUNNER_LIMITS, "lingering_time": SHORT_LINGERING_TIME}, **app[SERVICE].runner_options(),
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        executor = app[SERVICE].executor
        assert executor is not None
        await asyncio.wait_for(executor.wait_started(), 60)
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields if f)}
    payload = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, payload


async def trickle(port: int, head: bytes, rest: bytes, piece: int, every: float) -> dict[str, Any]:
    """Send `head`, then `rest` `piece` bytes every `every` seconds until it is all sent or an answer
    comes; return the answer, how much of `rest` was sent, and whether the server then closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = asyncio.ensure_future(read_response(reader))
    sent = 0
    try:
        writer.write(head)
        while sent < len(rest) and not answer.done():
            writer.write(rest[sent : sent + piece])
            sent += len(rest[sent : sent + piece])
            try:
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.wait([answer], timeout=every)  # pacing the trickle; the answer ends it early
        status, headers, payload = await asyncio.wait_for(answer, PATIENCE)
        took = loop.time() - started
        closed = await asyncio.wait_for(reader.read(), PATIENCE) == b""  # EOF: the server closed it
    finally:
        answer.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return {"status": status, "headers": headers, "body": payload, "sent": sent, "took": took, "closed": closed}


def call_head(length: int) -> bytes:
    return (f"POST /v1/tasks/primes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()


def padded_args(size: int) -> bytes:
    """`{"limit": 10}` padded with JSON whitespace to `size` bytes: a valid body of any length."""
    core = b'{"limit": 10'
    return core + b" " * (size - len(core) - 1) + b"}"


def assert_request_timeout(answer: dict[str, Any]) -> dict[str, Any]:
    assert answer["status"] == 408, answer
    assert answer["headers"]["content-type"].startswith("application/problem+json"), answer
    problem: dict[str, Any] = orjson.loads(answer["body"])
    assert problem["type"] == "/problems/request-timeout", problem
    return problem


async def test_a_body_slower_than_the_minimum_rate_after_the_body_timeout_is_408_and_closed(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(body, "BODY_TIMEOUT", SHORT_BODY_TIMEOUT)
    monkeypatch.setattr(body, "BODY_MIN_RATE", SHORT_MIN_RATE)
    payload = padded_args(1500)  # 15 s at this rate: the answer must come long before
    # 10 bytes every 100 ms: 100 bytes/s, a tenth of the minimum rate, and never idle (the idle
    # deadline, BODY_IDLE_TIMEOUT, stays 10 s): only the rate rule can end it.
    answer = await trickle(port, call_head(len(payload)), payload, 10, 0.1)
    problem = assert_request_timeout(answer)
    assert f"slower than {SHORT_MIN_RATE} bytes/s" in problem["detail"]
    assert answer["sent"] < len(payload), "the answer came only after the whole body"
    assert answer["headers"].get("connection", "").lower() == "close" and answer["closed"]


async def test_a_body_that_keeps_the_minimum_rate_past_the_body_timeout_is_served(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(body, "BODY_TIMEOUT", SHORT_BODY_TIMEOUT)
    monkeypatch.setattr(body, "BODY_MIN_RATE", SHORT_MIN_RATE)
    payload = padded_args(8 * 4096)
    # 4 KiB every 100 ms: 40 KiB/s, forty times the minimum rate, for 0.8 s (past BODY_TIMEOUT); each
    # piece moves the deadline 4 s further, so a slow machine has seconds of slack.
    answer = await trickle(port, call_head(len(payload)), payload, 4096, 0.1)
    assert answer["status"] == 200, answer
    assert orjson.loads(answer["body"])["result"] == 4
    assert answer["sent"] == len(payload) and answer["took"] > SHORT_BODY_TIMEOUT


async def test_a_request_head_not_complete_within_the_header_timeout_is_408_and_closed(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_protocol, "HEADER_TIMEOUT", SHORT_HEADER_TIMEOUT)
    head = b"POST /v1/tasks/primes HTTP/1.1\r\nHost: x\r\n"
    fields = b"".join(b"X-Slow-%d: y\r\n" % i for i in range(90))  # never the blank line
    # one header field every 100 ms: the head keeps arriving but never ends
    answer = await trickle(port, head, fields, len(b"X-Slow-00: y\r\n"), 0.1)
    assert_request_timeout(answer)
    assert answer["sent"] < len(fields), "the answer came only after every field"
    assert answer["closed"]
