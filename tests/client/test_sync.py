"""`procbridge.Client` against a real server: every method, the typed errors, and streamed answers
read as they come (each streaming test holds the server's task on a gate file while it checks that
what came before has already arrived)."""

from __future__ import annotations

import hashlib
import io
import threading
import traceback
from pathlib import Path

import pytest
from PIL import Image

import procbridge
from procbridge import Client, Event
from tests.conftest import ServerProcess, free_port, wait_for


@pytest.fixture
def pb(server: ServerProcess):
    with Client(server.url, timeout=30) as client:
        yield client


def test_call_returns_the_result(pb: Client) -> None:
    assert pb.call("primes", limit=1000) == 168
    assert pb.call("burn", ms=1)["ms"] >= 1


def test_a_binary_body_with_arguments_in_the_query_string(pb: Client) -> None:
    data = b"hello procbridge" * 1000
    assert pb.call("sha256", data) == hashlib.sha256(data).hexdigest()
    twice = hashlib.sha256(hashlib.sha256(data).digest()).hexdigest()
    assert pb.call("sha256", data, rounds=2) == twice
    # bytes as a keyword go in the JSON body as {"base64": ...}: the same answer
    assert pb.call("sha256", data=data, rounds=2) == twice


def test_a_png_result_comes_back_as_bytes(pb: Client) -> None:
    png = pb.call("mandelbrot", width=40, height=30, max_iter=50)
    assert isinstance(png, bytes)
    assert Image.open(io.BytesIO(png)).size == (40, 30)


def test_unknown_task_is_a_typed_error_with_its_problem(pb: Client) -> None:
    with pytest.raises(procbridge.UnknownTask) as caught:
        pb.call("no_such_task", x=1)
    err = caught.value
    assert isinstance(err, procbridge.ProblemError) and isinstance(err, procbridge.ProcbridgeError)
    assert (err.status, err.slug) == (404, "unknown-task")
    assert err.problem["type"] == "/problems/unknown-task" and "no_such_task" in err.detail


def test_wrong_types_are_invalid_arguments_naming_the_field(pb: Client) -> None:
    with pytest.raises(procbridge.InvalidArguments) as caught:
        pb.call("primes", limit="many")
    err = caught.value
    assert err.status == 422 and err.slug == "invalid-arguments"
    assert err.problem["errors"][0]["field"] == "limit" and err.errors == err.problem["errors"]
    assert err.title and "limit" in err.detail and err.retry_after is None


def test_a_task_that_raises_is_task_failed(pb: Client) -> None:
    with pytest.raises(procbridge.TaskFailed) as caught:
        pb.call("st_async_fail", message="boom")
    assert caught.value.status == 500 and caught.value.exception == "ValueError" and "boom" in caught.value.detail


def test_generator_task_called_whole_and_streamed_item_by_item(pb: Client, gate: Path) -> None:
    assert pb.call("st_count", n=4) == [0, 1, 2, 3]
    items = pb.stream("st_count", n=3, gate=str(gate))
    assert next(items) == 0  # arrived while the task waits for the gate: read incrementally
    gate.touch()
    assert list(items) == [1, 2]


def test_a_stream_that_fails_midway_raises_after_its_items(pb: Client) -> None:
    items = pb.stream("st_count", n=5, fail_at=2)
    assert [next(items), next(items)] == [0, 1]
    with pytest.raises(procbridge.TaskFailed, match="failed at item 2"):
        next(items)


def test_stream_of_a_plain_task_yields_its_one_result(pb: Client) -> None:
    assert list(pb.stream("primes", limit=10)) == [4]


def test_map_in_order_with_one_bad_item(pb: Client) -> None:
    items = [{"limit": 10}, {"limit": -1}, {"limit": 100}]
    results = pb.map("primes", items)
    assert next(results) == 4
    with pytest.raises(procbridge.InvalidArguments) as caught:
        next(results)
    assert caught.value.index == 1
    assert list(pb.map("primes", items, return_exceptions=True))[0::2] == [4, 25]
    got = list(pb.map("primes", items, return_exceptions=True))
    assert isinstance(got[1], procbridge.InvalidArguments) and got[1].index == 1


def test_map_unordered_yields_index_result_pairs_in_completion_order(pb: Client, gate: Path, tmp_path: Path) -> None:
    slow = {"path": str(tmp_path / "slow"), "release": str(gate)}
    fast = {"path": str(tmp_path / "fast"), "release": str(tmp_path / "slow")}  # exists once slow runs
    pairs = pb.map_unordered("mark_then_wait", [slow, fast, {"path": 5}], return_exceptions=True)
    first = [next(pairs), next(pairs)]  # the bad item and the fast one, while the slow one waits
    assert sorted(index for index, _ in first) == [1, 2]
    assert isinstance(dict(first)[2], procbridge.InvalidArguments)
    gate.touch()
    assert [index for index, _ in pairs] == [0]
    values = list(pb.map("primes", [{"limit": 10}, {"limit": 100}], ordered=False))
    assert sorted(values) == [4, 25]


