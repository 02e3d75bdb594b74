"""The HTTP API in-process: `create_app(config)` served by aiohttp's test server on loopback, with the
real worker pool (started by the app's startup hook). Checks the contract of docs/api.md:
envelopes, binary bodies, problem+json errors, the task list, OpenAPI, readiness and draining,
admission control, metrics, and that apps are independent of one another."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.config import Config
from service.state import SERVICE
from tests.conftest import started_client, wait_until

BUILTINS = {"primes", "burn", "sha256", "mandelbrot"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def make_client(aiohttp_client, tmp_path) -> MakeClient:
    """A test client for a fresh app; its pool starts now and stops when the test ends."""

    async def make(**settings: Any) -> TestClient[Any, Any]:
        config = Config(**{"workers": 1, "store": str(tmp_path / "jobs.db"), **settings})
        client: TestClient[Any, Any] = await started_client(aiohttp_client, create_app(config))
        return client

    return make




async def call(client: TestClient[Any, Any], name: str, args: Any, query: str = "") -> Any:
    return await client.post(f"/v1/tasks/{name}{query}", data=orjson.dumps(args),
                             headers={"Content-Type": "application/json"})


async def expect_problem(resp: Any, status: int, slug: str | None) -> dict[str, Any]:
    """An RFC 9457 problem with this status (and slug, when given)."""
    body = await resp.read()
    assert resp.status == status, body
    assert resp.content_type == "application/problem+json"
    problem = orjson.loads(body)
    assert {"type", "title", "status", "detail"} <= set(problem)
    assert problem["status"] == status
    assert problem["type"].startswith("/problems/")
    if slug is not None:
        assert problem["type"] == f"/problems/{slug}"
    assert isinstance(problem["title"], str) and problem["title"]
    assert isinstance(problem["detail"], str) and problem["detail"]
    return problem


def worker_pids() -> set[int]:
    return {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}


async def live_workers(client: TestClient[Any, Any]) -> set[int]:
    resp = await client.get("/v1/workers")
    assert resp.status == 200
    return {w["pid"] for w in (await resp.json())["workers"] if w["pid"]}


async def metric(client: TestClient[Any, Any], name: str, **labels: str) -> float:
    resp = await client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


# -- calling tasks -----------------------------------------------------------------------------------


async def test_json_calls_return_the_envelope(make_client):
    client = await make_client(workers=2)
    expected = {
        "primes": ({"limit": 100}, 25),
        "sha256": ({"data": "abc"}, hashlib.sha256(b"abc").hexdigest()),
    }
    workers = await live_workers(client)
    assert len(workers) == 2
    assert workers <= worker_pids()
    listing = await (await client.get("/v1/workers")).json()
    assert (listing["size"], listing["min"], listing["max"]) == (2, 2, 2)  # a fixed pool: its bounds are its size
    for name, (args, result) in expected.items():
        resp = await call(client, name, args)
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert set(body) == {"task", "result", "worker", "elapsed_ms"}
        assert body["task"] == name
        assert body["result"] == result
        assert body["worker"] in workers
        assert isinstance(body["elapsed_ms"], int | float) and body["elapsed_ms"] >= 0

    resp = await call(client, "burn", {"ms": 5})
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"task", "result", "worker", "elapsed_ms"}
    assert body["task"] == "burn"
    assert body["result"]["pid"] == body["worker"]
    assert body["result"]["ms"] >= 5
    assert body["worker"] in workers


async def test_sha256_rounds_over_json(make_client):
    client = await make_client()
    resp = await call(client, "sha256", {"data": "abc", "rounds": 3})
    digest = hashlib.sha256(b"abc").digest()
    for _ in range(2):
        digest = hashlib.sha256(digest).digest()
    assert (await resp.json())["result"] == digest.hex()


async def test_binary_call_of_sha256(make_client):
    client = await make_client()
    data = bytes(range(256)) * 1000
    resp = await client.post("/v1/tasks/sha256?rounds=2&timeout=30", data=data,
                             headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["task"] == "sha256"
    assert body["result"] == hashlib.sha256(hashlib.sha256(data).digest()).hexdigest()
    assert body["worker"] in await live_workers(client)

    resp = await client.post("/v1/tasks/sha256", data=b"", headers={"Content-Type": "application/octet-stream"})
    assert (await resp.json())["result"] == hashlib.sha256(b"").hexdigest()


async def test_binary_call_argument_errors(make_client):
    client = await make_client()
    octet = {"Content-Type": "application/octet-stream"}
    problem = await expect_problem(await client.post("/v1/tasks/sha256?rounds=abc", data=b"x", headers=octet),
                                   422, "invalid-arguments")
    assert "rounds" in problem["detail"]
    problem = await expect_problem(await client.post("/v1/tasks/sha256?data=abc", data=b"x", headers=octet),
                                   422, "invalid-arguments")
    assert "data" in problem["detail"]
    await expect_problem(await client.post("/v1/tasks/primes?limit=5", data=b"x", headers=octet),
                         415, "unsupported-media-type")


async def test_mandelbrot_returns_a_png(make_client):
    client = await make_client()
    resp = await call(client, "mandelbrot", {"width": 32, "height": 24, "max_iter": 50})
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "image/png"
    data = await resp.read()
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (32, 24)
    assert int(resp.headers["X-Procbridge-Worker"]) in await live_workers(client)


async def test_timeout_query_parameter(make_client):
    client = await make_client()
    resp = await call(client, "primes", {"limit": 10}, "?timeout=30")
    assert resp.status == 200
    assert (await resp.json())["result"] == 4
    for bad in ("abc", "0", "-1", "nan", "inf"):
        problem = await expect_problem(await call(client, "primes", {"limit": 10}, f"?timeout={bad}"),
                                       422, "invalid-arguments")
        assert "timeout" in problem["detail"]


async def test_task_past_its_timeout_is_504_and_its_worker_replaced(make_client):
    client = await make_client()
    before = await live_workers(client)
    await expect_problem(await call(client, "burn", {"ms": 600_000}, "?timeout=0.2"), 504, "task-timeout")
    resp = await call(client, "primes", {"limit": 10})  # waits for the replacement worker
    assert resp.status == 200
    assert (await resp.json())["worker"] not in before
    assert await metric(client, "procbridge_tasks_total", task="burn", outcome="task-timeout") == 1
    assert await metric(client, "procbridge_worker_restarts_total", reason="timeout") == 1


# -- errors ------------------------------------------------------------------------------------------


async def test_invalid_json_is_400(make_client):
    client = await make_client()
    json_type = {"Content-Type": "application/json"}
    for body in (b"{", b"[1, 2]", b"5", b"", b"null", b'"limit"'):
        await expect_problem(await client.post("/v1/tasks/primes", data=body, headers=json_type),
                             400, "invalid-json")


async def test_unknown_task_is_404(make_client):
    client = await make_client()
    problem = await expect_problem(await call(client, "nope", {}), 404, "unknown-task")
    assert "nope" in problem["detail"]


async def test_unknown_routes_and_methods_are_problems(make_client):
    client = await make_client()
    await expect_problem(await client.get("/no/such/route"), 404, None)
    await expect_problem(await client.get("/v1/tasks/primes/extra"), 404, None)
    resp = await client.put("/v1/tasks/primes")
    await expect_problem(resp, 405, None)
    assert "POST" in resp.headers.get("Allow", "")
    await expect_problem(await client.delete("/v1/tasks"), 405, None)


async def test_each_task_has_a_plain_route_and_other_names_meet_the_pattern(make_client):
    """A task's calls take aiohttp's plain-path lookup (no regex per call); the {name} pattern
    remains for every other name, which it answers with 404 unknown-task."""
    client = await make_client()
    resources = {r.canonical: r for r in client.app.router.resources()}
    for name in BUILTINS:
        assert isinstance(resources[f"/v1/tasks/{name}"], web.PlainResource), name
    assert isinstance(resources["/v1/tasks/{name}"], web.DynamicResource)
    resp = await call(client, "primes", {"limit": 10})
    assert resp.status == 200 and orjson.loads(await resp.read())["result"] == 4
    await expect_problem(await call(client, "primes2", {}), 404, "unknown-task")


async def test_body_over_max_body_is_413(make_client):
    client = await make_client(max_body=100)
    small = {"data": "x" * 50}
    assert (await call(client, "sha256", small)).status == 200
    await expect_problem(await call(client, "sha256", {"data": "x" * 200}), 413, "payload-too-large")
    octet = {"Content-Type": "application/octet-stream"}
    await expect_problem(await client.post("/v1/tasks/sha256", data=b"x" * 101, headers=octet),
                         413, "payload-too-large")

    async def chunks() -> Any:  # no Content-Length: the limit holds while reading
        for _ in range(10):
            yield b"x" * 50

    await expect_problem(await client.post("/v1/tasks/sha256", data=chunks(), headers=octet),
                         413, "payload-too-large")


async def test_unsupported_media_types_are_415(make_client):
    client = await make_client()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        await expect_problem(await client.post("/v1/tasks/primes", data=b'{"limit": 5}',
                                               headers={"Content-Type": ctype}), 415, "unsupported-media-type")
    resp = await client.post("/v1/tasks/primes", data=b'{"limit": 5}', skip_auto_headers=["Content-Type"])
    await expect_problem(resp, 415, "unsupported-media-type")
    resp = await client.post("/v1/tasks/primes", data=b'{"limit": 5}',
                             headers={"Content-Type": "application/json; charset=utf-8"})
    assert resp.status == 200


async def test_invalid_arguments_are_422_naming_the_field(make_client):
    client = await make_client()
    for args, field in [({"limit": "5"}, "limit"), ({"limit": -1}, "limit"), ({}, "limit"),
                        ({"limit": 5, "extra": 1}, "extra"), ({"limit": 10**8 + 1}, "limit")]:
        problem = await expect_problem(await call(client, "primes", args), 422, "invalid-arguments")
        assert field in problem["detail"]
        assert field in [e["field"] for e in problem["errors"]]
    problem = await expect_problem(await call(client, "primes", {"limit": 5}, "?limit=6"), 422, "invalid-arguments")
    assert "limit" in problem["detail"]


# -- listing and describing tasks --------------------------------------------------------------------


async def test_task_list(make_client):
    client = await make_client()
    resp = await client.get("/v1/tasks")
    assert resp.status == 200
    tasks = (await resp.json())["tasks"]
    assert {t["name"] for t in tasks} == BUILTINS
    for t in tasks:
        assert set(t) >= {"name", "doc", "params"}
        assert isinstance(t["doc"], str) and t["doc"]
        assert t["params"]["type"] == "object"
        assert t["params"]["additionalProperties"] is False
    by_name = {t["name"]: t for t in tasks}
    assert by_name["primes"]["params"]["required"] == ["limit"]
    assert by_name["primes"]["params"]["properties"]["limit"]["maximum"] == 10**8


def resolve_refs(doc: dict[str, Any], node: Any) -> None:
    """Every "$ref" in the document points at something in it."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            assert ref.startswith("#/"), ref
            target: Any = doc
            for part in ref[2:].split("/"):
                assert isinstance(target, dict) and part in target, f"dangling $ref {ref}"
                target = target[part]
        for value in node.values():
            resolve_refs(doc, value)
    elif isinstance(node, list):
        for value in node:
            resolve_refs(doc, value)


