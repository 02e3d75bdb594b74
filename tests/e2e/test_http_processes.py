"""`--http-processes N` through real servers: N serving processes on one port in front of one core
(service/serving.py, service/front.py). Calls through both are correct and run on every worker, the
core's /metrics and /v1/workers describe the whole service whichever process answers, there is one
admission limit and one rate limit for the whole service, jobs run once and their streams pass
through, a SIGKILLed serving process is replaced with no later call lost, and SIGTERM drains all.

Which serving process a connection lands on is the kernel's choice (SO_REUSEPORT hashes each new
connection), so the tests open many connections and check, with psutil, that each serving process
holds some of them before relying on both being used.
"""

from __future__ import annotations

import http.client as httpclient
import json
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import ServerProcess, http, metric, post_json, serving, start_server, wait_for
from tests.e2e.test_jobs import sse_events, submit, wait_final


def count_primes(limit: int) -> int:
    """The expected answer, computed here by trial division (not the task's sieve)."""
    return sum(1 for n in range(2, limit + 1) if all(n % d for d in range(2, int(n**0.5) + 1)))


def serving_pids(server: ServerProcess, key: str = "admission-key") -> list[int]:
    body = http("GET", server.url + "/v1/workers", headers={"Authorization": f"Bearer {key}"}).json()
    return sorted(body["http_processes"]["pids"])


def open_connections(server: ServerProcess, count: int) -> list[httpclient.HTTPConnection]:
    conns = []
    for _ in range(count):
        conn = httpclient.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.connect()
        conns.append(conn)
    return conns


def holders(server: ServerProcess, conns: list[httpclient.HTTPConnection]) -> dict[int, int]:
    """Serving process pid -> how many of `conns` it accepted (by their local ports)."""
    ours = {c.sock.getsockname()[1] for c in conns if c.sock is not None}
    counts: dict[int, int] = {}
    for pid in serving_pids(server):
        for c in psutil.Process(pid).net_connections(kind="tcp"):
            if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in ours:
                counts[pid] = counts.get(pid, 0) + 1
    return counts


