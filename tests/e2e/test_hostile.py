"""Hostile input against a real server: malformed HTTP, header floods, bodies that break the framing,
hostile JSON and absurd arguments, slow (half-open) connections and connection floods. Each is
answered with a clear 4xx problem+json, quickly, and costs nothing: afterwards /healthz answers, the
worker pids are the same and no worker ran a task for it. Raw bytes go over plain sockets, so no
client library tidies a malformed request up. (tests/e2e/test_errors.py covers the API's own error
paths; this file covers what arrives before, around and beside them.)"""

from __future__ import annotations

import contextlib
import http.client as httpclient
import json
import selectors
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web, web_protocol
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError

from service import http_protocol
from service.body import BODY_IDLE_TIMEOUT
from service.http_protocol import (
    HEADER_TIMEOUT,
    MAX_CONNECTIONS_PER_CLIENT,
    MAX_FIELD_SIZE,
    MAX_HEADERS,
    MAX_LINE_SIZE,
)
from tests.conftest import Reply, ServerProcess, http, post_json, serving, wait_for

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(tmp_path_factory.mktemp("hostile"), "--workers", "2", "--max-body", str(16 * 1024 * 1024)) as srv:
        yield srv
    assert srv.leftovers() == []


def workers(server: ServerProcess) -> dict[int, int]:
    """pid -> tasks done, from the worker table."""
    return {w["pid"]: w["tasks_done"] for w in http("GET", server.url + "/v1/workers").json()["workers"]}


@pytest.fixture
def costs_nothing(server: ServerProcess) -> Iterator[None]:
    """After the test: the server answers, its workers are the same processes, and none ran a task."""
    wait_for(lambda: all(p for p in workers(server)), 10, what="every worker to be up")
    before = workers(server)
    yield
    assert server.proc.poll() is None, server.log()
    assert http("GET", server.url + "/healthz", timeout=5).json() == {"status": "ok"}
    assert workers(server) == before, "a worker was replaced or ran a task"


def exchange(server: ServerProcess, request: bytes, *, source: str = "127.0.0.1", timeout: float = 10) -> Reply:
    """Send these exact bytes on a fresh connection and parse the one response."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(request)
        resp = httpclient.HTTPResponse(sock, method="POST")
        resp.begin()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())


def head(path: str, headers: dict[str, str], method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def assert_problem(reply: Reply, status: int, slug: str) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.headers, reply.body[:300])
    assert reply.headers["content-type"].split(";")[0] == "application/problem+json", reply.headers
    problem = json.loads(reply.body)
    assert problem["type"] == f"/problems/{slug}", problem
    assert problem["status"] == status
    assert problem["title"] and problem["detail"], problem
    return problem


# -- malformed HTTP: aiohttp's parser refuses it; the answer is problem+json all the same --------------

MALFORMED = {
    "garbage-line": b"GARBAGE\r\n\r\n",
    "bad-method": b"G@T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad-version": b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    "tls-client-hello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32) + b"\r\n\r\n",
    "binary-noise": bytes(range(256)) + b"\r\n\r\n",
    "space-in-header-name": b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    "nul-in-header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "letters-in-content-length": head("/v1/tasks/primes", {**JSON, "Content-Length": "abc"}),
    "negative-content-length": head("/v1/tasks/primes", {**JSON, "Content-Length": "-1"}),
    "two-content-lengths": head("/v1/tasks/primes", {**JSON, "Content-Length": "2", "content-length": "3"}) + b"{}",
    "content-length-and-chunked": head("/v1/tasks/primes", {**JSON, "Content-Length": "2",
                                                            "Transfer-Encoding": "chunked"}) + b"0\r\n\r\n",
    "unknown-transfer-encoding": head("/v1/tasks/primes", {**JSON, "Transfer-Encoding": "gzip"}) + b"{}",
    "bad-chunk-size": head("/v1/tasks/primes", {**JSON, "Transfer-Encoding": "chunked"}) + b"zz\r\n{}\r\n0\r\n\r\n",
    "chunk-longer-than-said": head("/v1/tasks/primes", {**JSON, "Transfer-Encoding": "chunked"})
    + b"2\r\n{}xx\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_http_is_a_problem(server, costs_nothing, name):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(MALFORMED[name])
        resp = httpclient.HTTPResponse(sock, method="POST")
        resp.begin()
        reply = Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        assert sock.recv(100) == b""  # and the connection is closed: the stream cannot be trusted
    problem = assert_problem(reply, 400, "bad-request")
    assert problem["detail"].startswith("malformed HTTP request: "), problem


def test_a_chunked_body_that_breaks_midway_is_400(server, costs_nothing):
    """The head is fine and the handler is already reading when the chunked framing breaks: the
    answer comes at once (aiohttp alone would leave the handler waiting for the body deadline)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head("/v1/tasks/primes", {**JSON, "Transfer-Encoding": "chunked"}) + b"5\r\n{\"lim\r\n")
        sock.sendall(b"this is not a chunk size\r\n\r\n")
        resp = httpclient.HTTPResponse(sock, method="POST")
        resp.begin()
        reply = Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    assert_problem(reply, 400, "bad-request")
    assert time.monotonic() - started < BODY_IDLE_TIMEOUT / 2


