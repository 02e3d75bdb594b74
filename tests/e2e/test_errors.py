"""Every error path of docs/api.md, with the real bytes on the wire (http.client or a raw socket, so
nothing in between tidies a malformed request up), each answered as problem+json; and a server that
takes a barrage of all of them still answers with the same workers."""

from __future__ import annotations

import contextlib
import hashlib
import http.client as httpclient
import json
import socket
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Reply, ServerProcess, http, post_json, serving, wait_for

JSON = {"Content-Type": "application/json"}
OCTET = {"Content-Type": "application/octet-stream"}

TASKS_MODULE = "pb_e2e_error_tasks"
TASKS_SOURCE = '''
import os
import signal
from typing import Literal

from workers import task


class Boom(Exception):
    """A user-defined exception type."""


@task
def fail(message: str) -> None:
    """Raise ValueError(message)."""
    raise ValueError(message)


@task
def fail_custom(code: int) -> None:
    raise Boom(f"custom failure {code}")


@task
def exit_worker(code: int = 3) -> None:
    """SystemExit inside a task is an outcome, not the worker's end."""
    raise SystemExit(code)


@task
def interrupt() -> None:
    raise KeyboardInterrupt("stop!")


@task
def unserialisable() -> object:
    return {1, 2, 3}


@task
def crash() -> None:
    """Kill the worker process itself, as a segfault in an extension would."""
    os.kill(os.getpid(), signal.SIGKILL)


@task
def shaped(items: list[int], mode: Literal["fast", "slow"] = "fast", ratio: float = 0.5) -> int:
    return len(items)
'''


def write_tasks_module(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TASKS_MODULE}.py").write_text(textwrap.dedent(TASKS_SOURCE))
    return folder


@contextlib.contextmanager
def running_server(folder: Path, *args: str) -> Iterator[ServerProcess]:
    modules = write_tasks_module(folder / "modules")
    with serving(folder, "--workers", "2", "--tasks", TASKS_MODULE, *args, env={"PYTHONPATH": str(modules)}) as srv:
        yield srv


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("errors")) as srv:
        yield srv


