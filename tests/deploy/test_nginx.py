"""deploy/nginx.conf run by the real nginx in front of programmable replicas on loopback: which
requests it resends to another replica (a 503 refusal; a connection that never carried a byte) and
which it must not (a POST that a replica took and then hung up on or sat on: the call may have run),
and that streamed responses are not buffered.

The configuration is the real file. Only what must differ on a test machine is rewritten, each by an
exact substitution that fails when its text is not found: the upstream's server (a Docker DNS name)
becomes loopback ports, the listen port a free loopback port, and the temporary files, logs and pid
go under tmp_path. A test that needs a short timeout says so and rewrites that one value."""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import ROOT, Reply, free_port, http, joined, post_json, run_in_thread, serving, wait_for

CONF = ROOT / "deploy" / "nginx.conf"
NGINX = os.environ.get("PROCBRIDGE_TEST_NGINX") or shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")

pytestmark = pytest.mark.skipif(NGINX is None,
                                reason="no nginx binary (not on PATH nor in /usr/sbin; PROCBRIDGE_TEST_NGINX unset)")

WAIT = 15.0  # bound on every wait below; nothing here should take more than a fraction of it

DRAINING = {"type": "/problems/draining", "title": "The service is shutting down", "status": 503,
            "detail": "the service is shutting down and takes no new work"}


# -- replicas: small HTTP/1.1 servers on loopback, each told how to answer -----------------------------

@dataclass
class Seen:
    method: str
    path: str
    test_id: str
    body_len: int | None  # None: answered before reading the body


class Replica:
    """One fake procbridge replica. `behaviour`:
    ok            200, the request body echoed with its content type
    draining      procbridge's 503 `draining` problem, answered before the body is read (as procbridge
                  does), the body discarded afterwards and the connection kept
    hangup        reads the whole request, then closes the connection without a word (the call may have run)
    silent        reads the whole request, then says nothing until the test ends
    late-draining reads the whole request, answers 503 `draining` only `delay` seconds later (procbridge
                  killing a call that was running when its drain's grace ran out)
    stream        200 with one event (SSE for GET, an NDJSON line for POST), then the next one only
                  once the test sets `go`
    problem       reads the whole request, answers procbridge's problem `problem` (a dict) with its status
    """

    def __init__(self, behaviour: str, delay: float = 0.0, problem: dict[str, Any] | None = None) -> None:
        self.behaviour = behaviour
        self.delay = delay
        self.problem = problem or {}
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.release = threading.Event()  # set at teardown: whatever still waits returns
        self.go = threading.Event()
        self.first_written = threading.Event()
        self.second_written = threading.Event()
        replica = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as nginx's upstream keepalive uses it

            def do_GET(self) -> None:
                replica.answer(self)

            do_POST = do_DELETE = do_GET

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def ids(self) -> list[str]:
        with self.lock:
            return [s.test_id for s in self.seen]

    def _record(self, h: BaseHTTPRequestHandler, body_len: int | None) -> None:
        with self.lock:
            self.seen.append(Seen(h.command, h.path, h.headers.get("X-Test-Id", ""), body_len))

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, ctype: str, body: bytes, **headers: str) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            h.send_header(name.replace("_", "-"), value)
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        if self.behaviour == "draining":
            self._record(h, None)
            self._send(h, 503, "application/problem+json", json.dumps(DRAINING).encode(), Retry_After="5")
            h.rfile.read(length)  # aiohttp discards an unread body after an early answer (lingering)
            return
        body = h.rfile.read(length)
        self._record(h, len(body))
        if self.behaviour == "ok":
            self._send(h, 200, h.headers.get("Content-Type", "application/octet-stream"), body)
        elif self.behaviour in ("hangup", "silent"):
            if self.behaviour == "silent":
                self.release.wait(WAIT)
            h.close_connection = True  # the handler returns without writing: the server closes the socket
        elif self.behaviour == "problem":
            self._send(h, self.problem["status"], "application/problem+json", json.dumps(self.problem).encode())
        elif self.behaviour == "late-draining":
            self.release.wait(self.delay)  # the delay is the behaviour under test, not a synchronisation
            self._send(h, 503, "application/problem+json", json.dumps(DRAINING).encode(), Retry_After="5")
        elif self.behaviour == "stream":
            sse = h.command == "GET"
            first, second = ((b"event: progress\ndata: {\"done\": 1}\n\n", b"event: result\ndata: {\"done\": 2}\n\n")
                             if sse else (b'{"item": 1}\n', b'{"item": 2}\n'))
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream" if sse else "application/x-ndjson")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            h.wfile.write(b"%x\r\n%s\r\n" % (len(first), first))
            h.wfile.flush()
            self.first_written.set()
            self.go.wait(WAIT)
            h.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(second), second))
            h.wfile.flush()
            self.second_written.set()
        else:
            raise AssertionError(f"unknown behaviour {self.behaviour}")

    def close(self) -> None:
        self.release.set()
        self.go.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def replica() -> Iterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(behaviour: str, delay: float = 0.0, problem: dict[str, Any] | None = None) -> Replica:
        made.append(Replica(behaviour, delay, problem))
        return made[-1]

    yield make
    for r in made:
        r.close()