def test_a_body_shorter_than_its_content_length_then_eof_costs_nothing(server, costs_nothing):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head("/v1/tasks/primes", {**JSON, "Content-Length": "100"}) + b'{"limit": 10')
        sock.shutdown(socket.SHUT_WR)  # half-close: no more body will ever come
        data = sock.recv(65536)
    assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:200]


# -- header floods --------------------------------------------------------------------------------------


def test_header_floods_are_414_and_431(server, costs_nothing):
    problem = assert_problem(exchange(server, head("/healthz?" + "a" * MAX_LINE_SIZE, {}, "GET")), 414, "uri-too-long")
    assert str(MAX_LINE_SIZE) in problem["detail"]
    problem = assert_problem(exchange(server, head("/healthz", {"X-Big": "b" * (MAX_FIELD_SIZE + 1)}, "GET")),
                             431, "header-too-large")
    assert str(MAX_FIELD_SIZE) in problem["detail"]
    flood = {f"X-H{i}": "v" for i in range(MAX_HEADERS + 1)}
    problem = assert_problem(exchange(server, head("/healthz", flood, "GET")), 431, "header-too-large")
    assert str(MAX_HEADERS) in problem["detail"]
    # Just under every limit, the request is served.
    assert exchange(server, head("/healthz?" + "a" * (MAX_LINE_SIZE - 100), {}, "GET")).status == 200
    assert exchange(server, head("/healthz", {"X-Big": "b" * (MAX_FIELD_SIZE - 100)}, "GET")).status == 200
    fine = {f"X-H{i}": "v" for i in range(MAX_HEADERS - 2)}  # plus Host
    assert exchange(server, head("/healthz", fine, "GET")).status == 200


# -- bodies ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "x-custom"])
def test_a_content_encoding_is_415_and_never_inflated(server, costs_nothing, encoding):
    # Not even valid gzip: refused from the header, the bytes are never looked at.
    request = head("/v1/tasks/primes", {**JSON, "Content-Encoding": encoding, "Content-Length": "5"}) + b"\x1f\x8bxyz"
    problem = assert_problem(exchange(server, request), 415, "unsupported-media-type")
    assert "Content-Encoding" in problem["detail"]


def test_empty_and_null_bodies_on_every_json_endpoint(server, costs_nothing):
    for path in ("/v1/tasks/primes", "/v1/tasks/primes/map", "/v1/jobs"):
        for body in (b"", b"null", b"  "):
            request = head(path, {**JSON, "Content-Length": str(len(body))}) + body
            assert_problem(exchange(server, request), 400, "invalid-json")
        assert_problem(exchange(server, head(path, {"Content-Length": "2"}) + b"{}"), 415, "unsupported-media-type")


def test_a_content_length_beyond_the_limit_is_refused_before_the_body(server, costs_nothing):
    # 10^15 bytes declared, none sent: the answer comes from the head alone.
    for path in ("/v1/tasks/sha256", "/v1/tasks/primes/map", "/v1/jobs"):
        ctype = "application/octet-stream" if path.endswith("sha256") else "application/json"
        request = head(path, {"Content-Type": ctype, "Content-Length": str(10**15)})
        started = time.monotonic()
        assert_problem(exchange(server, request), 413, "payload-too-large")
        assert time.monotonic() - started < 2


