"""The built-in tasks against independent computations, two calls running side by side on two
workers, and the introspection endpoints (/v1/workers, /openapi.json, /metrics) of a real server."""

from __future__ import annotations

import hashlib
import http.client as httpclient
import io
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Reply, ServerProcess, http, joined, post_json, run_in_thread, serving, wait_for

BUILTINS = ("primes", "burn", "sha256", "mandelbrot")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server shared by the read-only correctness tests of this module."""
    with serving(tmp_path_factory.mktemp("builtins"), "--workers", "2") as srv:
        yield srv


def call(server: ServerProcess, task: str, args: dict[str, Any]) -> Any:
    reply = post_json(f"{server.url}/v1/tasks/{task}", args)
    assert reply.status == 200, (task, args, reply.status, reply.body)
    assert reply.headers["content-type"].startswith("application/json")
    envelope = reply.json()
    assert envelope["task"] == task
    assert isinstance(envelope["worker"], int)
    assert isinstance(envelope["elapsed_ms"], int | float) and envelope["elapsed_ms"] >= 0
    return envelope


def post_binary(server: ServerProcess, path: str, data: bytes) -> Reply:
    return http("POST", server.url + path, data, {"Content-Type": "application/octet-stream"})


def worker_pids(server: ServerProcess) -> set[int]:
    return {w["pid"] for w in http("GET", server.url + "/v1/workers").json()["workers"]}


# -- primes ---------------------------------------------------------------------------------------


def reference_pi(limit: int) -> list[int]:
    """pi(n) for every n ≤ limit, from a textbook sieve (not the service's odd-only one)."""
    is_prime = [False, False] + [True] * (limit - 1)
    for p in range(2, int(limit**0.5) + 1):
        if is_prime[p]:
            for multiple in range(p * p, limit + 1, p):
                is_prime[multiple] = False
    counts, running = [], 0
    for n in range(limit + 1):
        running += is_prime[n]
        counts.append(running)
    return counts[: limit + 1]


def test_primes_matches_a_reference_sieve_for_every_small_limit(server):
    expected = reference_pi(300)
    got = [call(server, "primes", {"limit": n})["result"] for n in range(301)]
    assert got == expected
    assert got[:4] == [0, 0, 1, 2]  # the edge cases 0, 1, 2, 3


@pytest.mark.parametrize(
    ("limit", "count"),
    [(7918, 999), (7919, 1000), (10**4, 1229), (10**5, 9592), (10**6, 78498), (10**7, 664579), (10**8, 5761455)],
)
def test_primes_known_values(server, limit, count):
    assert call(server, "primes", {"limit": limit})["result"] == count


# -- burn -----------------------------------------------------------------------------------------


def test_burn_reports_its_worker_and_the_time_it_burnt(server):
    before = {w["pid"]: w for w in http("GET", server.url + "/v1/workers").json()["workers"]}
    envelope = call(server, "burn", {"ms": 150})
    result = envelope["result"]
    assert set(result) >= {"pid", "ms", "started_at", "finished_at"}
    assert result["pid"] == envelope["worker"]
    assert result["pid"] in before  # a pool worker ran it, not the service process
    assert result["pid"] != server.proc.pid
    assert result["ms"] >= 150
    assert result["finished_at"] > result["started_at"]
    # The work is real: the worker's CPU time, which it writes to the shared table, went up.
    after = {w["pid"]: w for w in http("GET", server.url + "/v1/workers").json()["workers"]}
    assert after[result["pid"]]["cpu_seconds"] > before[result["pid"]]["cpu_seconds"]

    zero = call(server, "burn", {"ms": 0})["result"]
    assert zero["ms"] >= 0 and zero["pid"] in before
    fractional = call(server, "burn", {"ms": 12.5})["result"]
    assert fractional["ms"] >= 12.5


def busy_workers(server: ServerProcess) -> list[dict[str, Any]]:
    return [w for w in http("GET", server.url + "/v1/workers").json()["workers"] if w["state"] == "busy"]


def test_two_burns_run_side_by_side_on_two_workers(server):
    # The first burn is long; the second starts once the first is seen running, so the only way for
    # them not to overlap is that the second waited for the first (one worker doing both).
    first_thread, first_box = run_in_thread(call, server, "burn", {"ms": 1500})
    wait_for(lambda: len(busy_workers(server)) == 1, 10, what="the first burn to be running")
    second = call(server, "burn", {"ms": 100})["result"]
    first = joined(first_thread, first_box)["result"]
    assert first["pid"] != second["pid"]
    assert {first["pid"], second["pid"]} <= worker_pids(server)
    # Overlap: each one started before the other finished.
    assert second["started_at"] < first["finished_at"]
    assert first["started_at"] < second["finished_at"]


# -- sha256 ---------------------------------------------------------------------------------------


def reference_sha256(data: bytes, rounds: int = 1) -> str:
    digest = hashlib.sha256(data).digest()
    for _ in range(rounds - 1):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


BINARY_SAMPLES = {
    "empty": b"",
    "every-byte": bytes(range(256)) * 3 + b"\x00\r\n\r\n\xff\xfe",
    "not-utf8": b"\xc3\x28\xa0\xa1\xe2\x28\xa1",
    "three-mib": os.urandom(3 * 1024 * 1024 + 7),  # more than one read chunk
}


@pytest.mark.parametrize("name", BINARY_SAMPLES)
@pytest.mark.parametrize("rounds", [None, 1, 2, 7])
def test_sha256_of_a_binary_body(server, name, rounds):
    data = BINARY_SAMPLES[name]
    path = "/v1/tasks/sha256" + (f"?rounds={rounds}" if rounds is not None else "")
    reply = post_binary(server, path, data)
    assert reply.status == 200, reply.body
    envelope = reply.json()
    assert envelope["task"] == "sha256"
    assert envelope["result"] == reference_sha256(data, rounds or 1)


def test_sha256_many_rounds_hash_the_previous_raw_digest(server):
    data = b"procbridge"
    reply = post_binary(server, "/v1/tasks/sha256?rounds=1000000", data)
    assert reply.status == 200, reply.body
    assert reply.json()["result"] == reference_sha256(data, 10**6)
    # Hex-then-hash would be a different (wrong) chain: make sure the two differ at all.
    assert reference_sha256(data, 2) != hashlib.sha256(hashlib.sha256(data).hexdigest().encode()).hexdigest()


@pytest.mark.parametrize("text", ["", "hello", "héllo wörld ☃ 🐍", "line\nbreak\ttab\u0000nul", "x" * 100_000])
def test_sha256_of_a_json_string_hashes_its_utf8_text(server, text):
    assert call(server, "sha256", {"data": text})["result"] == reference_sha256(text.encode("utf-8"))
    assert call(server, "sha256", {"data": text, "rounds": 3})["result"] == reference_sha256(text.encode(), 3)


def test_sha256_json_escapes_decode_to_the_same_text(server):
    body = b'{"data": "\\u00e9\\ud83d\\udc0d", "rounds": 2}'
    reply = http("POST", server.url + "/v1/tasks/sha256", body, {"Content-Type": "application/json"})
    assert reply.status == 200, reply.body
    assert reply.json()["result"] == reference_sha256("é🐍".encode(), 2)


def test_sha256_chunked_binary_body(server):
    """A body sent with Transfer-Encoding: chunked (no Content-Length) arrives whole."""
    parts = [b"first part;", os.urandom(70_000), b"", b"last"]
    conn = httpclient.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(
            "POST", "/v1/tasks/sha256?rounds=2", body=iter([p for p in parts if p]),
            headers={"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, body
    assert json.loads(body)["result"] == reference_sha256(b"".join(parts), 2)


# -- mandelbrot -----------------------------------------------------------------------------------


def mandelbrot_png(server: ServerProcess, args: dict[str, Any]) -> Image.Image:
    reply = post_json(server.url + "/v1/tasks/mandelbrot", args)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "image/png"
    assert reply.body[:8] == b"\x89PNG\r\n\x1a\n"
    assert int(reply.headers["x-procbridge-worker"]) in worker_pids(server)
    image = Image.open(io.BytesIO(reply.body))
    image.load()  # decodes every chunk: a truncated or corrupt PNG fails here
    assert image.format == "PNG"
    return image


@pytest.mark.parametrize(("width", "height"), [(1, 1), (64, 48), (13, 200), (300, 7)])
def test_mandelbrot_is_a_png_of_the_requested_size(server, width, height):
    image = mandelbrot_png(server, {"width": width, "height": height, "max_iter": 64})
    assert image.size == (width, height)
    assert image.mode == "RGB"


def test_mandelbrot_draws_the_set(server):
    # The set is symmetric about the real axis: centred on y=0 with an even height, the image is
    # its own mirror image top to bottom. And it is a picture, not a flat colour.
    image = mandelbrot_png(server, {"width": 80, "height": 60, "max_iter": 100})
    rows = [[image.getpixel((x, y)) for x in range(80)] for y in range(60)]
    assert rows == rows[::-1]
    assert len({px for row in rows for px in row}) > 10
    # Points inside the set (they never escape: the main cardioid, the period-2 bulb) share one
    # colour; a point just outside it, near the neck, escapes after a while and looks different.
    def colour_at(x: float, y: float) -> Any:
        return mandelbrot_png(server, {"width": 1, "height": 1, "x": x, "y": y, "zoom": 1000.0}).getpixel((0, 0))

    assert colour_at(-0.5, 0.0) == colour_at(-1.0, 0.0) == colour_at(0.25, 0.0)
    assert colour_at(-0.75, 0.1) != colour_at(-0.5, 0.0)
    # Different views give different pictures.
    zoomed = mandelbrot_png(server, {"width": 80, "height": 60, "max_iter": 100, "x": -0.75, "y": 0.1, "zoom": 20.0})
    assert zoomed.tobytes() != image.tobytes()


# -- introspection --------------------------------------------------------------------------------


def test_tasks_listing_has_every_builtin_with_its_schema(server):
    tasks = {t["name"]: t for t in http("GET", server.url + "/v1/tasks").json()["tasks"]}
    assert set(BUILTINS) <= set(tasks)
    for name in BUILTINS:
        assert tasks[name]["doc"]
        assert tasks[name]["params"]["type"] == "object"
    primes = tasks["primes"]["params"]
    assert primes["required"] == ["limit"]
    assert primes["properties"]["limit"]["type"] == "integer"
    assert primes["properties"]["limit"]["minimum"] == 0
    assert primes["properties"]["limit"]["maximum"] == 10**8
    assert primes.get("additionalProperties") is False
    sha = tasks["sha256"]["params"]
    assert sha["required"] == ["data"]
    assert sha["properties"]["rounds"]["default"] == 1
    mandel = tasks["mandelbrot"]["params"]
    assert sorted(mandel["required"]) == ["height", "width"]
    assert set(mandel["properties"]) == {"width", "height", "max_iter", "x", "y", "zoom"}


def test_openapi_is_3_1_with_each_builtin_argument_schema(server):
    reply = http("GET", server.url + "/openapi.json")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("application/json")
    doc = reply.json()
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["title"] and doc["info"]["version"]
    listed = {t["name"]: t["params"] for t in http("GET", server.url + "/v1/tasks").json()["tasks"]}
    for name in BUILTINS:
        post = doc["paths"][f"/v1/tasks/{name}"]["post"]
        schema = post["requestBody"]["content"]["application/json"]["schema"]
        schema = resolve(doc, schema)
        assert set(schema["properties"]) == set(listed[name]["properties"]), name
        assert schema.get("required", []) == listed[name].get("required", []), name
        for status in ("400", "404", "413", "415", "422", "500", "503"):
            assert status in post["responses"], (name, status)
    assert doc["paths"]["/v1/tasks/primes"]["post"]["requestBody"]["content"]["application/json"]
    assert "application/octet-stream" in doc["paths"]["/v1/tasks/sha256"]["post"]["requestBody"]["content"]
    for path in ("/healthz", "/readyz", "/metrics", "/v1/tasks", "/v1/workers"):
        assert path in doc["paths"], path


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow a local $ref, if the schema is one."""
    ref = schema.get("$ref")
    if not ref:
        return schema
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return dict(node)


def test_workers_table_lists_every_worker_and_counts_their_tasks(server):
    listing = http("GET", server.url + "/v1/workers").json()
    assert listing["size"] == 2
    assert len(listing["workers"]) == 2
    live = {p.pid for p in server.descendants()}
    for w in listing["workers"]:
        assert w["pid"] in live
        assert w["state"] in ("starting", "idle", "busy")
        assert isinstance(w["tasks_done"], int) and w["tasks_done"] >= 0
        assert w["task"] is None or isinstance(w["task"], str)

    def all_idle() -> list[dict[str, Any]] | None:
        rows = http("GET", server.url + "/v1/workers").json()["workers"]
        return rows if all(w["state"] == "idle" for w in rows) else None

    idle = wait_for(all_idle, 10, what="every worker to be idle")
    assert all(w["task"] is None for w in idle)
    done_before = sum(w["tasks_done"] for w in idle)
    used = {call(server, "primes", {"limit": n})["worker"] for n in range(5)}
    after = http("GET", server.url + "/v1/workers").json()["workers"]
    assert sum(w["tasks_done"] for w in after) == done_before + 5
    assert used <= {w["pid"] for w in after}


def test_workers_table_shows_a_busy_worker_and_its_task(server):
    thread, box = run_in_thread(call, server, "burn", {"ms": 800})
    busy = wait_for(lambda: busy_workers(server), 10, what="a worker to be busy")
    assert busy[0]["task"] == "burn"
    result = joined(thread, box)["result"]
    assert busy[0]["pid"] == result["pid"]


def metric_samples(server: ServerProcess) -> dict[str, list[Any]]:
    reply = http("GET", server.url + "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    families: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        families[family.name] = [family.type, *family.samples]
    return families


def sample(families: dict[str, list[Any]], family: str, name: str, **labels: str) -> float | None:
    for s in families.get(family, [None])[1:]:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return None


def test_metrics_count_calls_outcomes_durations_workers_and_restarts(server_factory):
    server = server_factory("--workers", "2")
    for n in (10, 100, 1000):
        call(server, "primes", {"limit": n})
    call(server, "sha256", {"data": "abc"})
    # A call past its timeout: its worker is killed and replaced (a restart with reason timeout).
    timed_out = post_json(server.url + "/v1/tasks/burn?timeout=0.2", {"ms": 20_000})
    assert timed_out.status == 504, timed_out.body
    assert timed_out.json()["type"] == "/problems/task-timeout"
    # A refused call (422) never reaches a worker.
    assert post_json(server.url + "/v1/tasks/primes", {"limit": -1}).status == 422

    def settled() -> dict[str, list[Any]] | None:
        fams = metric_samples(server)
        replaced = sample(fams, "procbridge_worker_restarts", "procbridge_worker_restarts_total", reason="timeout")
        idle = sample(fams, "procbridge_workers", "procbridge_workers", state="idle")
        return fams if replaced == 1 and idle == 2 else None

    fams = wait_for(settled, 20, 0.05, "the timed-out worker to be replaced")
    assert fams["procbridge_tasks"][0] == "counter"
    assert sample(fams, "procbridge_tasks", "procbridge_tasks_total", task="primes", outcome="ok") == 3
    assert sample(fams, "procbridge_tasks", "procbridge_tasks_total", task="sha256", outcome="ok") == 1
    assert sample(fams, "procbridge_tasks", "procbridge_tasks_total", task="burn", outcome="task-timeout") == 1

    assert fams["procbridge_task_duration_seconds"][0] == "histogram"
    duration = "procbridge_task_duration_seconds"
    assert sample(fams, duration, duration + "_count", task="primes") == 3
    assert sample(fams, duration, duration + "_bucket", task="primes", le="+Inf") == 3
    total = sample(fams, duration, duration + "_sum", task="primes")
    assert total is not None and total > 0

    assert fams["procbridge_pending_tasks"][0] == "gauge"
    assert sample(fams, "procbridge_pending_tasks", "procbridge_pending_tasks") == 0
    assert fams["procbridge_workers"][0] == "gauge"
    assert sample(fams, "procbridge_workers", "procbridge_workers", state="busy") == 0
    assert sample(fams, "procbridge_workers", "procbridge_workers", state="starting") == 0
    assert fams["procbridge_worker_restarts"][0] == "counter"
    assert sample(fams, "procbridge_worker_restarts", "procbridge_worker_restarts_total", reason="crashed") == 0
    assert fams["procbridge_event_loop_lag_seconds"][0] == "gauge"
    lag = sample(fams, "procbridge_event_loop_lag_seconds", "procbridge_event_loop_lag_seconds")
    assert lag is not None and lag >= 0

    # The replacement took over the slot: still two live workers, one of them new.
    assert post_json(server.url + "/v1/tasks/primes", {"limit": 10}).status == 200
    assert http("GET", server.url + "/v1/workers").json()["size"] == 2


def test_metrics_see_pending_and_busy_work(server_factory):
    server = server_factory("--workers", "1", "--max-pending", "4")
    running, running_box = run_in_thread(call, server, "burn", {"ms": 2000})
    wait_for(lambda: busy_workers(server), 10, what="the worker to be busy")
    queued, queued_box = run_in_thread(call, server, "primes", {"limit": 10})

    def pending_one() -> bool:
        fams = metric_samples(server)
        return (
            sample(fams, "procbridge_pending_tasks", "procbridge_pending_tasks") == 1
            and sample(fams, "procbridge_workers", "procbridge_workers", state="busy") == 1
        )

    wait_for(pending_one, 10, 0.02, "one call to be queued behind the busy worker")
    assert joined(running, running_box)["result"]["ms"] >= 2000
    assert joined(queued, queued_box)["result"] == 4
    fams = metric_samples(server)
    assert sample(fams, "procbridge_pending_tasks", "procbridge_pending_tasks") == 0