async def test_openapi_document(make_client):
    client = await make_client()
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["title"]
    tasks = {t["name"]: t for t in (await (await client.get("/v1/tasks")).json())["tasks"]}
    for name, listed in tasks.items():
        op = doc["paths"][f"/v1/tasks/{name}"]["post"]
        content = op["requestBody"]["content"]
        assert content["application/json"]["schema"] == listed["params"]
        assert ("application/octet-stream" in content) == (name == "sha256")
        assert {"200", "400", "404", "413", "415", "422", "503", "504"} <= set(op["responses"])
    for path in ("/healthz", "/readyz", "/metrics", "/v1/tasks", "/v1/tasks/{name}", "/v1/workers"):
        assert path in doc["paths"]
    resolve_refs(doc, doc)
    assert (await client.get("/openapi.json")).status == 200  # served again from the cached copy


# -- readiness, draining, admission --------------------------------------------------------------------


async def test_health_and_readiness(make_client):
    client = await make_client()
    health = await client.get("/healthz")
    assert health.status == 200
    assert await health.json() == {"status": "ok"}
    assert (await client.get("/readyz")).status == 200

    client.app[SERVICE].draining = True
    try:
        assert (await client.get("/readyz")).status == 503
        assert (await client.get("/healthz")).status == 200  # alive, just not taking work
        resp = await call(client, "primes", {"limit": 10})
        await expect_problem(resp, 503, "draining")
        assert int(resp.headers["Retry-After"]) >= 1
    finally:
        client.app[SERVICE].draining = False
    assert (await client.get("/readyz")).status == 200
    assert (await call(client, "primes", {"limit": 10})).status == 200


