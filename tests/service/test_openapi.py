"""The OpenAPI document describes every response the service really gives: each operation lists the
problems any request may get (malformed HTTP, header floods, connection limits), the /v1/ ones the
auth and rate-limit answers and a bearer security requirement, the ones with a body the body's own
problems; the probes stay open. (tests/e2e/test_fuzz.py checks real responses against it.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.openapi import build_openapi
from service.problems import TITLES
from service.validation import TaskCatalog
from workers import registry

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return dict(orjson.loads(build_openapi(TaskCatalog(registry.load(())))))


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]


def test_bearer_security_on_v1_and_open_probes(doc):
    assert doc["components"]["securitySchemes"]["bearer"] == {
        **doc["components"]["securitySchemes"]["bearer"], "type": "http", "scheme": "bearer"}
    for path, method, op in operations(doc):
        if path.startswith("/v1/"):
            assert op["security"] == [{"bearer": []}], (path, method)
            assert "401" in op["responses"] and "429" in op["responses"], (path, method)
        else:
            assert op["security"] == [], (path, method)
            assert "401" not in op["responses"], (path, method)
    assert {"/healthz", "/readyz", "/metrics", "/openapi.json"} <= {p for p, _, _ in operations(doc)}


def test_without_keys_the_bearer_key_is_optional():
    doc = orjson.loads(build_openapi(TaskCatalog(registry.load(())), keys_required=False))
    for path, method, op in operations(doc):
        assert op["security"] == ([{"bearer": []}, {}] if path.startswith("/v1/") else []), (path, method)


def test_every_operation_documents_the_problems_any_request_may_get(doc):
    for path, method, op in operations(doc):
        responses = op["responses"]
        for status in ("400", "414", "431", "500", "503"):
            content = responses[status]["content"]
            assert content["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}, (
                path, method, status)
        if "requestBody" in op:
            for status in ("408", "413", "415"):
                assert "application/problem+json" in responses[status]["content"], (path, method, status)


def test_statuses_keep_their_own_content_beside_the_problem(doc):
    readyz = doc["paths"]["/readyz"]["get"]["responses"]["503"]
    assert set(readyz["content"]) == {"application/json", "application/problem+json"}
    assert "too-many-connections" in readyz["description"] and "draining" in readyz["description"]
    call = doc["paths"]["/v1/tasks/primes"]["post"]["responses"]
    assert "invalid-json" in call["400"]["description"] and "bad-request" in call["400"]["description"]
    assert {"200", "400", "401", "404", "408", "413", "415", "422", "429", "500", "502", "503", "504"} <= set(call)


def test_every_slug_named_in_the_document_has_a_title(doc):
    for path, method, op in operations(doc):
        for status, response in op["responses"].items():
            if "application/problem+json" not in response.get("content", {}):
                continue
            description = response["description"]
            slugs = {re.split(r"[: ]", description)[0], *re.findall(r"; ([a-z]+(?:-[a-z]+)*):", description)}
            for slug in slugs - {"job-not-finished"}:  # "job-not-finished or job-failed": titled by its handler
                assert slug in TITLES, (path, method, status, slug)


def test_the_document_is_the_same_bytes_whatever_the_hash_seed():
    """Set and dict iteration order can follow string hashes, which differ per interpreter: two
    interpreters with different PYTHONHASHSEED must still write the very same bytes."""
    script = (
        "import sys; from service.openapi import build_openapi; from service.validation import TaskCatalog; "
        "from workers import registry; "
        "sys.stdout.buffer.write(build_openapi(TaskCatalog(registry.load(('tests.support.fault_tasks',)))))"
    )
    outputs = []
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, check=True)
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1] and orjson.loads(outputs[0])["openapi"] == "3.1.0"


def test_a_binary_call_documents_its_query_arguments(doc):
    """sha256(data: bytes, rounds=1): with an octet-stream body `rounds` comes from the query string."""
    op = doc["paths"]["/v1/tasks/sha256"]["post"]
    params = {p["name"]: p for p in op["parameters"]}
    assert set(params) == {"timeout", "rounds"}  # not `data`: that is the body
    rounds = params["rounds"]
    assert rounds["in"] == "query" and rounds["required"] is False
    body_schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert rounds["schema"] == body_schema["properties"]["rounds"]
    bounds = {k: rounds["schema"][k] for k in ("type", "minimum", "maximum")}
    assert bounds == {"type": "integer", "minimum": 1, "maximum": 10**6}
    assert "application/octet-stream" in rounds["description"] and "422" in rounds["description"]


def test_a_json_only_task_documents_no_query_arguments(doc):
    params = doc["paths"]["/v1/tasks/primes"]["post"]["parameters"]
    assert [(p["name"], p["in"]) for p in params] == [("timeout", "query")]


def frame(data: bytes, width: int, timeout: float = 1.0) -> int:
    return width


def test_a_query_argument_is_required_when_it_has_no_default():
    spec = registry.TaskSpec("pbtest_frame", frame, __name__)
    doc = orjson.loads(build_openapi(TaskCatalog({spec.name: spec})))
    params = doc["paths"]["/v1/tasks/pbtest_frame"]["post"]["parameters"]
    # `timeout` is the call's own even where the task has an argument of that name (docs/api.md)
    assert [(p["name"], p["in"], p["required"]) for p in params] == [
        ("timeout", "query", False), ("width", "query", True)]
    assert params[1]["schema"]["type"] == "integer"


def test_no_operation_lists_a_parameter_twice(doc):
    for path, method, op in operations(doc):
        pairs = [(p["name"], p["in"]) for p in op.get("parameters", [])]
        assert len(pairs) == len(set(pairs)), (path, method, pairs)
