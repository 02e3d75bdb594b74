"""`async def` and generator tasks through the real server: NDJSON streaming of a synchronous call
(first line before the generator is done, the end line, an error line), a client that hangs up, a
reader that stops reading, a crash and a timeout mid-stream, and a job's `item` events."""

from __future__ import annotations

import http.client as httpclient
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess, http, joined, metric, post_json, run_in_thread, start_server, wait_for
from tests.e2e.test_jobs import sse_events, submit, wait_final
from workers.streaming import WINDOW

STREAMS = "tests.support.stream_tasks"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("streams"), "--workers", "1", "--tasks", STREAMS)
    yield srv
    srv.stop()
    srv.kill_all()


class Stream:
    """One streaming call read line by line with a plain HTTP client (optionally with a small
    receive buffer, so the kernel holds little of what the server sends)."""

    def __init__(self, server: ServerProcess, task: str, args: dict[str, Any], query: str = "", rcvbuf: int = 0):
        self.conn = httpclient.HTTPConnection("127.0.0.1", server.port, timeout=30)
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", server.port))
        self.conn.sock = sock
        self.conn.request("POST", f"/v1/tasks/{task}{query}", json.dumps(args).encode(),
                          {"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()

    def line(self) -> Any:
        raw = self.resp.readline()
        assert raw.endswith(b"\n"), f"the stream ended early: {raw[:200]!r}"
        return json.loads(raw)

    def rest(self) -> list[Any]:
        lines = [json.loads(raw) for raw in self.resp.read().splitlines()]
        self.close()
        return lines

    def close(self) -> None:
        self.conn.close()


def produced(path: Path) -> int:
    return int(path.read_text()) if path.exists() else 0


def test_an_async_task_answers_its_result_and_one_that_raises_answers_500(server: ServerProcess) -> None:
    reply = post_json(server.url + "/v1/tasks/st_async_add", {"a": 20, "b": 22})
    assert reply.status == 200, reply.body
    assert reply.json()["result"]["sum"] == 42 and reply.json()["worker"] == reply.json()["result"]["pid"]
    failed = post_json(server.url + "/v1/tasks/st_async_fail", {"message": "boom"})
    assert failed.status == 500 and failed.json()["type"] == "/problems/task-failed"
    assert "boom" in failed.json()["detail"]


def test_a_generator_answers_ndjson_whose_first_line_comes_before_the_generator_is_done(
    server: ServerProcess, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    stream = Stream(server, "st_count", {"n": 3, "gate": str(gate)})
    assert stream.resp.status == 200
    assert stream.resp.getheader("Content-Type", "").startswith("application/x-ndjson")
    assert stream.line() == {"item": 0}
    assert not gate.exists()  # the generator is still waiting for it: the first line did not wait for the rest
    gate.write_text("go")
    assert stream.rest() == [{"item": 1}, {"item": 2}, {"end": True, "items": 3}]
    empty = Stream(server, "st_count", {"n": 0})
    assert empty.resp.status == 200 and empty.resp.getheader("X-Procbridge-Worker")
    assert empty.rest() == [{"end": True, "items": 0}]


def test_an_exception_mid_stream_ends_it_with_an_error_line_and_counts_task_failed(server: ServerProcess) -> None:
    labels = 'outcome="task-failed",task="st_count"'
    before = metric(server, "procbridge_tasks_total", labels)
    lines = Stream(server, "st_count", {"n": 5, "fail_at": 2}).rest()
    assert lines[:2] == [{"item": 0}, {"item": 1}] and len(lines) == 3
    error = lines[2]["error"]
    assert error["type"] == "/problems/task-failed" and error["status"] == 500 and "item 2" in error["detail"]
    assert metric(server, "procbridge_tasks_total", labels) == before + 1
    refused = post_json(server.url + "/v1/tasks/st_count", {"n": 5, "fail_at": 0})  # before any item: a plain 500
    assert refused.status == 500 and refused.json()["type"] == "/problems/task-failed"


def test_a_client_that_hangs_up_closes_the_generator_and_the_worker_serves_the_next_call(
    server: ServerProcess, tmp_path: Path
) -> None:
    closed, gate = tmp_path / "closed", tmp_path / "gate"
    stream = Stream(server, "st_endless", {"closed": str(closed), "gate": str(gate)})
    pid = int(stream.resp.getheader("X-Procbridge-Worker", "0"))
    assert stream.line() == {"item": "1"}
    stream.close()  # hang up while the generator waits for the gate
    gate.write_text("go")  # it yields once more, and is closed there
    count, closer = wait_for(lambda: closed.exists() and closed.read_text(), 10, what="the generator's finally").split()
    # Closed at the yield it reached: the first, if the close came before the worker asked for more.
    assert int(closer) == pid and int(count) in (1, 2)
    reply = post_json(server.url + "/v1/tasks/st_async_add", {"a": 1, "b": 2})
    assert reply.status == 200 and reply.json()["worker"] == pid  # the same worker: closed, not killed


def test_a_reader_that_stops_reading_stops_the_generator_a_bounded_distance_ahead(
    server: ServerProcess, tmp_path: Path
) -> None:
    count, closed = tmp_path / "produced", tmp_path / "closed"
    size = 1 << 20  # 1 MiB items: the kernel's socket buffers hold only a few of them
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    # The window, what the kernel may buffer on the server's side, the line aiohttp is writing and the
    # item the handler holds, the one the generator is suspended in, and our small receive buffer.
    bound = WINDOW + wmem_max // size + 4
    stream = Stream(server, "st_endless", {"closed": str(closed), "produced": str(count), "size": size},
                    rcvbuf=64 * 1024)
    assert len(stream.line()["item"]) == size
    wait_for(lambda: produced(count) >= WINDOW, 10, what="the generator to fill the window")
    # The negative check: unchecked, an endless generator yields hundreds of these in this time.
    with pytest.raises(AssertionError, match="timed out"):
        wait_for(lambda: produced(count) > bound, 0.5, 0.02, "the generator to pass the bound")
    stalled = produced(count)
    assert stalled <= bound, (stalled, bound)
    for _ in range(2 * bound):  # reading resumes it
        assert len(stream.line()["item"]) == size
    wait_for(lambda: produced(count) > stalled + WINDOW, 10, what="the generator to go on")
    stream.close()
    wait_for(lambda: closed.exists(), 10, what="the generator to be closed")


def test_a_worker_crash_mid_stream_ends_it_with_a_worker_crashed_line(server: ServerProcess, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    stream = Stream(server, "st_crash_after_first", {"gate": str(gate)})
    assert stream.line() == {"item": 1}
    gate.write_text("go")
    lines = stream.rest()
    assert len(lines) == 1 and lines[0]["error"]["type"] == "/problems/worker-crashed"
    wait_for(lambda: post_json(server.url + "/v1/tasks/st_async_add", {"a": 1, "b": 1}).status == 200, 10)


def test_the_timeout_covers_the_whole_stream(server: ServerProcess, tmp_path: Path) -> None:
    stream = Stream(server, "st_count", {"n": 3, "gate": str(tmp_path / "never")}, query="?timeout=0.5")
    assert stream.line() == {"item": 0}
    lines = stream.rest()
    assert len(lines) == 1 and lines[0]["error"]["type"] == "/problems/task-timeout"
    wait_for(lambda: post_json(server.url + "/v1/tasks/st_async_add", {"a": 1, "b": 1}).status == 200, 10)


def test_a_generator_job_sends_each_item_as_an_event_and_its_result_is_the_list(
    server: ServerProcess, tmp_path: Path
) -> None:
    start = tmp_path / "start"
    reply = submit(server.url, "st_count", {"n": 3, "before": str(start)})
    assert reply.status == 202, reply.body
    job_id = reply.json()["id"]
    items, result = [], None
    for event, data in sse_events(server.url, f"/v1/jobs/{job_id}/events"):
        if event == "status" and not start.exists():
            start.write_text("go")  # subscribed (the stream's first event): now let it yield
        elif event == "item":
            items.append(data["item"])
        elif event in ("result", "error"):
            result = (event, data)
    assert items == [0, 1, 2]
    assert result is not None and result[0] == "result" and result[1]["result"] == [0, 1, 2]
    async_job = submit(server.url, "st_async_add", {"a": 1, "b": 2}).json()["id"]
    final = wait_final(server.url, async_job)
    assert final["status"] == "succeeded" and final["result"]["sum"] == 3


def test_openapi_documents_a_generator_s_answer_as_ndjson_lines(server: ServerProcess) -> None:
    doc = http("GET", server.url + "/openapi.json").json()
    ok = doc["paths"]["/v1/tasks/st_count"]["post"]["responses"]["200"]
    assert list(ok["content"]) == ["application/x-ndjson"]
    shapes = ok["content"]["application/x-ndjson"]["schema"]["oneOf"]
    assert [s["required"] for s in shapes] == [["item"], ["end", "items"], ["error"]]
    plain = doc["paths"]["/v1/tasks/st_async_add"]["post"]["responses"]["200"]
    assert "application/json" in plain["content"]


def test_a_concurrency_1_generator_holds_its_slot_for_the_whole_stream_while_other_tasks_run(
    tmp_path: Path,
) -> None:
    srv = start_server(tmp_path, "--workers", "2", "--tasks", STREAMS)
    try:
        gate = tmp_path / "gate"
        first = Stream(srv, "st_serial", {"n": 3, "gate": str(gate)})
        assert first.line() == {"item": 0}  # the stream runs, and holds the task's one slot
        second, box = run_in_thread(post_json, srv.url + "/v1/tasks/st_serial", {"n": 2}, 60)
        wait_for(lambda: metric(srv, "procbridge_task_waiting", 'task="st_serial"') == 1, 30,
                 what="the second stream to wait for the slot")
        other = post_json(srv.url + "/v1/tasks/st_async_add", {"a": 1, "b": 2})  # another task runs meanwhile
        assert other.status == 200 and other.json()["result"]["sum"] == 3
        assert second.is_alive()  # still waiting: the worker it would need is free, the slot is not
        gate.write_text("go")
        assert first.rest() == [{"item": 1}, {"item": 2}, {"end": True, "items": 3}]
        reply = joined(second, box)
        assert reply.status == 200
        assert [json.loads(line) for line in reply.body.splitlines()] == [
            {"item": 0}, {"item": 1}, {"end": True, "items": 2}
        ]
    finally:
        srv.stop()
        srv.kill_all()
