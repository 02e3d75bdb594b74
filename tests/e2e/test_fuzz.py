"""Fuzz the running service from its own /openapi.json with schemathesis: every operation, valid
(positive) and invalid (negative) requests, a bounded number of cases, derandomized (the same cases
on every run, as CI needs). Each response must be documented (status code, content type, body
schema), and no response may be a 5xx other than the documented task outcomes (500 task-failed,
502 worker-crashed, 503 overloaded/draining, 504 task-timeout). Afterwards the service is healthy
and its pool whole. No case is tamed: a task's `timeout` (query string or job) larger than
--task-timeout is capped by the service itself, so even `burn` for an hour with timeout=1e300 ends
after --task-timeout (before that was fixed, this run left both workers busy for an hour).

Run it longer locally: PROCBRIDGE_FUZZ_EXAMPLES=200 (cases per operation and mode, default 10) and
PROCBRIDGE_FUZZ_SEED=<n> (a random seed instead of the derandomized one), e.g.
    PROCBRIDGE_FUZZ_EXAMPLES=200 PROCBRIDGE_FUZZ_SEED=$RANDOM .venv/bin/python -m pytest tests/e2e/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import http, wait_for

EXAMPLES = int(os.environ.get("PROCBRIDGE_FUZZ_EXAMPLES", "10"))
SEED = os.environ.get("PROCBRIDGE_FUZZ_SEED")
TASK_TIMEOUT = 1.0
# The 5xx a client may see, and from where: a task's own outcomes on the calls that run one, and
# the service's refusals (overloaded, draining, too-many-connections) anywhere.
TASK_OUTCOMES = {500: {"task-failed"}, 502: {"worker-crashed"}, 503: {"overloaded", "draining", "too-many-connections"},
                 504: {"task-timeout"}}


def documented_5xx(response: requests.Response) -> str | None:
    """None if a 5xx is one the contract allows, else what is wrong with it."""
    status = response.status_code
    if status < 500:
        return None
    try:
        slug = json.loads(response.content)["type"].removeprefix("/problems/")
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{status} without a problem body: {response.content[:200]!r}"
    if slug in TASK_OUTCOMES.get(status, set()):
        return None
    return f"{status} {slug}: {response.content[:300]!r}"


def ndjson_lines_wrong(response: requests.Response) -> str | None:
    """schemathesis cannot read application/x-ndjson (a map's 200): each line must be a MapLine,
    `{"index", "result"}` or `{"index", "error": <problem>}`, and each index must come once."""
    if response.headers.get("Content-Type", "").split(";")[0] != "application/x-ndjson":
        return None
    seen: set[int] = set()
    for raw in response.content.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            return f"not a JSON line: {raw[:200]!r}"
        index = line.get("index") if isinstance(line, dict) else None
        if not isinstance(index, int) or index in seen or ("result" in line) == ("error" in line):
            return f"not a map line: {raw[:200]!r}"
        seen.add(index)
        error = line.get("error")
        if error is not None and not (isinstance(error, dict) and {"type", "title", "status", "detail"} <= set(error)):
            return f"an error line without a problem: {raw[:200]!r}"
    if seen != set(range(len(seen))):
        return f"map lines with indexes {sorted(seen)[:20]}, not 0..n-1"
    return None


def fuzz_operation(
    operation: schemathesis.APIOperation, mode: schemathesis.GenerationMode, base_url: str,
    session: requests.Session, statuses: Counter[int],
) -> list[str]:
    """Up to EXAMPLES cases of one operation in one mode; what was wrong with the responses."""
    found: list[str] = []

    @settings(max_examples=EXAMPLES, derandomize=SEED is None, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, session=session, timeout=30)
        statuses[response.status_code] += 1
        problem = documented_5xx(response) or ndjson_lines_wrong(response)
        if problem:
            found.append(f"{case.method} {case.formatted_path} -> {problem}")
            return
        try:
            case.validate_response(response, checks=[
                status_code_conformance, content_type_conformance, response_schema_conformance,
            ])
        except (AssertionError, FailureGroup) as exc:  # what the document does not say
            found.append(f"{case.method} {case.formatted_path} ({response.status_code}): {str(exc).strip()[:600]}")

    if SEED is not None:
        fuzz = seed(int(SEED))(fuzz)
    try:
        fuzz()
    except Exception as exc:  # noqa: BLE001 - reported below; e.g. no negative case exists for an operation
        if "unsatisfiable" not in f"{type(exc).__name__} {exc}".lower():
            found.append(f"{operation.label}: the fuzz run failed: {exc!r}"[:600])
    return found


def test_fuzz_every_operation_from_the_openapi_document(server_factory):
    srv = server_factory(
        "--workers", "2", "--task-timeout", str(TASK_TIMEOUT), "--max-body", "65536", "--max-map-items", "8",
        "--max-pending", "16",
    )
    before = {w["pid"] for w in http("GET", srv.url + "/v1/workers").json()["workers"]}
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    session = requests.Session()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    started = time.monotonic()

    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            found = fuzz_operation(operation, mode, srv.url, session, statuses)
            failures.extend(f"[{mode.value}] {f}" for f in dict.fromkeys(found))

    elapsed = time.monotonic() - started
    cases = sum(statuses.values())
    print(f"fuzzed {len(operations)} operations, {cases} cases, {elapsed:.1f} s: {dict(sorted(statuses.items()))}")
    assert not failures, "\n".join(failures[:40])
    assert cases >= 100, statuses  # it really ran

    # Afterwards: alive, ready, the pool whole (task timeouts replace workers; that is allowed).
    assert srv.proc.poll() is None
    assert http("GET", srv.url + "/healthz").json() == {"status": "ok"}
    wait_for(lambda: http("GET", srv.url + "/readyz").status == 200, 15, what="/readyz to answer 200")
    table: list[dict[str, Any]] = []

    def pool_whole() -> bool:
        table[:] = http("GET", srv.url + "/v1/workers").json()["workers"]
        return len(table) == 2 and all(w["pid"] and w["state"] == "idle" for w in table)

    # Idle, too: nothing the fuzzer sent may keep a worker busy past --task-timeout (plus a restart).
    wait_for(pool_whole, 15, what="both workers to be up and idle again")
    reply = http("POST", srv.url + "/v1/tasks/primes", json.dumps({"limit": 1000}).encode(),
                 {"Content-Type": "application/json"})
    assert reply.status == 200 and reply.json()["result"] == 168, reply.body
    assert len(before) == 2
    assert srv.stop() == 0
    assert srv.leftovers() == []


@pytest.mark.parametrize("status,slug,ok", [
    (500, "task-failed", True), (502, "worker-crashed", True), (503, "overloaded", True), (503, "draining", True),
    (503, "too-many-connections", True), (504, "task-timeout", True), (500, "internal-error", False),
    (504, "timeout", False), (503, "task-failed", False),
])
def test_the_5xx_check_itself(status, slug, ok):
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps({"type": f"/problems/{slug}"}).encode()
    assert (documented_5xx(response) is None) == ok
    response._content = b"Internal Server Error"
    assert documented_5xx(response) is not None


def test_the_map_line_check_itself():
    def reply(body: bytes) -> requests.Response:
        response = requests.Response()
        response.status_code = 200
        response.headers["Content-Type"] = "application/x-ndjson"
        response._content = body
        return response

    problem = {"type": "/problems/x", "title": "t", "status": 422, "detail": "d"}
    good = b"\n".join(json.dumps(x).encode() for x in ({"index": 1, "result": 4}, {"index": 0, "error": problem}))
    assert ndjson_lines_wrong(reply(good)) is None
    assert ndjson_lines_wrong(reply(b"")) is None
    for bad in ({"index": 0}, {"index": 0, "result": 1, "error": problem}, {"index": "0", "result": 1},
                {"index": 0, "error": {"type": "x"}}, {"index": 1, "result": 1}):
        assert ndjson_lines_wrong(reply(json.dumps(bad).encode())) is not None, bad
    assert ndjson_lines_wrong(reply(b"{not json")) is not None