# -- the balancer: nginx with deploy/nginx.conf --------------------------------------------------------

def substitute(text: str, old: str, new: str, count: int = 1) -> str:
    """Replace `old` exactly `count` times; fail if deploy/nginx.conf no longer has it that often."""
    found = text.count(old)
    if found != count:
        raise AssertionError(f"deploy/nginx.conf has {found} x {old!r} where the test expects {count}: "
                             "the file changed, update the test's rewrite")
    return text.replace(old, new)


def rewritten_config(conf: str, ports: list[int], listen: int, tmp: Path, overrides: dict[str, str]) -> str:
    """deploy/nginx.conf with loopback ports and tmp_path paths, plus `overrides` (old text -> new text)."""
    servers = "\n        ".join(f"server 127.0.0.1:{p};" for p in ports)
    conf = substitute(conf, "server procbridge-replica:8080 resolve;", servers)
    conf = substitute(conf, "listen 8080;", f"listen 127.0.0.1:{listen};")
    built = subprocess.run([str(NGINX), "-V"], capture_output=True, text=True, check=True).stderr
    kinds = [k for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi") if f"--without-http_{k}_" not in built]
    test_only = [f"{kind}_temp_path {tmp / kind};" for kind in kinds]  # nginx creates them all at start-up
    test_only.append("log_format test '$request_method $uri $status id=$http_x_test_id up=[$upstream_addr] "
                     "st=[$upstream_status] sent=[$upstream_bytes_sent]';")
    test_only.append(f"access_log {tmp / 'access.log'} test;")
    conf = substitute(conf, "http {\n", "http {\n" + "".join(f"    {line}\n" for line in test_only))
    for old, new in overrides.items():
        count = conf.count(old)
        conf = substitute(conf, old, new, count=max(count, 1))
    return conf


@dataclass
class Balancer:
    url: str
    proc: subprocess.Popen[bytes]
    folder: Path
    children: list[psutil.Process] = field(default_factory=list)

    def error_log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> str:
        path = self.folder / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Fast shutdown (SIGTERM to the master), then make sure no worker is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(WAIT)
        _, alive = psutil.wait_procs(self.children, timeout=WAIT)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        assert not alive, f"nginx workers outlived their master: {[p.pid for p in alive]}"


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[Callable[..., Balancer]]:
    """Start nginx with deploy/nginx.conf over the given replica ports; stopped when the test ends."""
    started: list[Balancer] = []

    def start(ports: list[int], overrides: dict[str, str] | None = None) -> Balancer:
        folder = tmp_path / f"nginx{len(started)}"
        folder.mkdir()
        listen = free_port()
        conf_path = folder / "nginx.conf"
        conf_path.write_text(rewritten_config(CONF.read_text(), ports, listen, folder, overrides or {}))
        main = [f"pid {folder / 'nginx.pid'};", f"error_log {folder / 'error.log'} info;", "daemon off;"]
        if os.geteuid() == 0:  # workers would otherwise run as nobody, who cannot write under tmp_path
            main.append(f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};")
        with open(folder / "stderr.log", "wb") as out:
            proc = subprocess.Popen([str(NGINX), "-p", f"{folder}/", "-c", str(conf_path), "-g", " ".join(main)],
                                    stdout=out, stderr=subprocess.STDOUT)
        lb = Balancer(f"http://127.0.0.1:{listen}", proc, folder)
        started.append(lb)

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited with {proc.returncode}:\n{(folder / 'stderr.log').read_text()}"
                                     f"\n{lb.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
            except OSError:
                return False
            return True

        wait_for(listening, WAIT, 0.02, "nginx to listen")
        lb.children = wait_for(lambda: psutil.Process(proc.pid).children(), WAIT, 0.02, "nginx's workers")
        return lb

    yield start
    for lb in started:
        lb.stop()


def post(lb: Balancer, test_id: str, body: bytes, ctype: str = "application/json") -> Reply:
    return http("POST", lb.url + "/v1/tasks/echo", body, {"Content-Type": ctype, "X-Test-Id": test_id}, timeout=WAIT)


def get(lb: Balancer, test_id: str) -> Reply:
    return http("GET", lb.url + "/v1/jobs/j1", None, {"X-Test-Id": test_id}, timeout=WAIT)


def dead_port() -> int:
    """A loopback port nobody listens on: connections to it are refused."""
    return free_port()


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A loopback port where connections time out, as they do to a replica that is gone (its address
    still in the neighbour cache): a listener with an accept queue of 1 that is full and never drained,
    so the kernel drops every further SYN."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT):
            probe = socket.socket()
            probe.settimeout(0.5)
            with probe, pytest.raises(TimeoutError):  # the queue is full: a connection now times out
                probe.connect(("127.0.0.1", port))
            yield port


# -- POST: resent after a 503, and only when the call cannot have run ---------------------------------

BODIES = {
    "json": (b'{"limit": 1000, "note": "\\u00e9t\\u00e9"}', "application/json"),
    "4MiB-binary": (os.urandom(4 * 1024 * 1024), "application/octet-stream"),
}


@pytest.mark.parametrize("kind", BODIES)
def test_a_post_refused_by_draining_replicas_is_resent_and_gets_200_with_its_body_intact(replica, balancer, kind):
    body, ctype = BODIES[kind]
    draining = [replica("draining"), replica("draining")]
    ok = replica("ok")
    lb = balancer([draining[0].port, draining[1].port, ok.port])
    ids = [f"{kind}-{i}" for i in range(9)]
    for test_id in ids:
        reply = post(lb, test_id, body, ctype)
        assert reply.status == 200, (test_id, reply.status, reply.body[:300], lb.access_log())
        assert reply.body == body, f"{test_id}: the body came back changed ({len(reply.body)} bytes)"
    refused = draining[0].ids + draining[1].ids
    assert refused, f"no POST met a draining replica; round robin should have sent some there\n{lb.access_log()}"
    assert ok.ids == ids  # each call reached the live replica exactly once, those refused included
    assert all(s.body_len == len(body) for s in ok.seen)


def test_a_post_refused_by_every_replica_gets_the_last_refusal_with_its_retry_after(replica, balancer):
    draining = [replica("draining"), replica("draining")]
    lb = balancer([r.port for r in draining])
    reply = post(lb, "all-draining", b'{"limit": 10}')
    assert reply.status == 503, reply.body
    assert reply.json() == DRAINING  # procbridge's own problem, not nginx's error page
    assert reply.headers.get("retry-after") == "5"
    assert [r.ids for r in draining] == [["all-draining"], ["all-draining"]]  # each replica asked once


def test_a_post_whose_replica_took_it_and_hung_up_is_not_resent(replica, balancer):
    hangup, ok = replica("hangup"), replica("ok")
    lb = balancer([hangup.port, ok.port])
    replies = {f"p{i}": post(lb, f"p{i}", b'{"limit": 10}') for i in range(6)}
    assert len(hangup.ids) == 1, f"one POST should have gone to the replica that hangs up\n{lb.access_log()}"
    lost = hangup.ids[0]
    assert replies[lost].status == 502, (replies[lost].status, replies[lost].body)
    assert lost not in ok.ids, "a POST the replica may have run was sent again"
    assert sorted(ok.ids) == sorted(set(replies) - {lost})
    assert all(r.status == 200 for i, r in replies.items() if i != lost)


def test_a_post_whose_replica_said_nothing_past_the_read_timeout_is_not_resent(replica, balancer):
    silent, ok = replica("silent"), replica("ok")
    # The only rewrite of a value: an hour of proxy_read_timeout becomes 1 s.
    lb = balancer([silent.port, ok.port], {"proxy_read_timeout 3600s;": "proxy_read_timeout 1s;"})
    replies = {f"p{i}": post(lb, f"p{i}", b'{"limit": 10}') for i in range(4)}
    assert len(silent.ids) == 1, lb.access_log()
    lost = silent.ids[0]
    assert replies[lost].status == 504, (replies[lost].status, replies[lost].body)
    assert lost not in ok.ids, "a POST the replica may have run was sent again"
    assert all(r.status == 200 for i, r in replies.items() if i != lost)


def test_a_503_that_comes_after_the_resend_window_is_passed_on_not_resent(replica, balancer):
    """procbridge also answers 503 `draining` to a call it killed when its drain's grace ran out: that call
    ran. Such a 503 comes at least the grace (25 s in compose) after the request; nginx resends a 503 only
    within proxy_next_upstream_timeout of it (10 s, rewritten here to 1 s)."""
    late, ok = replica("late-draining", delay=1.5), replica("ok")
    lb = balancer([late.port, ok.port], {"proxy_next_upstream_timeout 10s;": "proxy_next_upstream_timeout 1s;"})
    replies = {f"p{i}": post(lb, f"p{i}", b'{"limit": 10}') for i in range(2)}  # round robin: one each
    assert late.ids, lb.access_log()
    for lost in late.ids:  # a 503 passed on does not count as a failed try: round robin may come back
        assert replies[lost].status == 503 and replies[lost].json() == DRAINING
        assert lost not in ok.ids, "a call that ran until the grace ended was run again"
    assert sorted(ok.ids + late.ids) == sorted(replies)


def test_a_post_to_a_port_nobody_listens_on_is_resent_to_a_live_replica(replica, balancer):
    ok, dead = replica("ok"), dead_port()
    lb = balancer([dead, ok.port])
    ids = [f"p{i}" for i in range(9)]
    for test_id in ids:
        reply = post(lb, test_id, b'{"limit": 10}')
        assert reply.status == 200, (test_id, reply.status, reply.body[:300], lb.access_log())
    assert ok.ids == ids
    assert f"127.0.0.1:{dead}" in lb.access_log(), f"no POST was sent to the dead port\n{lb.access_log()}"


def test_a_post_to_a_port_nobody_listens_on_after_a_draining_replica_is_resent(replica, balancer):
    draining, ok, dead = replica("draining"), replica("ok"), dead_port()
    lb = balancer([draining.port, dead, ok.port])
    ids = [f"p{i}" for i in range(9)]
    for test_id in ids:
        reply = post(lb, test_id, b'{"limit": 10}')
        assert reply.status == 200, (test_id, reply.status, reply.body[:300], lb.access_log())
    assert ok.ids == ids
    assert draining.ids, lb.access_log()
    assert f"127.0.0.1:{dead}" in lb.access_log(), f"no POST was sent to the dead port\n{lb.access_log()}"


def test_a_post_whose_connection_timed_out_is_resent_to_a_live_replica(replica, balancer, blackhole):
    ok = replica("ok")
    # The only rewrite of a value: proxy_connect_timeout 5 s becomes 1 s.
    lb = balancer([blackhole, ok.port], {"proxy_connect_timeout 5s;": "proxy_connect_timeout 1s;"})
    ids = [f"p{i}" for i in range(4)]
    for test_id in ids:
        reply = post(lb, test_id, b'{"limit": 10}')
        assert reply.status == 200, (test_id, reply.status, reply.body[:300], lb.access_log())
    assert ok.ids == ids
    assert f"127.0.0.1:{blackhole}" in lb.access_log(), f"no POST was sent to the silent port\n{lb.access_log()}"


@pytest.mark.parametrize("problem", [
    {"type": "/problems/worker-crashed", "title": "The worker died", "status": 502, "detail": "killed by SIGKILL"},
    {"type": "/problems/task-timeout", "title": "The task ran past its timeout", "status": 504, "detail": "0.5 s"},
], ids=["502-worker-crashed", "504-task-timeout"])
def test_procbridge_own_502_and_504_reach_the_client_unchanged_and_are_not_resent(replica, balancer, problem):
    failing, ok = replica("problem", problem=problem), replica("ok")
    lb = balancer([failing.port, ok.port])
    replies = {f"p{i}": post(lb, f"p{i}", b'{"limit": 10}') for i in range(4)}
    assert failing.ids, lb.access_log()
    for ran in failing.ids:  # the call ran there: its answer is the answer
        assert replies[ran].status == problem["status"] and replies[ran].json() == problem
        assert ran not in ok.ids
    assert sorted(ok.ids + failing.ids) == sorted(replies)


# -- GET: resent after a 503 and after a replica fails -------------------------------------------------

@pytest.mark.parametrize("failing", ["draining", "hangup"])
def test_a_get_whose_replica_is_draining_or_hung_up_is_resent(replica, balancer, failing):
    bad, ok = replica(failing), replica("ok")
    lb = balancer([bad.port, ok.port])
    ids = [f"g{i}" for i in range(4)]
    assert [get(lb, i).status for i in ids] == [200] * 4, lb.access_log()
    assert bad.ids, lb.access_log()
    assert ok.ids == ids


# -- streams are not buffered ---------------------------------------------------------------------------

def read_until(sock: socket.socket, data: bytearray, marker: bytes, what: str) -> None:
    """Receive into `data` until `marker` is in it; the socket's timeout bounds each receive."""
    while marker not in data:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"{what}: not received within {WAIT} s (got {bytes(data)!r})") from None
        if not chunk:
            raise AssertionError(f"{what}: the connection closed first (got {bytes(data)!r})")
        data += chunk


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["sse-GET", "ndjson-POST"])
def test_a_streamed_response_reaches_the_client_event_by_event(replica, balancer, method):
    stream = replica("stream")
    lb = balancer([stream.port])
    port = int(lb.url.rsplit(":", 1)[1])
    body = b'{"items": [1, 2]}' if method == "POST" else b""
    head = (f"{method} /v1/jobs/j1/events HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    first, second = ((b'data: {"done": 1}', b'data: {"done": 2}') if method == "GET"
                     else (b'{"item": 1}', b'{"item": 2}'))
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(head + body)
        data = bytearray()
        read_until(sock, data, first, "the first event")
        assert not stream.second_written.is_set()  # the replica is still holding the second one back
        assert b" 200 " in data.split(b"\r\n", 1)[0]
        stream.go.set()
        read_until(sock, data, second, "the second event")


