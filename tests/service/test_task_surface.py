"""The task surface over HTTP, in-process (create_app on aiohttp's test server, the real pool): rich
arguments reach the task as the objects its hints name (the worker rebuilt them), query-string
values typed as declared, base64 bytes in calls and maps, a bare POST, GET /v1/tasks/{name}, and a
415 that offers application/octet-stream only where it is taken."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from service.app import create_app
from service.config import Config
from tests.conftest import started_client

TASKS = "tests.support.argument_tasks"
OCTET = {"Content-Type": "application/octet-stream"}

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def make_client(aiohttp_client, tmp_path) -> MakeClient:
    async def make(**settings: Any) -> TestClient[Any, Any]:
        config = Config(**{"workers": 1, "store": str(tmp_path / "jobs.db"), "tasks": (TASKS,), **settings})
        client: TestClient[Any, Any] = await started_client(aiohttp_client, create_app(config))
        return client

    return make


async def call(client: TestClient[Any, Any], name: str, args: Any) -> tuple[int, Any]:
    resp = await client.post(f"/v1/tasks/{name}", data=orjson.dumps(args), headers={"Content-Type": "application/json"})
    return resp.status, orjson.loads(await resp.read())


async def test_object_arguments_reach_the_task_as_the_objects_its_hints_name(make_client):
    client = await make_client()
    status, body = await call(client, "at_shapes", {
        "point": {"x": 1}, "polygon": {"name": "tri", "points": [{"x": 0, "y": 1}]}, "size": {"w": 2, "h": 3},
        "style": {"color": "green", "origin": {"x": 2.5}},
    })
    assert status == 200, body
    result = body["result"]
    assert result["point"] == {"type": "Point", "fields": {"x": 1.0, "y": 0.0}}
    assert result["polygon"] == {"type": "Polygon", "fields": {
        "name": "tri", "points": [{"type": "Point", "fields": {"x": 0.0, "y": 1.0}}]}}
    assert result["size"] == {"type": "dict", "items": {"w": 2, "h": 3}}  # a TypedDict stays a dict
    assert result["style"] == {"type": "Style", "fields": {
        "color": "green", "width": 1.0, "origin": {"type": "Point", "fields": {"x": 2.5, "y": 0.0}}}}

    status, body = await call(client, "at_shapes", {"point": {"x": -1, "y": 2}})  # the function's defaults
    assert status == 200, body
    assert body["result"]["style"] == {"type": "Style", "fields": {"color": "red", "width": 1.0, "origin": None}}
    assert body["result"]["polygon"] is None

    status, body = await call(client, "at_shapes", {"point": {"x": 1, "z": 0}})
    assert (status, body["errors"]) == (422, [{"field": "point.z", "message": "unknown field"}])


async def test_enums_datetimes_and_tuples_are_rebuilt_in_the_worker(make_client):
    client = await make_client()
    status, body = await call(client, "at_literals", {"size": 64, "flag": True, "ratio": 1.5, "mode": "slow"})
    assert status == 200, body
    assert body["result"] == {"size": 64, "flag": True, "ratio": 1.5, "name": "a",
                              "mode": {"type": "Mode", "repr": "<Mode.SLOW: 'slow'>"}}
    status, body = await call(client, "at_when", {"when": "2024-01-02T03:04:05+00:00", "span": [3, 4]})
    assert status == 200, body
    assert body["result"] == {
        "when": {"type": "datetime", "repr": "datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=TzInfo(0))"},
        "span": {"type": "tuple", "repr": "(3, 4)"},
    }


async def test_a_binary_call_types_its_query_arguments_as_declared(make_client):
    client = await make_client()
    query = "?size=256&scale=0.5&level=9&verbose=on&count=&box=%7B%22w%22%3A1%2C%22h%22%3A2%7D&anchor=%7B%22x%22%3A3%7D"
    resp = await client.post(f"/v1/tasks/at_blob{query}", data=b"\x89PNG-ish", headers=OCTET)
    body = orjson.loads(await resp.read())
    assert resp.status == 200, body
    assert body["result"] == {
        "length": 8, "head": b"\x89PNG-ish".hex(), "size": 256, "scale": 0.5, "level": 9, "verbose": True,
        "label": None, "count": None, "box": {"type": "dict", "items": {"w": 1, "h": 2}},
        "anchor": {"type": "Point", "fields": {"x": 3.0, "y": 0.0}}, "tags": None,
    }
    resp = await client.post("/v1/tasks/at_blob?size=65", data=b"x", headers=OCTET)
    problem = orjson.loads(await resp.read())
    assert (resp.status, problem["errors"][0]["field"]) == (422, "size")


async def test_base64_bytes_work_in_a_call_and_in_a_map(make_client):
    client = await make_client()
    status, body = await call(client, "at_blob", {"data": {"base64": "AAEC/w=="}, "size": 128})
    assert status == 200, body
    assert (body["result"]["length"], body["result"]["head"], body["result"]["size"]) == (4, "000102ff", 128)

    items = [{"data": {"base64": "AAEC/w=="}}, {"data": {"base64": "AAEC/w="}}, {"data": "text"}]
    resp = await client.post("/v1/tasks/at_blob/map", data=orjson.dumps({"items": items}),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 200
    lines = [orjson.loads(line) for line in (await resp.read()).splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert lines[0]["result"]["head"] == "000102ff"
    assert lines[1]["error"]["status"] == 422 and lines[1]["error"]["errors"][0]["field"] == "data"
    assert lines[2]["result"]["head"] == b"text".hex()


async def test_a_bare_post_runs_a_task_without_required_arguments(make_client):
    client = await make_client()
    resp = await client.post("/v1/tasks/at_nothing", skip_auto_headers=["Content-Type"])
    body = orjson.loads(await resp.read())
    assert (resp.status, body["result"]) == (200, "hello"), body

    resp = await client.post("/v1/tasks/primes", skip_auto_headers=["Content-Type"])
    problem = orjson.loads(await resp.read())
    assert (resp.status, problem["type"]) == (422, "/problems/invalid-arguments")
    assert problem["errors"] == [{"field": "limit", "message": "required argument is missing"}]
    assert "JSON object" in problem["detail"]

    # a body without a Content-Type is not bare: still 415
    resp = await client.post("/v1/tasks/at_nothing", data=b'{"greeting": "hi"}', skip_auto_headers=["Content-Type"])
    assert resp.status == 415


async def test_the_415_offers_octet_stream_only_to_tasks_with_a_bytes_parameter(make_client):
    client = await make_client()
    for name, offered in (("primes", False), ("at_shapes", False), ("sha256", True), ("at_blob", True)):
        resp = await client.post(f"/v1/tasks/{name}", data=b"x", headers={"Content-Type": "text/plain"})
        problem = orjson.loads(await resp.read())
        assert resp.status == 415
        assert ("application/octet-stream" in problem["detail"]) is offered, (name, problem["detail"])
    resp = await client.post("/v1/tasks/primes", data=b"x", headers=OCTET)
    problem = orjson.loads(await resp.read())
    assert resp.status == 415 and "takes no binary body" in problem["detail"]


async def test_get_one_task_answers_its_list_entry_or_404(make_client):
    client = await make_client()
    listed = {t["name"]: t for t in (await (await client.get("/v1/tasks")).json())["tasks"]}
    for name in ("primes", "at_shapes", "at_blob"):
        resp = await client.get(f"/v1/tasks/{name}")
        assert resp.status == 200
        assert await resp.json() == listed[name]
    resp = await client.get("/v1/tasks/nope")
    problem = orjson.loads(await resp.read())
    assert (resp.status, problem["type"]) == (404, "/problems/unknown-task")
