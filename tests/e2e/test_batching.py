"""`@task(batch=Batch(...))` through the real server and real worker processes: calls gathered into shared
invocations, each caller's own result, bad calls kept out, a crash costing one batch, per-call timeouts, a
wrong-length result, and the element schema. Tasks: tests/support/batch_tasks.py.

The server runs one worker. A test first sends a gated call (its invocation holds the worker until the test
opens the gate), then the calls under test: with the worker busy they gather into full batches (max_size)
that leave for the pool, which /metrics counts (`procbridge_batches_total`); only then is the gate
opened. So which calls share an invocation is decided by the batching policy, never by timing."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest

from tests.conftest import http, joined, metric, post_json, run_in_thread, start_server, wait_for
from tests.support.batch_tasks import CRASH, GATE

TASKS = "tests.support.batch_tasks"
_gates = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: Any) -> Any:
    tmp = tmp_path_factory.mktemp("batching")
    (tmp / "gates").mkdir()
    srv = start_server(tmp, "--workers", "1", "--tasks", TASKS,
                       env={"BATCH_LOG": str(tmp / "batches.jsonl"), "BATCH_GATES": str(tmp / "gates")})
    srv.tmp = tmp
    yield srv
    srv.stop()
    srv.kill_all()


def invocations(server: Any, task: str) -> list[list[int]]:
    """The values of each invocation of `task` so far, in order."""
    path = server.tmp / "batches.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["values"] for row in rows if row["task"] == task]


class Gate:
    """A call of `task` whose invocation holds the (only) worker until `open()`."""

    def __init__(self, server: Any, task: str, extra: dict[str, Any] | None = None) -> None:
        self.server, self.number = server, next(_gates)
        self.value = GATE + self.number
        self.thread, self.box = run_in_thread(call, server, task, {"x": self.value, **(extra or {})})
        wait_for(lambda: any(self.value in v for v in invocations(server, task)), 30, what="the gated invocation")
        self.sent = batches_sent(server, task)  # batches of the task sent so far, the gate's included

    def open(self) -> None:
        (self.server.tmp / "gates" / str(self.number)).touch()
        status, _, _ = joined(self.thread, self.box, 60)
        assert status == 200


def call(server: Any, task: str, args: dict[str, Any], query: str = "") -> tuple[int, Any, float]:
    """POST one call: (status, body, seconds it took)."""
    start = time.monotonic()
    reply = post_json(f"{server.url}/v1/tasks/{task}{query}", args, timeout=60)
    return reply.status, reply.json(), time.monotonic() - start


def call_all(server: Any, task: str, calls: list[dict[str, Any]], queries: list[str] | None = None) -> list[Any]:
    return [run_in_thread(call, server, task, args, (queries or [""] * len(calls))[i]) for i, args in enumerate(calls)]


def results(started: list[Any]) -> list[tuple[int, Any, float]]:
    return [joined(thread, box, 60) for thread, box in started]


def batches_sent(server: Any, task: str) -> float:
    return metric(server, "procbridge_batches_total", f'task="{task}"')


def wait_batches(server: Any, task: str, n: float) -> None:
    wait_for(lambda: batches_sent(server, task) >= n, 30, what=f"{n:g} batches of {task} sent")


def test_concurrent_calls_share_invocations_of_at_most_max_size_and_each_caller_gets_its_own_result(server):
    gate = Gate(server, "double")
    values = list(range(100, 124))  # 24 calls, max_size 8
    started = call_all(server, "double", [{"x": v} for v in values])
    wait_batches(server, "double", gate.sent + 3)  # three full batches wait for the worker
    gate.open()
    answers = results(started)
    assert [status for status, _, _ in answers] == [200] * 24
    assert [body["result"] for _, body, _ in answers] == [2 * v for v in values]  # each caller its own value
    mine = [inv for inv in invocations(server, "double") if set(inv) <= set(values)]
    assert sorted(v for inv in mine for v in inv) == values  # every call ran, once
    assert len(mine) < len(values) and [len(inv) for inv in mine] == [8, 8, 8]


def test_a_call_with_bad_arguments_is_refused_alone_and_never_joins_a_batch(server):
    gate = Gate(server, "double")
    values = list(range(200, 208))
    started = call_all(server, "double", [{"x": v} for v in values])
    bad = [call(server, "double", {"x": "not a number"}), call(server, "double", {"x": [1, 2]}),
           call(server, "double", {"y": 1})]
    assert [status for status, _, _ in bad] == [422, 422, 422]
    assert bad[0][1]["type"] == "/problems/invalid-arguments" and "x" in bad[0][1]["detail"]
    wait_batches(server, "double", gate.sent + 1)
    gate.open()
    answers = results(started)
    assert [(status, body["result"]) for status, body, _ in answers] == [(200, 2 * v) for v in values]
    mine = [inv for inv in invocations(server, "double") if set(inv) & set(values)]
    assert [sorted(inv) for inv in mine] == [values]  # the good calls, and nothing else, in one invocation


def test_a_crash_inside_a_batch_costs_only_that_batchs_calls_and_the_next_batch_works(server):
    gate = Gate(server, "double")
    doomed = [300, 301, 302, CRASH, 304, 305, 306, 307]
    fine = list(range(400, 408))
    crashed = call_all(server, "double", [{"x": v} for v in doomed])
    wait_batches(server, "double", gate.sent + 1)  # the doomed batch is full and sent before the next one gathers
    survived = call_all(server, "double", [{"x": v} for v in fine])
    wait_batches(server, "double", gate.sent + 2)
    gate.open()
    lost = results(crashed)
    assert {status for status, _, _ in lost} == {502}
    assert {body["type"] for _, body, _ in lost} == {"/problems/worker-crashed"}
    assert [(status, body["result"]) for status, body, _ in results(survived)] == [(200, 2 * v) for v in fine]
    after = call(server, "double", {"x": 21})  # and the service goes on
    assert after[0] == 200 and after[1]["result"] == 42


def test_each_call_keeps_its_own_timeout_inside_a_shared_batch(server):
    gate = Gate(server, "sleepy", {"ms": 0})
    calls = [{"x": 501, "ms": 1500}, {"x": 502, "ms": 1500}, {"x": 503, "ms": 1500}]
    started = call_all(server, "sleepy", calls, ["?timeout=0.3", "?timeout=0.9", ""])
    wait_batches(server, "sleepy", gate.sent + 1)  # all three in one batch (max_size 3)
    gate.open()
    (s1, b1, t1), (s2, b2, t2), (s3, b3, t3) = results(started)
    assert (s1, b1["type"]) == (504, "/problems/task-timeout")
    assert (s2, b2["type"]) == (504, "/problems/task-timeout")
    assert (s3, b3["result"]) == (200, 503)  # the one without a timeout gets its result...
    assert t1 < t2 < t3 and t2 - t1 > 0.3 and t3 >= 1.5  # ...after the others got theirs, each at its own deadline
    assert [sorted(inv) for inv in invocations(server, "sleepy") if 501 in inv] == [[501, 502, 503]]


def test_a_batch_function_returning_the_wrong_number_of_results_fails_every_call_of_that_batch(server):
    gate = Gate(server, "short_by_one")
    # the gate's batch is of one call, for which the function returns nothing: it fails too
    values = [601, 602, 603]
    started = call_all(server, "short_by_one", [{"x": v} for v in values])
    wait_batches(server, "short_by_one", gate.sent + 1)
    (server.tmp / "gates" / str(gate.number)).touch()
    gate_status, gate_body, _ = joined(gate.thread, gate.box, 60)
    assert gate_status == 500 and "returned 0 results for a batch of 1 calls" in gate_body["detail"]
    answers = results(started)
    assert {status for status, _, _ in answers} == {500}
    for _, body, _ in answers:
        assert body["type"] == "/problems/task-failed"
        assert "returned 2 results for a batch of 3 calls" in body["detail"], body["detail"]


def test_the_schema_of_a_batch_task_is_one_calls_element_and_a_left_out_argument_takes_its_default(server):
    tasks = {t["name"]: t for t in http("GET", server.url + "/v1/tasks").json()["tasks"]}
    props = tasks["double"]["params"]["properties"]
    assert props["x"]["type"] == "integer" and tasks["double"]["params"]["required"] == ["x"]
    assert tasks["scaled"]["params"]["properties"]["factor"]["default"] == 2.0
    assert call(server, "scaled", {"x": 1.5})[1]["result"] == 3.0
    assert call(server, "scaled", {"x": 1.5, "factor": 10})[1]["result"] == 15.0


def test_jobs_and_map_of_a_batch_task_go_through_the_batcher(server):
    reply = post_json(server.url + "/v1/jobs", {"task": "double", "args": {"x": 7001}})
    assert reply.status == 202
    job_url = server.url + reply.headers["location"]
    job = wait_for(lambda: (j := http("GET", job_url).json())["status"] in ("succeeded", "failed") and j, 30)
    assert job["status"] == "succeeded" and job["result"] == 14002
    items = [{"x": v} for v in range(8000, 8020)]
    reply = post_json(server.url + "/v1/tasks/double/map", {"items": items})
    lines = [json.loads(line) for line in reply.body.splitlines() if line.strip()]
    assert [(line["index"], line["result"]) for line in lines] == [(i, 2 * (8000 + i)) for i in range(20)]
    mine = [inv for inv in invocations(server, "double") if set(inv) <= set(range(8000, 8020))]
    assert sorted(v for inv in mine for v in inv) == list(range(8000, 8020))
    assert all(len(inv) <= 8 for inv in mine)