def raw_post(server: ServerProcess, path: str, body: bytes, headers: dict[str, str]) -> Reply:
    """POST exactly these bytes and headers (http.client adds only Host, Accept-Encoding and
    Content-Length; no default Content-Type)."""
    conn = httpclient.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def raw_exchange(server: ServerProcess, request: bytes) -> Reply:
    """Send a hand-written HTTP request on a plain socket and parse the one response."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request)
        resp = httpclient.HTTPResponse(sock, method="POST")
        resp.begin()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())


def assert_problem(reply: Reply, status: int, slug: str) -> dict[str, Any]:
    """The reply is an RFC 9457 problem of this status and slug; return its body."""
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"].split(";")[0] == "application/problem+json", reply.headers
    problem = json.loads(reply.body)
    assert problem["type"] == f"/problems/{slug}", problem
    assert problem["status"] == status
    assert isinstance(problem["title"], str) and problem["title"]
    assert isinstance(problem["detail"], str) and problem["detail"]
    return problem


def worker_table(server: ServerProcess) -> list[dict[str, Any]]:
    return http("GET", server.url + "/v1/workers").json()["workers"]


# -- 400 invalid-json -----------------------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
INVALID_JSON = {
    "truncated": b'{"limit": 10',
    "truncated-string": b'{"limit": 10, "x": "abc',
    "invalid-utf8": b'{"limit": 10, "x": "\xff\xfe\xc3"}',
    "lone-surrogate-escape": b'{"limit": 10, "x": "\\ud800"}',
    "nan-literal": b'{"limit": NaN}',
    "infinity-literal": b'{"limit": Infinity}',
    "single-quotes": b"{'limit': 10}",
    "trailing-comma": b'{"limit": 10,}',
    "trailing-garbage": b'{"limit": 10} x',
    "two-objects": b'{"limit": 10}{"limit": 11}',
    "nul-byte": b'{"limit": 10}\x00',
    "utf8-bom": b'\xef\xbb\xbf{"limit": 10}',
    "deeply-nested-array": DEEP,
    "deeply-nested-object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "array": b"[]",
    "array-of-object": b'[{"limit": 10}]',
    "null": b"null",
    "number": b"42",
    "string": b'"limit"',
    "true": b"true",
    "empty": b"",
    "whitespace-only": b" \r\n\t ",
}


@pytest.mark.parametrize("name", INVALID_JSON)
def test_invalid_json_is_400(server, name):
    problem = assert_problem(raw_post(server, "/v1/tasks/primes", INVALID_JSON[name], JSON), 400, "invalid-json")
    assert "Traceback" not in problem["detail"]


def test_not_an_object_says_what_it_got(server):
    assert "array" in assert_problem(raw_post(server, "/v1/tasks/primes", b"[1]", JSON), 400, "invalid-json")["detail"]
    assert "null" in assert_problem(raw_post(server, "/v1/tasks/primes", b"null", JSON), 400, "invalid-json")["detail"]


# -- 404 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nope", "Primes", "primes2", "__init__", "%2e%2e", "..%2fhealthz"])
def test_unknown_task_is_404(server, name):
    problem = assert_problem(post_json(f"{server.url}/v1/tasks/{name}", {"limit": 1}), 404, "unknown-task")
    assert "/v1/tasks" in problem["detail"]


def test_unknown_task_wins_over_a_bad_body(server):
    assert_problem(raw_post(server, "/v1/tasks/nope", b"{bad", JSON), 404, "unknown-task")


def test_other_http_errors_are_problems_too(server):
    assert_problem(http("GET", server.url + "/no/such/path"), 404, "not-found")
    reply = http("PUT", server.url + "/v1/tasks/primes")  # GET answers the task's entry
    assert_problem(reply, 405, "method-not-allowed")
    assert "POST" in reply.headers["allow"]


# -- 422 invalid-arguments ------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ("primes", {"limit": "10"}, "limit"),  # a string for an int
    ("primes", {"limit": 10.5}, "limit"),
    ("primes", {"limit": 10.0}, "limit"),  # strict: a float is not an int
    ("primes", {"limit": True}, "limit"),  # a bool is not an int
    ("primes", {"limit": None}, "limit"),
    ("primes", {"limit": [10]}, "limit"),
    ("primes", {}, "limit"),  # missing
    ("primes", {"limit": 10, "extra": 1}, "extra"),  # unknown
    ("primes", {"limit": 10**12}, "limit"),  # above 10^8
    ("primes", {"limit": 10**8 + 1}, "limit"),
    ("primes", {"limit": -1}, "limit"),
    ("primes", {"limit": 10**30}, "limit"),  # beyond 64 bits
    ("burn", {"ms": -1}, "ms"),
    ("burn", {"ms": 3_600_001}, "ms"),
    ("burn", {"ms": "5"}, "ms"),
    ("burn", {"ms": False}, "ms"),
    ("sha256", {"data": 123}, "data"),
    ("sha256", {"data": None}, "data"),
    ("sha256", {"rounds": 2}, "data"),
    ("sha256", {"data": "x", "rounds": 0}, "rounds"),
    ("sha256", {"data": "x", "rounds": 10**6 + 1}, "rounds"),
    ("sha256", {"data": "x", "rounds": 1.5}, "rounds"),
    ("mandelbrot", {"width": 0, "height": 10}, "width"),
    ("mandelbrot", {"width": 10}, "height"),
    ("mandelbrot", {"width": 10, "height": 4097}, "height"),
    ("mandelbrot", {"width": 10, "height": 10, "zoom": 0}, "zoom"),
    ("mandelbrot", {"width": 10, "height": 10, "x": "left"}, "x"),
    ("shaped", {"items": ["a"]}, "items.0"),
    ("shaped", {"items": 5}, "items"),
    ("shaped", {"items": [1], "mode": "medium"}, "mode"),
    ("shaped", {"items": [1], "ratio": "half"}, "ratio"),
]


@pytest.mark.parametrize(("task", "args", "field"), BAD_ARGUMENTS, ids=[f"{t}-{f}-{i}" for i, (t, _, f) in
                                                                          enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_are_422_naming_the_field(server, task, args, field):
    problem = assert_problem(post_json(f"{server.url}/v1/tasks/{task}", args), 422, "invalid-arguments")
    assert problem["detail"].startswith(f"{field}:") or f"; {field}:" in problem["detail"], problem
    assert field in {e["field"] for e in problem["errors"]}


def test_every_bad_argument_is_named(server):
    problem = assert_problem(
        post_json(server.url + "/v1/tasks/mandelbrot", {"width": -1, "height": "x", "bogus": 1}),
        422, "invalid-arguments",
    )
    assert {e["field"] for e in problem["errors"]} == {"width", "height", "bogus"}
    for field in ("width", "height", "bogus"):
        assert field in problem["detail"]


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/tasks/sha256?rounds=abc", "rounds"),
        ("/v1/tasks/sha256?rounds=0", "rounds"),
        ("/v1/tasks/sha256?rounds=1.5", "rounds"),
        ("/v1/tasks/sha256?rounds=1000001", "rounds"),
        ("/v1/tasks/sha256?colour=red", "colour"),
        ("/v1/tasks/sha256?data=abc", "data"),
        ("/v1/tasks/sha256?timeout=0", "timeout"),
        ("/v1/tasks/sha256?timeout=-1", "timeout"),
        ("/v1/tasks/sha256?timeout=nan", "timeout"),
        ("/v1/tasks/sha256?timeout=inf", "timeout"),
        ("/v1/tasks/sha256?timeout=soon", "timeout"),
    ],
)
def test_bad_query_arguments_of_a_binary_call_are_422(server, path, field):
    problem = assert_problem(raw_post(server, path, b"payload", OCTET), 422, "invalid-arguments")
    assert problem["detail"].startswith(f"{field}:"), problem


def test_query_arguments_with_a_json_body_are_422(server):
    problem = assert_problem(raw_post(server, "/v1/tasks/primes?limit=5", b'{"limit": 5}', JSON),
                             422, "invalid-arguments")
    assert problem["detail"].startswith("limit:")
    problem = assert_problem(raw_post(server, "/v1/tasks/primes?timeout=-3", b'{"limit": 5}', JSON),
                             422, "invalid-arguments")
    assert problem["detail"].startswith("timeout:")


# -- 415 unsupported-media-type -------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},  # no Content-Type at all
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "multipart/form-data; boundary=x"},
        {"Content-Type": "text/json"},
        {"Content-Type": "application/xml"},
        {"Content-Type": "garbage"},
        {"Content-Type": ""},
    ],
    ids=["none", "text", "form", "multipart", "text-json", "xml", "garbage", "empty"],
)
def test_wrong_or_missing_content_type_is_415(server, headers):
    assert_problem(raw_post(server, "/v1/tasks/primes", b'{"limit": 10}', headers), 415, "unsupported-media-type")


@pytest.mark.parametrize("task", ["primes", "burn", "mandelbrot"])
def test_binary_body_for_a_task_without_a_bytes_parameter_is_415(server, task):
    problem = assert_problem(raw_post(server, f"/v1/tasks/{task}", b"\x00\x01", OCTET), 415, "unsupported-media-type")
    assert "application/json" in problem["detail"]


def test_json_content_type_variants_are_accepted(server):
    for ctype in ("application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.api+json"):
        reply = raw_post(server, "/v1/tasks/primes", b'{"limit": 10}', {"Content-Type": ctype})
        assert reply.status == 200, (ctype, reply.body)
        assert json.loads(reply.body)["result"] == 4


# -- 500 task-failed ------------------------------------------------------------------------------


def test_a_task_that_raises_is_500_with_type_and_message_and_no_traceback(server):
    reply = post_json(server.url + "/v1/tasks/fail", {"message": "the answer was 41"})
    problem = assert_problem(reply, 500, "task-failed")
    assert "ValueError" in problem["detail"]
    assert "the answer was 41" in problem["detail"]
    assert "traceback" not in problem
    assert b"Traceback" not in reply.body
    assert TASKS_MODULE + ".py" not in reply.body.decode()  # no source paths either

    custom = assert_problem(post_json(server.url + "/v1/tasks/fail_custom", {"code": 7}), 500, "task-failed")
    assert "Boom" in custom["detail"] and "custom failure 7" in custom["detail"]
    assert "traceback" not in custom


@pytest.mark.parametrize(
    ("task", "args", "words"),
    [
        ("exit_worker", {"code": 3}, ["SystemExit", "3"]),
        ("interrupt", {}, ["KeyboardInterrupt", "stop!"]),
        ("unserialisable", {}, ["TypeError"]),
    ],
)
def test_base_exceptions_and_bad_results_are_task_failed(server, task, args, words):
    before = {w["pid"] for w in worker_table(server)}
    problem = assert_problem(post_json(f"{server.url}/v1/tasks/{task}", args), 500, "task-failed")
    for word in words:
        assert word in problem["detail"], problem
    assert {w["pid"] for w in worker_table(server)} == before  # the worker lived on


def test_debug_adds_the_traceback(tmp_path):
    with running_server(tmp_path, "--debug") as srv:
        problem = assert_problem(post_json(srv.url + "/v1/tasks/fail", {"message": "debug me"}), 500, "task-failed")
        assert "ValueError: debug me" in problem["detail"]
        assert "Traceback" in problem["traceback"]
        assert "debug me" in problem["traceback"]
        assert "fail" in problem["traceback"]


# -- 413 payload-too-large ------------------------------------------------------------------------

LIMIT = 1024


@pytest.fixture
def small_server(server_factory) -> ServerProcess:
    return server_factory("--workers", "1", "--max-body", str(LIMIT))


def head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def test_bodies_over_max_body_are_413(small_server):
    srv = small_server
    # Declared too large: refused from the header alone (no body is ever sent).
    reply = raw_exchange(srv, head("/v1/tasks/sha256", {**OCTET, "Content-Length": str(10**9)}))
    problem = assert_problem(reply, 413, "payload-too-large")
    assert str(LIMIT) in problem["detail"]
    # Declared and sent, one byte over.
    body = b"a" * (LIMIT + 1)
    assert_problem(raw_post(srv, "/v1/tasks/sha256", body, OCTET), 413, "payload-too-large")
    # A JSON body over the limit.
    assert_problem(post_json(srv.url + "/v1/tasks/sha256", {"data": "x" * LIMIT}), 413, "payload-too-large")
    # Chunked, so no length is declared: counted while it is read.
    parts = [b"b" * 400] * 4
    request = head("/v1/tasks/sha256", {**OCTET, "Transfer-Encoding": "chunked"}) + chunked(parts)
    assert_problem(raw_exchange(srv, request), 413, "payload-too-large")
    request = head("/v1/tasks/primes", {**JSON, "Transfer-Encoding": "chunked"}) + chunked(
        [b'{"limit": 10, "pad": "', b" " * 1500, b'"}'])
    assert_problem(raw_exchange(srv, request), 413, "payload-too-large")

    # At the limit, both ways, the call goes through.
    exact = bytes(range(256)) * (LIMIT // 256)
    reply = raw_post(srv, "/v1/tasks/sha256", exact, OCTET)
    assert reply.status == 200, reply.body
    assert json.loads(reply.body)["result"] == hashlib.sha256(exact).hexdigest()
    reply = raw_exchange(srv, head("/v1/tasks/sha256", {**OCTET, "Transfer-Encoding": "chunked"})
                         + chunked([exact[:500], exact[500:]]))
    assert reply.status == 200, reply.body
    assert json.loads(reply.body)["result"] == hashlib.sha256(exact).hexdigest()
    assert http("GET", srv.url + "/healthz").status == 200


# -- 502, 503, 504: the pool's own refusals and failures (each on a server of its own) ---------------


@pytest.fixture
def pool_server(server_factory, tmp_path) -> Any:
    modules = write_tasks_module(tmp_path / "modules")

    def start(*args: str) -> ServerProcess:
        return server_factory("--tasks", TASKS_MODULE, *args, env={"PYTHONPATH": str(modules)})

    return start


def restarts(srv: ServerProcess, reason: str) -> float | None:
    for family in text_string_to_metric_families(http("GET", srv.url + "/metrics").body.decode()):
        for s in family.samples:
            if s.name == "procbridge_worker_restarts_total" and s.labels.get("reason") == reason:
                return float(s.value)
    return None


def test_a_worker_that_dies_is_502_and_is_replaced(pool_server):
    srv = pool_server("--workers", "1")
    (old,) = {w["pid"] for w in worker_table(srv)}
    problem = assert_problem(post_json(srv.url + "/v1/tasks/crash", {}), 502, "worker-crashed")
    assert str(old) in problem["detail"]
    assert "SIGKILL" in problem["detail"]
    wait_for(lambda: restarts(srv, "crashed") == 1, 20, what="the crash to be counted")
    reply = post_json(srv.url + "/v1/tasks/primes", {"limit": 100})
    assert reply.status == 200, reply.body
    assert reply.json()["result"] == 25
    assert reply.json()["worker"] != old
    assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE


def test_a_task_past_its_timeout_is_504_and_its_worker_replaced(pool_server):
    srv = pool_server("--workers", "1", "--task-timeout", "1")
    (old,) = {w["pid"] for w in worker_table(srv)}
    problem = assert_problem(post_json(srv.url + "/v1/tasks/burn", {"ms": 30_000}), 504, "task-timeout")
    assert "timeout of 1 s" in problem["detail"]
    # ?timeout= shortens --task-timeout for one call...
    assert_problem(post_json(srv.url + "/v1/tasks/burn?timeout=0.2", {"ms": 30_000}), 504, "task-timeout")
    # ... but never lengthens it: no client ties a worker up for longer than the operator allows.
    started = time.monotonic()
    problem = assert_problem(post_json(srv.url + "/v1/tasks/burn?timeout=3600", {"ms": 30_000}), 504, "task-timeout")
    assert "timeout of 1 s" in problem["detail"]
    assert time.monotonic() - started < 10
    reply = post_json(srv.url + "/v1/tasks/burn?timeout=20", {"ms": 300})
    assert reply.status == 200, reply.body
    assert reply.json()["worker"] != old
    assert restarts(srv, "timeout") == 3


def test_a_full_admission_queue_is_503_overloaded(pool_server):
    srv = pool_server("--workers", "1", "--max-pending", "1")
    running = ThreadPoolExecutor(2)
    try:
        first = running.submit(post_json, srv.url + "/v1/tasks/burn", {"ms": 2500})
        wait_for(lambda: any(w["state"] == "busy" for w in worker_table(srv)), 10, what="the worker to be busy")
        second = running.submit(post_json, srv.url + "/v1/tasks/primes", {"limit": 10})

        def queued() -> bool:
            metrics = http("GET", srv.url + "/metrics").body.decode()
            return any(
                s.name == "procbridge_pending_tasks" and s.value == 1
                for f in text_string_to_metric_families(metrics) for s in f.samples
            )

        wait_for(queued, 10, what="one call to be waiting")
        reply = post_json(srv.url + "/v1/tasks/primes", {"limit": 10})
        assert_problem(reply, 503, "overloaded")
        assert int(reply.headers["retry-after"]) >= 1
        # A binary call is refused the same way, before its body is read.
        assert_problem(raw_post(srv, "/v1/tasks/sha256", b"x" * 100_000, OCTET), 503, "overloaded")
        assert first.result(30).status == 200
        assert second.result(30).json()["result"] == 4
    finally:
        running.shutdown(wait=True)
    assert post_json(srv.url + "/v1/tasks/primes", {"limit": 10}).status == 200


# -- after all of it ------------------------------------------------------------------------------


def test_the_server_and_its_workers_survive_a_barrage_of_bad_requests(tmp_path_factory):
    """Self-contained (its own server, its own barrage, whatever ran before): every kind of bad input
    above, sent in one go, costs no worker, no loop and no later call."""
    with running_server(tmp_path_factory.mktemp("barrage")) as server:
        pids = {w["pid"] for w in worker_table(server)}
        assert len(pids) == 2
        json_headers = {"Content-Type": "application/json"}
        for body in INVALID_JSON.values():
            assert raw_post(server, "/v1/tasks/primes", body, json_headers).status == 400
        for task, args in (("primes", {"limit": "x"}), ("primes", {}), ("nope", {"limit": 1})):
            assert post_json(f"{server.url}/v1/tasks/{task}", args).status in (404, 422)
        assert raw_post(server, "/v1/tasks/primes", b"limit=1", {"Content-Type": "text/plain"}).status == 415
        for task, args in (("fail_custom", {"code": 7}), ("exit_worker", {"code": 3}), ("interrupt", {}),
                           ("unserialisable", {})):
            assert post_json(f"{server.url}/v1/tasks/{task}", args).status == 500
        bad_length = b"POST /v1/tasks/primes HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n"
        assert raw_exchange(server, bad_length).status == 400
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:  # garbage, then hang up
            sock.sendall(b"\x00\xff GARBAGE \r\n\r\n" * 50)
        # What survived: the same workers, probes, and correct answers.
        assert {w["pid"] for w in worker_table(server)} == pids
        assert http("GET", server.url + "/healthz").json() == {"status": "ok"}
        assert http("GET", server.url + "/readyz").status == 200
        for n, count in ((10, 4), (1000, 168)):
            reply = post_json(server.url + "/v1/tasks/primes", {"limit": n})
            assert reply.status == 200, reply.body
            assert reply.json()["result"] == count
            assert reply.json()["worker"] in pids
        assert post_json(server.url + "/v1/tasks/shaped", {"items": [1, 2, 3], "mode": "slow"}).json()["result"] == 3
        # No worker was ever replaced: every failure above was contained in the call that caused it.
        metrics = http("GET", server.url + "/metrics").body.decode()
        restarts = [
            s.value for f in text_string_to_metric_families(metrics) if f.name == "procbridge_worker_restarts"
            for s in f.samples
        ]
        assert restarts and all(v == 0 for v in restarts)
        assert server.proc.poll() is None
        assert server.stop() == 0
        assert server.leftovers() == []