# -- the scenario with real procbridge replicas --------------------------------------------------

def test_posts_through_the_balancer_all_succeed_while_a_real_replica_drains(tmp_path, balancer):
    """Two real procbridge servers; one drains (SIGTERM while a long call holds its drain open): every POST
    through nginx, JSON or a 4 MiB binary body, is answered 200 by the other."""
    with serving(tmp_path / "a", "--workers", "1", "--shutdown-grace", "60") as a, \
            serving(tmp_path / "b", "--workers", "1") as b:
        lb = balancer([a.port, b.port])
        holding = run_in_thread(post_json, a.url + "/v1/tasks/burn", {"ms": 60_000}, 90)
        wait_for(lambda: any(w["state"] == "busy" for w in http("GET", a.url + "/v1/workers").json()["workers"]),
                 WAIT, what="the long call to run on replica a")
        a.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: http("GET", a.url + "/readyz", timeout=5).status == 503, WAIT, what="replica a to drain")
        blob = os.urandom(4 * 1024 * 1024)
        for i in range(9):  # the first goes to replica a (round robin starts with the first server): a 4 MiB body
            if i % 2 == 0:
                reply = http("POST", lb.url + "/v1/tasks/sha256", blob, {"Content-Type": "application/octet-stream"},
                             timeout=WAIT)
                assert reply.status == 200, (i, reply.status, reply.body[:300], lb.access_log())
                assert reply.json()["result"] == hashlib.sha256(blob).hexdigest()
            else:
                reply = post_json(lb.url + "/v1/tasks/primes", {"limit": 100}, timeout=WAIT)
                assert reply.status == 200, (i, reply.status, reply.body[:300], lb.access_log())
                assert reply.json()["result"] == 25
        met = wait_for(lambda: [line for line in lb.access_log().splitlines() if "st=[503, 200]" in line], WAIT,
                       what="a POST that met the draining replica, in nginx's access log")
        assert any("/v1/tasks/sha256" in line for line in met), lb.access_log()  # procbridge refused a large body
        a.proc.send_signal(signal.SIGINT)  # a second signal ends the grace: the long call is cut
        assert joined(*holding, timeout=WAIT).status == 503
        assert a.proc.wait(WAIT) == 0
        assert b.proc.poll() is None