def test_expect_100_continue_is_refused_before_the_invitation_when_the_body_is_too_large(server, costs_nothing):
    # aiohttp's own handler would say "100 Continue" first; the client must hear the 413 instead.
    for path in ("/v1/tasks/sha256", "/v1/tasks/primes/map", "/v1/jobs"):
        ctype = "application/octet-stream" if path.endswith("sha256") else "application/json"
        request = head(path, {"Content-Type": ctype, "Content-Length": str(10**15), "Expect": "100-continue"})
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(request)
            first = sock.recv(64)
        assert first.startswith(b"HTTP/1.1 413 "), first
    # an expectation the server does not know is 417, as problem+json
    odd = head("/v1/tasks/primes", {**JSON, "Content-Length": "2", "Expect": "something-else"}) + b"{}"
    assert_problem(exchange(server, odd), 417, "expectation-failed")


def test_expect_100_continue_within_the_limit_is_invited_then_served(server):
    body = b'{"limit": 10}'
    request = head("/v1/tasks/primes", {**JSON, "Content-Length": str(len(body)), "Expect": "100-continue"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        resp = httpclient.HTTPResponse(sock, method="POST")
        resp.begin()
        assert resp.status == 200 and json.loads(resp.read())["result"] == 4


# -- hostile JSON and absurd arguments: 400/422 at once, never a worker -------------------------------------

HOSTILE_JSON = {
    "integer-with-5000-digits": b'{"limit": ' + b"9" * 5000 + b"}",
    "negative-integer-with-5000-digits": b'{"limit": -' + b"9" * 5000 + b"}",
    "float-1e400": b'{"limit": 1e400}',
    "float--1e400": b'{"limit": -1e400}',
    "exponent-with-many-digits": b'{"limit": 1e' + b"9" * 1000 + b"}",
    "nan": b'{"limit": NaN}',
    "infinity": b'{"limit": -Infinity}',
    "arguments-nested-100000-deep": b'{"limit": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "ten-megabytes-of-brackets": b"[" * 10_000_000,
    "ten-megabytes-of-brackets-in-an-object": b'{"limit": ' + b"[" * 10_000_000,
}


@pytest.mark.parametrize("name", HOSTILE_JSON)
def test_hostile_json_is_400_quickly(server, costs_nothing, name):
    started = time.monotonic()
    reply = exchange(server, head("/v1/tasks/primes", {**JSON, "Content-Length": str(len(HOSTILE_JSON[name]))})
                     + HOSTILE_JSON[name], timeout=30)
    elapsed = time.monotonic() - started
    problem = assert_problem(reply, 400, "invalid-json")
    assert len(problem["detail"]) < 500  # the input is never echoed back whole
    assert elapsed < 5, elapsed


ABSURD = [
    ("primes", {"limit": 10**12}, "limit"),
    ("primes", {"limit": 2**63}, "limit"),
    ("primes", {"limit": 10**18 + 0.5}, "limit"),
    ("burn", {"ms": 1e308}, "ms"),
    ("burn", {"ms": 10**15}, "ms"),
    ("sha256", {"data": "x", "rounds": 10**12}, "rounds"),
    ("mandelbrot", {"width": 10**9, "height": 10**9}, "width"),
    ("mandelbrot", {"width": 10, "height": 10, "max_iter": 10**12}, "max_iter"),
    ("primes", {"limit": [[[[[[[[1]]]]]]]]}, "limit"),
    ("primes", {"limit": {"$gt": 1}}, "limit"),
    ("primes", {"limit": "__import__('os').system('true')"}, "limit"),
    ("primes", {"limit": 10, "__class__": "x", "__reduce__": "y"}, "__class__"),
]


@pytest.mark.parametrize(("task", "args", "field"), ABSURD, ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(ABSURD)])
def test_absurd_arguments_are_422_naming_the_field_and_never_reach_a_worker(server, costs_nothing, task, args, field):
    started = time.monotonic()
    problem = assert_problem(post_json(f"{server.url}/v1/tasks/{task}", args, timeout=10), 422, "invalid-arguments")
    assert time.monotonic() - started < 2
    assert field in {e["field"] for e in problem["errors"]}, problem
    # The same arguments as a job and as a map item: refused before anything is stored or run.
    job = post_json(server.url + "/v1/jobs", {"task": task, "args": args}, timeout=10)
    assert field in {e["field"] for e in assert_problem(job, 422, "invalid-arguments")["errors"]}
    reply = post_json(f"{server.url}/v1/tasks/{task}/map", {"items": [args]}, timeout=10)
    assert reply.status == 200, reply.body
    (line,) = [json.loads(x) for x in reply.body.splitlines()]
    assert line["index"] == 0 and line["error"]["type"] == "/problems/invalid-arguments", line


def test_a_map_over_hostile_items_is_refused_item_by_item(server, costs_nothing):
    items = [{"limit": 10**12}, {"limit": -1}, {"limit": None}, {"limit": "1"}, {}, [], "x", None]
    reply = post_json(server.url + "/v1/tasks/primes/map", {"items": items}, timeout=10)
    assert reply.status == 200, reply.body
    lines = [json.loads(x) for x in reply.body.splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(len(items)))
    assert all(line["error"]["status"] == 422 for line in lines), lines


def test_no_client_timeout_lengthens_the_task_timeout(server_factory):
    """A call's ?timeout=, a map's and a job's `timeout` may shorten --task-timeout, never lengthen
    it: otherwise `burn` with an hour's worth of ms and timeout=3600 ties a worker up for an hour
    (the fuzzer found this: both workers busy long after the run)."""
    srv = server_factory("--workers", "1", "--task-timeout", "1")
    started = time.monotonic()
    reply = post_json(srv.url + "/v1/tasks/burn?timeout=3600", {"ms": 3_600_000}, timeout=20)
    assert "timeout of 1 s" in assert_problem(reply, 504, "task-timeout")["detail"]
    reply = post_json(srv.url + "/v1/tasks/burn/map?timeout=3600", {"items": [{"ms": 3_600_000}]}, timeout=20)
    (line,) = [json.loads(x) for x in reply.body.splitlines()]
    assert line["error"]["type"] == "/problems/task-timeout", line
    job = post_json(srv.url + "/v1/jobs", {"task": "burn", "args": {"ms": 3_600_000}, "timeout": 3600}).json()
    final = wait_for(lambda: (j := http("GET", f"{srv.url}/v1/jobs/{job['id']}").json())["status"] in (
        "succeeded", "failed", "cancelled") and j, 20, what="the job to end")
    assert final["status"] == "failed" and final["error"]["type"] == "/problems/task-timeout", final
    assert time.monotonic() - started < 30
    wait_for(lambda: all(w["state"] == "idle" for w in http("GET", srv.url + "/v1/workers").json()["workers"]),
             10, what="the worker to be idle")


# -- slow clients ---------------------------------------------------------------------------------------


def test_slow_half_open_connections_do_not_starve_real_clients(server):
    """A few hundred connections from 127.0.0.2 trickle a request head a byte at a time. Those
    within the per-client cap are closed by the head deadline (with a 408 problem); those beyond it
    are refused at once (503 too-many-connections); meanwhile a client on 127.0.0.1 is served."""
    attackers = MAX_CONNECTIONS_PER_CLIENT + 44
    opened = time.monotonic()
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(attackers):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=("127.0.0.2", 0))
            s.sendall(b"POST /v1/tasks/primes HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ)

        # The real client, while every attacker connection is still open, is answered promptly.
        for _ in range(3):
            started = time.monotonic()
            assert http("GET", server.url + "/healthz", timeout=5).status == 200
            reply = post_json(server.url + "/v1/tasks/primes", {"limit": 1000}, timeout=5)
            assert reply.status == 200 and reply.json()["result"] == 168, reply.body
            assert time.monotonic() - started < 2

        # Trickle one more byte on each open connection every so often, and collect what each gets
        # back, until every one has been answered and closed (bounded by the deadline).
        answers: dict[int, bytes] = {}
        closed: set[int] = set()
        deadline = opened + HEADER_TIMEOUT + 10
        next_trickle = time.monotonic()
        while len(closed) < attackers and time.monotonic() < deadline:
            if time.monotonic() >= next_trickle:
                for s in socks:
                    if s.fileno() not in closed:
                        with contextlib.suppress(OSError):
                            s.send(b"X")
                next_trickle = time.monotonic() + 0.5
            for key, _ in sel.select(timeout=0.1):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                answers.setdefault(s.fileno(), b"")
                try:
                    data = s.recv(65536)
                except ConnectionResetError:  # a refusal closes with the unread head pending: RST
                    data = b""
                    answers[s.fileno()] += b"<reset>"
                if data:
                    answers[s.fileno()] += data
                    continue
                sel.unregister(s)  # EOF: closed by the server
                closed.add(s.fileno())
        assert len(closed) == attackers, f"{attackers - len(closed)} slow connections still open after the deadline"
        closed_at = time.monotonic() - opened
        assert closed_at < HEADER_TIMEOUT + 10
        timed_out = [a for a in answers.values() if b"/problems/request-timeout" in a]
        # A refusal's 503 may be lost to the RST that closing with an unread head causes.
        refused = [a for a in answers.values() if b"/problems/too-many-connections" in a]
        reset = [a for a in answers.values() if a == b"<reset>"]
        assert len(timed_out) <= MAX_CONNECTIONS_PER_CLIENT, len(timed_out)
        assert refused, "no connection was refused with a 503 problem"
        assert len(timed_out) + len(refused) + len(reset) == attackers, (len(timed_out), len(refused), len(reset))
        for answer in refused[:1] + timed_out[:1]:
            assert answer.startswith((b"HTTP/1.1 503 ", b"HTTP/1.1 408 ")), answer[:100]
            assert b"Content-Type: application/problem+json" in answer
    finally:
        sel.close()
        for s in socks:
            s.close()
    # Once they are gone, 127.0.0.2 may connect again.
    assert exchange(server, head("/healthz", {}, "GET"), source="127.0.0.2").status == 200


def test_a_connection_that_sends_nothing_is_closed_after_the_head_deadline(server, costs_nothing):
    with socket.create_connection(("127.0.0.1", server.port), timeout=HEADER_TIMEOUT + 10) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed, silently: nothing was asked
        assert HEADER_TIMEOUT - 1 < time.monotonic() - started < HEADER_TIMEOUT + 5


def test_a_body_that_stops_arriving_is_408(server, costs_nothing):
    with socket.create_connection(("127.0.0.1", server.port), timeout=BODY_IDLE_TIMEOUT + 15) as sock:
        sock.sendall(head("/v1/tasks/primes", {**JSON, "Content-Length": "1000"}) + b'{"limit": 10, "pad": "')
        started = time.monotonic()
        resp = httpclient.HTTPResponse(sock, method="POST")
        resp.begin()
        reply = Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        elapsed = time.monotonic() - started
    problem = assert_problem(reply, 408, "request-timeout")
    assert "stopped arriving" in problem["detail"]
    assert BODY_IDLE_TIMEOUT - 1 < elapsed < BODY_IDLE_TIMEOUT + 5, elapsed


# -- nothing a client sends is unpickled, evaluated or imported ------------------------------------------


def test_a_pickle_or_code_in_the_body_is_just_bytes(server, costs_nothing, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Evil())
    for ctype in ("application/json", "application/x-python-pickle", "application/octet-stream"):
        reply = exchange(server, head("/v1/tasks/primes", {"Content-Type": ctype, "Content-Length": str(len(payload))})
                         + payload)
        assert reply.status in (400, 415), reply.body
    reply = post_json(server.url + "/v1/tasks/" + "os.system", {"command": "true"})
    assert_problem(reply, 404, "unknown-task")
    assert not marker.exists()


# -- the aiohttp internals service/http_protocol.py relies on ---------------------------------------------


async def test_the_aiohttp_internals_this_module_uses_are_still_there():
    """GuardedServer/GuardedRequestHandler read a few private attributes of aiohttp's Server and
    RequestHandler and override AppRunner._make_server: fail loudly if an upgrade moves them."""
    import inspect

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = http_protocol.GuardedServer(handler, handler_cancellation=True, max_headers=7)
    assert server._kwargs == {"max_headers": 7} and server._loop is not None
    protocol = server()
    assert isinstance(protocol, http_protocol.GuardedRequestHandler)
    assert protocol.max_headers == 7
    assert protocol._request_count == 0 and protocol._request_in_progress is False
    assert protocol._current_request is None and len(protocol._messages) == 0
    error_info = web_protocol._ErrInfo(status=400, exc=BadHttpMessage("x"), message="x")
    assert isinstance(error_info.exc, HttpProcessingError)  # what _fail_body_on_parse_error looks for
    assert "_make_server" in vars(web.AppRunner)
    assert inspect.iscoroutinefunction(web.AppRunner._make_server)
    params = list(inspect.signature(web.RequestHandler.handle_error).parameters)
    assert params == ["self", "request", "status", "exc", "message"]
    assert {"max_line_size", "max_field_size", "max_headers", "lingering_time", "read_bufsize", "auto_decompress",
            "keepalive_timeout"} <= set(inspect.signature(web.RequestHandler.__init__).parameters)