async def test_flood_beyond_max_pending_is_503_overloaded(make_client):
    client = await make_client(workers=1, max_pending=1)

    async def busy() -> bool:
        resp = await client.get("/v1/workers")
        return any(w["state"] == "busy" for w in (await resp.json())["workers"])

    async def queued() -> bool:
        return await metric(client, "procbridge_pending_tasks") == 1

    # One call runs (a long burn), one waits: the single worker and the queue of one are both taken.
    running = asyncio.ensure_future(call(client, "burn", {"ms": 2000}))
    await wait_until(busy, what="the worker to be busy")
    waiting = asyncio.ensure_future(call(client, "burn", {"ms": 1}))
    await wait_until(queued, what="one call to be queued")

    flood = await asyncio.gather(*(call(client, "primes", {"limit": 10}) for _ in range(5)))
    for resp in flood:
        await expect_problem(resp, 503, "overloaded")
        assert int(resp.headers["Retry-After"]) >= 1

    first, second = await asyncio.gather(running, waiting)
    assert first.status == 200 and second.status == 200
    one, two = await first.json(), await second.json()
    assert one["task"] == two["task"] == "burn"
    assert one["worker"] == two["worker"]  # the one worker ran both
    assert (await call(client, "primes", {"limit": 10})).status == 200  # and the service recovers