def call(conn: httpclient.HTTPConnection, task: str, args: dict[str, Any],
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn.request("POST", f"/v1/tasks/{task}", json.dumps(args).encode(),
                 {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ("--workers", "2", "--http-processes", "2", "--max-pending", "64")
    with serving(tmp_path_factory.mktemp("http2"), *args) as srv:
        wait_for(lambda: len(serving_pids(srv)) == 2, 30, 0.05, "both serving processes")
        yield srv


def test_calls_through_two_serving_processes_are_correct_and_every_worker_serves_both(server: ServerProcess) -> None:
    conns = open_connections(server, 16)
    try:
        held = holders(server, conns)
        assert len(held) == 2 and sum(held.values()) == 16, held  # 16 connections hashed onto both
        limits = [2_000 + 37 * i for i in range(64)]

        def run(i: int) -> tuple[int, int, int]:
            status, body = call(conns[i % 16], "primes", {"limit": limits[i]})
            assert status == 200, body
            return i, body["result"], body["worker"]

        # One thread per connection: a connection carries one request at a time.
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda lane: [run(i) for i in range(lane, 64, 16)], range(16)))
        flat = [r for lane in results for r in lane]
        assert sorted(i for i, _, _ in flat) == list(range(64))
        for i, result, _ in flat:
            assert result == count_primes(limits[i])
        workers = {w["pid"] for w in http("GET", server.url + "/v1/workers").json()["workers"]}
        assert {pid for _, _, pid in flat} == workers  # both workers served calls from both processes
    finally:
        for c in conns:
            c.close()


def test_metrics_and_workers_describe_the_whole_service_whichever_process_answers(server: ServerProcess) -> None:
    before = metric(server, "procbridge_tasks_total", 'outcome="ok",task="sha256"')
    conns = open_connections(server, 12)
    try:
        assert len(holders(server, conns)) == 2
        for c in conns:
            conn_status, _ = call(c, "sha256", {"data": "abc"})
            assert conn_status == 200
        answers = []
        for c in conns:  # each connection asks its own serving process
            c.request("GET", "/metrics")
            text = c.getresponse().read().decode()
            ok_total = 'procbridge_tasks_total{outcome="ok",task="sha256"}'
            line = next(x for x in text.splitlines() if x.startswith(ok_total))
            answers.append(float(line.rsplit(" ", 1)[1]))
            c.request("GET", "/v1/workers")
            listing = json.loads(c.getresponse().read())
            assert listing["size"] == 2 and len(listing["workers"]) == 2
            assert listing["http_processes"]["count"] == 2 and len(listing["http_processes"]["pids"]) == 2
        assert answers == [before + 12] * 12  # every call counted once, in one place
    finally:
        for c in conns:
            c.close()


def test_jobs_run_once_and_their_event_streams_pass_through(server: ServerProcess) -> None:
    ids = [submit(server.url, "primes", {"limit": 100 + i}).json()["id"] for i in range(12)]
    for i, job_id in enumerate(ids):
        final = wait_final(server.url, job_id)
        assert final["status"] == "succeeded" and final["attempts"] == 1, final
        assert http("GET", f"{server.url}/v1/jobs/{job_id}/result").json() == count_primes(100 + i)
    created = submit(server.url, "burn", {"ms": 300}).json()
    events = list(sse_events(server.url, f"/v1/jobs/{created['id']}/events"))
    kinds = [e for e, _ in events]
    assert "progress" in kinds and kinds[-1] == "result", kinds


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(
        tmp_path_factory.mktemp("http2-limits"), "--workers", "1", "--http-processes", "2", "--max-pending", "2",
        "--api-keys", "admission-key,rate-key", "--rate-limit", "10/m",
    ) as srv:
        yield srv


def test_one_admission_limit_for_every_serving_process(limited: ServerProcess) -> None:
    auth = {"Authorization": "Bearer admission-key"}
    conns = open_connections(limited, 8)
    try:
        pids = {w: n for w, n in holders(limited, conns).items() if n}
        assert len(pids) == 2, pids
        with ThreadPoolExecutor(8) as pool:  # 8 calls of 1.5 s at once: 1 runs, 2 wait, 5 are refused
            replies = list(pool.map(lambda c: call(c, "burn", {"ms": 1500}, auth), conns))
    finally:
        for c in conns:
            c.close()
    statuses = sorted(status for status, _ in replies)
    assert statuses == [200] * 3 + [503] * 5, replies
    assert all(body["type"].endswith("/overloaded") for status, body in replies if status == 503)


def test_one_rate_limit_and_the_same_keys_on_every_path(limited: ServerProcess) -> None:
    wrong = http("GET", limited.url + "/v1/tasks", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401  # passed on to the core? no: refused at the edge
    wrong_call = post_json(limited.url + "/v1/tasks/primes", {"limit": 5})
    assert wrong_call.status == 401
    auth = {"Authorization": "Bearer rate-key"}
    statuses = []
    for i in range(14):  # a fresh connection each: both serving processes spend the one bucket
        if i % 2:
            reply = http("GET", limited.url + "/v1/tasks", headers=auth)
        else:
            reply = http("POST", limited.url + "/v1/tasks/primes", b'{"limit": 5}',
                         {"Content-Type": "application/json", **auth})
        statuses.append(reply.status)
    assert statuses.count(429) == 4 and statuses[:10] == [200] * 10, statuses
    assert metric(limited, "procbridge_rejected_requests_total", 'reason="rate-limited"') >= 4
    assert metric(limited, "procbridge_rejected_requests_total", 'reason="unauthorized"') >= 2


def test_a_sigkilled_serving_process_is_replaced_and_no_later_call_is_lost(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--workers", "2", "--http-processes", "2")
    try:
        wait_for(lambda: len(serving_pids(srv)) == 2, 30, 0.05, "both serving processes")
        first = serving_pids(srv)
        os.kill(first[0], signal.SIGKILL)
        # Gone (its sockets closed by the kernel; its parent may not have reaped it yet): from here on
        # every new connection lands on the other one, then on its replacement too.
        wait_for(lambda: not psutil.pid_exists(first[0]) or psutil.Process(first[0]).status() == psutil.STATUS_ZOMBIE,
                 30, 0.005, "the serving process to die")
        replies = [post_json(srv.url + "/v1/tasks/primes", {"limit": 1000 + i}) for i in range(40)]
        assert [r.status for r in replies] == [200] * 40, [r.body for r in replies if r.status != 200]
        assert [r.json()["result"] for r in replies] == [count_primes(1000 + i) for i in range(40)]
        wait_for(lambda: len(serving_pids(srv)) == 2 and first[0] not in serving_pids(srv), 30, 0.05,
                 "a replacement serving process")
        listing = http("GET", srv.url + "/v1/workers").json()["http_processes"]
        assert listing["restarts"] == 1 and first[1] in listing["pids"]
        assert not psutil.pid_exists(first[0])  # reaped by the core
        assert f"serving process {first[0]} exited (killed by SIGKILL)" in srv.log()
    finally:
        assert srv.stop() == 0
        srv.kill_all()


def test_sigterm_drains_every_serving_process_and_leaves_nothing_behind(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--workers", "2", "--http-processes", "2")
    wait_for(lambda: len(serving_pids(srv)) == 2, 30, 0.05, "both serving processes")
    everyone = {p.pid for p in srv.descendants()}
    assert len(everyone) >= 5  # 2 serving processes, the worker parent, 2 workers
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post_json, srv.url + "/v1/tasks/burn", {"ms": 1500})
        wait_for(lambda: any(w["state"] == "busy" for w in http("GET", srv.url + "/v1/workers").json()["workers"]),
                 30, 0.01, "the call to run")
        srv.proc.send_signal(signal.SIGTERM)
        reply = running.result(60)
    assert reply.status == 200, reply.body  # admitted before the drain: it finished
    assert srv.proc.wait(60) == 0
    wait_for(lambda: not srv.leftovers(), 30, 0.05, "every process the server started to exit")
    assert "procbridge stopped" in srv.log()