def test_map_in_order_reads_each_result_as_it_comes(pb: Client, gate: Path, tmp_path: Path) -> None:
    done = tmp_path / "done"
    done.touch()
    items = [{"path": str(tmp_path / "a"), "release": str(done)}, {"path": str(tmp_path / "b"), "release": str(gate)}]
    with pb.map("mark_then_wait", items) as results:  # type: ignore[attr-defined]
        assert next(results)["released"] is True  # while item 1 still waits for the gate
        gate.touch()
        assert next(results)["released"] is True


def test_map_timeout_bounds_the_whole_iteration(pb: Client, gate: Path, tmp_path: Path) -> None:
    results = pb.map("mark_then_wait", [{"path": str(tmp_path / "m"), "release": str(gate)}], timeout=0.5)
    with pytest.raises(procbridge.Timeout):
        next(results)
    with pytest.raises(TimeoutError):  # procbridge.Timeout is a TimeoutError, as futures code expects
        list(pb.map("mark_then_wait", [{"path": str(tmp_path / "n"), "release": str(gate)}], timeout=0.3))
    gate.touch()


def test_tasks_workers_health_ready(pb: Client) -> None:
    names = {t["name"] for t in pb.tasks()}
    assert {"primes", "sha256", "mandelbrot", "st_count"} <= names
    assert all("params" in t for t in pb.tasks())
    workers = pb.workers()
    assert workers["size"] == 2 and len(workers["workers"]) == 2
    assert pb.health() is True and pb.ready() is True


def test_submit_then_result_events_status_info(pb: Client) -> None:
    job = pb.submit("burn", ms=200)
    assert isinstance(job, procbridge.Job) and job.id
    events = list(job.events())
    assert all(isinstance(e, Event) for e in events)
    kinds = [e.type for e in events]
    assert "progress" in kinds and "status" in kinds and kinds[-1] == "result"
    assert job.result()["ms"] >= 200
    assert job.status() == "succeeded" and job.info()["task"] == "burn"
    assert pb.job(job.id).result(timeout=5) == job.result()
    assert job.id in {j["id"] for j in pb.jobs(status="succeeded", limit=50)}
    assert len(pb.jobs(limit=1)) == 1


def test_job_events_arrive_while_it_runs_and_cancel_stops_it(pb: Client, gate: Path, tmp_path: Path) -> None:
    marker = tmp_path / "running"
    job = pb.submit("mark_then_wait", path=str(marker), release=str(gate))
    events = job.events()
    seen = []
    for event in events:  # read as they come: the job is held on the gate
        seen.append(event)
        if event.type == "status" and event.data["status"] == "running":  # {"status", "attempt"}
            break
    wait_for(marker.exists, 10, what="the job to start")
    assert job.status() == "running"
    assert job.cancel()["status"] == "cancelled"
    rest = list(events)
    assert rest[-1].type == "error"
    with pytest.raises(procbridge.JobCancelled):
        job.result(timeout=10)
    with pytest.raises(procbridge.JobFinished):
        job.cancel()
    assert job.id in {j["id"] for j in pb.jobs(status="cancelled")}


def test_a_failed_job_raises_its_error_and_a_binary_result_comes_back_as_bytes(pb: Client) -> None:
    with pytest.raises(procbridge.TaskFailed, match="kaput"):
        pb.submit("st_async_fail", message="kaput").result(timeout=30)
    png = pb.submit("mandelbrot", width=8, height=8).result(timeout=30)
    assert isinstance(png, bytes) and png.startswith(b"\x89PNG")


def test_job_result_timeout(pb: Client, gate: Path, tmp_path: Path) -> None:
    job = pb.submit("mark_then_wait", path=str(tmp_path / "m"), release=str(gate))
    with pytest.raises(procbridge.Timeout):
        job.result(timeout=0.5)
    gate.touch()
    assert job.result(timeout=30)["released"] is True


def test_idempotency_key_and_the_arguments_mapping(pb: Client) -> None:
    a = pb.submit("primes", {"limit": 50}, idempotency_key="client-test-1")
    b = pb.submit("primes", limit=50, idempotency_key="client-test-1")
    assert a.id == b.id and a.result(timeout=30) == 15
    with pytest.raises(TypeError, match="limit"):
        pb.submit("primes", {"limit": 1}, limit=2)


def test_unknown_job(pb: Client) -> None:
    with pytest.raises(procbridge.UnknownJob) as caught:
        pb.job("nope").status()
    assert caught.value.status == 404


def test_server_gone_is_service_unreachable_without_an_httpx_traceback() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", retries=1) as pb:
        with pytest.raises(procbridge.ServiceUnreachable) as caught:
            pb.call("primes", limit=1)
        assert pb.health() is False and pb.ready() is False
    err = caught.value
    assert err.__cause__ is None and err.__suppress_context__
    shown = "".join(traceback.format_exception(err))
    assert "/httpx/" not in shown and "/httpcore/" not in shown and "ConnectError: [Errno" in shown, shown


def test_url_and_key_from_the_environment(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCBRIDGE_URL", server.url)
    with Client() as pb:
        assert pb.url == server.url and pb.call("primes", limit=10) == 4


def test_one_client_from_many_threads(pb: Client) -> None:
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(pb.call("primes", limit=100))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [25] * 8