# -- metrics ---------------------------------------------------------------------------------------


async def test_metrics_count_outcomes_per_task(make_client):
    client = await make_client()
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    text = await resp.text()
    for name in ("procbridge_tasks_total", "procbridge_task_duration_seconds", "procbridge_pending_tasks",
                 "procbridge_workers", "procbridge_worker_restarts_total", "procbridge_event_loop_lag_seconds"):
        assert name in text, name

    ok_before = await metric(client, "procbridge_tasks_total", task="primes", outcome="ok")
    assert (await call(client, "primes", {"limit": 10})).status == 200
    assert (await call(client, "primes", {"limit": "ten"})).status == 422
    assert await metric(client, "procbridge_tasks_total", task="primes", outcome="ok") == ok_before + 1
    assert await metric(client, "procbridge_task_duration_seconds_count", task="primes") == 1
    assert await metric(client, "procbridge_tasks_total", task="burn", outcome="ok") == 0
    assert await metric(client, "procbridge_workers", state="idle") == 1
    assert await metric(client, "procbridge_pending_tasks") == 0


# -- apps are independent ----------------------------------------------------------------------------


async def test_two_apps_one_after_the_other(make_client):
    first = await make_client()
    resp = await call(first, "primes", {"limit": 100})
    assert resp.status == 200
    first_worker = (await resp.json())["worker"]
    assert await metric(first, "procbridge_tasks_total", task="primes", outcome="ok") == 1
    await first.close()  # runs the app's cleanup: its pool stops

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    async def first_workers_gone() -> bool:
        return gone(first_worker)

    await wait_until(first_workers_gone, what="the first app's worker to exit")

    second = await make_client()
    resp = await call(second, "primes", {"limit": 100})
    assert resp.status == 200
    assert (await resp.json())["result"] == 25
    assert (await resp.json())["worker"] != first_worker
    # metrics are the second app's own: the first app's call is not counted here
    assert await metric(second, "procbridge_tasks_total", task="primes", outcome="ok") == 1
    assert (await second.get("/readyz")).status == 200


def test_the_no_keys_warning_is_for_addresses_beyond_loopback():
    from service.server import _loopback

    assert all(_loopback(a) for a in ("127.0.0.1", "127.0.0.2", "127.255.0.9", "::1"))
    assert not any(_loopback(a) for a in ("0.0.0.0", "::", "10.0.0.7", "192.168.1.2", "fe80::1%eth0", "not-an-ip"))
