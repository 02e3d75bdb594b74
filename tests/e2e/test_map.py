"""Batch map through the real server: NDJSON streaming, ordering, bad items, faults, limits, hang-ups."""

from __future__ import annotations

import http.client as httpclient
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import http, post_json, start_server, wait_for

FAULTS = "tests.support.fault_tasks"


def stream_map(url: str, task: str, items: list[Any], ordered: bool = True) -> Iterator[tuple[float, dict[str, Any]]]:
    """POST a map request and yield (arrival time, line) as each NDJSON line arrives."""
    host, port = url.removeprefix("http://").split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"items": items, "ordered": ordered}).encode()
    conn.request("POST", f"/v1/tasks/{task}/map", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("Content-Type", "").startswith("application/x-ndjson")
    try:
        for raw in resp:
            if raw.strip():
                yield time.time(), json.loads(raw)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("map")
    srv = start_server(tmp, "--workers", "2", "--tasks", FAULTS, "--max-map-items", "5000")
    yield srv
    srv.stop()
    srv.kill_all()


def _pi(n: int) -> int:
    return sum(1 for k in range(2, n + 1) if all(k % d for d in range(2, int(k**0.5) + 1)))


def test_ordered_results_in_input_order(server):
    items = [{"limit": n} for n in range(300)]
    lines = [line for _, line in stream_map(server.url, "primes", items)]
    assert [line["index"] for line in lines] == list(range(300))
    assert [line["result"] for line in lines] == [_pi(n) for n in range(300)]


def test_unordered_results_cover_every_item(server):
    items = [{"ms": (i % 4) * 20} for i in range(24)]
    lines = [line for _, line in stream_map(server.url, "burn", items, ordered=False)]
    assert sorted(line["index"] for line in lines) == list(range(24))
    assert all("result" in line for line in lines)


def test_a_bad_item_is_its_own_error_line(server):
    items = [{"limit": 10}, {"limit": -1}, {"limit": "x"}, {"nope": 1}, 7, {"limit": 20}]
    lines = {line["index"]: line for _, line in stream_map(server.url, "primes", items)}
    assert lines[0]["result"] == 4 and lines[5]["result"] == 8
    for index in (1, 2, 3, 4):
        assert lines[index]["error"]["type"] == "/problems/invalid-arguments", lines[index]
        assert lines[index]["error"]["status"] == 422
    assert lines[4]["error"]["detail"].startswith("items.4: ")  # not an object: the 422 names which item


def test_a_failing_or_crashing_item_costs_only_itself(server):
    items = [{"kind": "none"}] * 5 + [{"kind": "sys_exit_msg"}, {"kind": "segfault"}] + [{"kind": "none"}] * 5
    lines = {line["index"]: line for _, line in stream_map(server.url, "fault", items)}
    assert sorted(lines) == list(range(12))
    assert lines[5]["error"]["type"] == "/problems/task-failed"
    assert lines[6]["error"]["type"] == "/problems/worker-crashed"
    assert all("result" in lines[i] for i in [*range(5), *range(7, 12)])


def test_first_line_arrives_long_before_the_last_item_finishes(server):
    items = [{"ms": 100}] * 12
    lines = list(stream_map(server.url, "burn", items))
    first_arrival = lines[0][0]
    last_finish = max(line["result"]["finished_at"] for _, line in lines)
    assert first_arrival < last_finish


def test_too_many_items_is_413(server):
    reply = post_json(server.url + "/v1/tasks/primes/map", {"items": [{"limit": 1}] * 5001})
    assert reply.status == 413 and reply.json()["type"] == "/problems/payload-too-large"


@pytest.mark.parametrize(
    ("body", "status"),
    [({"items": "x"}, 422), ({}, 422), ({"items": [], "ordered": "yes"}, 422), ({"items": [], "x": 1}, 422)],
)
def test_bad_map_requests(server, body, status):
    reply = post_json(server.url + "/v1/tasks/primes/map", body)
    assert reply.status == status, reply.body


def test_unknown_task_map_is_404(server):
    assert post_json(server.url + "/v1/tasks/nope/map", {"items": []}).status == 404


def test_empty_map_is_an_empty_stream(server):
    assert list(stream_map(server.url, "primes", [])) == []


def _burns_done(url: str) -> int:
    text = http("GET", url + "/metrics").body.decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith('procbridge_tasks_total{outcome="ok",task="burn"}'):
            total = float(line.split()[-1])
    return int(total)


def test_a_client_that_hangs_up_stops_the_rest_of_its_batch(tmp_path):
    srv = start_server(tmp_path, "--workers", "1")
    try:
        host, port = srv.url.removeprefix("http://").split(":")
        n = 40
        body = json.dumps({"items": [{"ms": 50}] * n}).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(
            b"POST /v1/tasks/burn/map HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        wait_for(lambda: _burns_done(srv.url) >= 1, 15, 0.02, "the first items to run")
        sock.close()
        # once the pool is quiet again, far fewer than n items ran
        wait_for(lambda: all(w["state"] == "idle" for w in http("GET", srv.url + "/v1/workers").json()["workers"])
                 and http("GET", srv.url + "/metrics").status == 200, 15, 0.05, "the pool to go idle")
        before = _burns_done(srv.url)
        idle = http("GET", srv.url + "/v1/workers").json()["workers"]
        assert all(w["state"] == "idle" for w in idle)
        assert before < n
        assert _burns_done(srv.url) == before  # and nothing more runs after
    finally:
        srv.stop()
        srv.kill_all()


def test_tiny_items_go_to_the_workers_in_chunks_not_one_call_each(server):
    """The promise behind map's speed on tiny items (its timing is the bench's: scripts/bench
    batch_speedup): 2,000 items cost the workers far fewer calls than items, every result right."""

    def calls_done() -> int:
        return sum(w["tasks_done"] for w in http("GET", server.url + "/v1/workers").json()["workers"])

    n = 2000
    before = calls_done()
    lines = list(stream_map(server.url, "primes", [{"limit": 10 + i % 7} for i in range(n)]))
    expected = {10: 4, 11: 5, 12: 5, 13: 6, 14: 6, 15: 6, 16: 6}
    assert [line["index"] for _, line in lines] == list(range(n))
    assert all(line["result"] == expected[10 + line["index"] % 7] for _, line in lines)
    worker_calls = calls_done() - before
    # One call per worker to measure the task, then chunks of up to 512 items: a handful of calls.
    assert 1 <= worker_calls <= n // 20, worker_calls
