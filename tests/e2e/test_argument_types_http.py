"""Argument types with the real server (`python -m service serve --tasks tests.support.argument_tasks`):
a job whose arguments are base64 bytes and a dataclass (stored as plain JSON, rebuilt in the worker
when it runs), a binary call whose query string carries a Literal and JSON text, the same calls on a
Dask cluster, and schemathesis fuzzing every operation of these tasks from /openapi.json (the
document stays valid and true for every new kind of argument)."""

from __future__ import annotations

import base64
import json
import sqlite3
import textwrap
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import schemathesis

from tests.conftest import ServerProcess, http, post_json, serving, start_server
from tests.e2e.test_fuzz import fuzz_operation
from tests.e2e.test_jobs import submit, wait_final

TASKS = "tests.support.argument_tasks"
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(tmp_path_factory.mktemp("argument_types"), "--workers", "2", "--tasks", TASKS) as srv:
        yield srv


def test_a_job_takes_base64_bytes_and_a_dataclass_and_stores_them_as_plain_json(server):
    args = {"data": {"base64": base64.b64encode(IMAGE).decode()}, "anchor": {"x": 2}, "size": 256}
    created = submit(server.url, "at_blob", args)
    assert created.status == 202, created.body
    final = wait_final(server.url, created.json()["id"])
    assert final["status"] == "succeeded", final
    assert final["result"]["length"] == len(IMAGE) and final["result"]["head"] == IMAGE[:8].hex()
    assert final["result"]["anchor"] == {"type": "Point", "fields": {"x": 2.0, "y": 0.0}}
    assert final["result"]["size"] == 256

    bad = submit(server.url, "at_blob", {"data": {"base64": "not base64!"}})
    assert bad.status == 422 and bad.json()["errors"][0]["field"] == "data", bad.body

    # what the store keeps is the JSON the client sent, nothing pickled
    store = sqlite3.connect(server.log_path.parent / "jobs.db")
    try:
        tables = [row[0] for row in store.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        texts = [str(value) for table in tables for row in store.execute(f"SELECT * FROM {table}") for value in row]
    finally:
        store.close()
    assert any(args["data"]["base64"] in text for text in texts)


def test_a_binary_call_takes_a_literal_and_json_text_from_the_query_string(server):
    query = urllib.parse.urlencode({"size": "64", "verbose": "true", "anchor": '{"x": 1, "y": 2}', "tags": '["a"]'})
    reply = http("POST", f"{server.url}/v1/tasks/at_blob?{query}", IMAGE, {"Content-Type": "application/octet-stream"})
    assert reply.status == 200, reply.body
    result = reply.json()["result"]
    assert (result["size"], result["verbose"], result["tags"]) == (64, True, ["a"])
    assert result["anchor"] == {"type": "Point", "fields": {"x": 1.0, "y": 2.0}}
    reply = http("POST", f"{server.url}/v1/tasks/at_blob?size=100", IMAGE, {"Content-Type": "application/octet-stream"})
    assert reply.status == 422 and reply.json()["errors"][0]["field"] == "size"


def test_the_openapi_document_of_every_argument_type_holds_under_fuzzing(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    ours = [op for op in operations if "/at_" in op.path or op.path == "/v1/tasks/{name}"]
    assert len(ours) >= 11, [op.label for op in ours]
    session = requests.Session()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    for operation in ours:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            found = fuzz_operation(operation, mode, server.url, session, statuses)
            failures.extend(f"[{mode.value}] {f}" for f in found)
    assert not failures, "\n".join(dict.fromkeys(failures))
    assert statuses[200] > 0 and statuses[422] > 0, statuses  # it really ran, both ways
    assert post_json(server.url + "/v1/tasks/at_nothing", {}).json()["result"] == "hello"


def test_a_bare_post_from_a_plain_http_client_runs_a_task_without_required_arguments(server):
    for headers in ({}, {"Content-Length": "0"}):
        reply = http("POST", server.url + "/v1/tasks/at_nothing", None, headers)
        assert reply.status == 200 and reply.json()["result"] == "hello", (headers, reply.body)
    reply = http("POST", server.url + "/v1/tasks/primes", None, {})
    assert reply.status == 422 and reply.json()["errors"] == [
        {"field": "limit", "message": "required argument is missing"}]


def test_rich_arguments_on_a_dask_cluster(tmp_path: Path, server_factory: Callable[..., ServerProcess]) -> None:
    pytest.importorskip("distributed")
    from tests.support.dask_cluster import DaskProcesses

    dask = DaskProcesses(tmp_path / "dask")
    try:
        dask.start_scheduler()
        dask.start_worker(nthreads=1)
        srv = server_factory("--executor", dask.url, "--tasks", TASKS)
        reply = post_json(srv.url + "/v1/tasks/at_shapes", {"point": {"x": 1}, "style": {"origin": {"x": 3}}})
        assert reply.status == 200, reply.body
        assert reply.json()["result"]["point"] == {"type": "Point", "fields": {"x": 1.0, "y": 0.0}}
        assert reply.json()["result"]["style"]["fields"]["origin"]["type"] == "Point"
        reply = post_json(srv.url + "/v1/tasks/at_blob", {"data": {"base64": "AAEC/w=="}, "anchor": {"x": 5}})
        assert reply.status == 200, reply.body
        assert reply.json()["result"]["head"] == "000102ff"
        octet = {"Content-Type": "application/octet-stream"}
        reply = http("POST", srv.url + "/v1/tasks/at_blob?size=128", b"xyz", octet)
        assert reply.status == 200 and reply.json()["result"]["size"] == 128, reply.body
        lines = post_json(srv.url + "/v1/tasks/at_literals/map", {"items": [{"mode": "slow"}, {"size": 3}]}).body
        first, second = (json.loads(line) for line in lines.splitlines())
        assert first["result"]["mode"]["type"] == "Mode" and second["error"]["status"] == 422
    finally:
        dask.close()


REFUSED_MODULE = textwrap.dedent('''
    from workers import task


    class Picture:
        pass


    @task
    def resize(img: Picture, width: int = 10) -> int:
        return width
''')


def test_a_hint_the_service_cannot_serve_stops_start_up_naming_task_parameter_and_remedy(tmp_path: Path) -> None:
    (tmp_path / "pb_refused.py").write_text(REFUSED_MODULE)
    srv = start_server(tmp_path, "--tasks", "pb_refused", env={"PYTHONPATH": str(tmp_path)}, wait_ready=False)
    try:
        assert srv.proc.wait(60) != 0
    finally:
        srv.kill_all()
    log = srv.log()
    assert ("cannot start: task 'resize' (pb_refused.resize): parameter 'img' is annotated Picture: "
            "<class 'pb_refused.Picture'>, which is not JSON data; use a JSON type (int, float, str, bool, a list, "
            "a dict, a Literal, an optional), a dataclass, a TypedDict or a pydantic model instead") in log, log
    assert "arbitrary_types_allowed" not in log
