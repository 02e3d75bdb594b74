"""--cors-origins in-process: allowed origins get the CORS headers on every answer (errors and event
streams included), others get none; preflights on /v1/ paths are answered without a key and without
spending the rate limit, or refused with 403 problem+json; `*` allows any origin; off by default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from service.app import create_app
from service.config import Config
from service.converters import parse_rate
from tests.conftest import started_client

KEY = "cors-test-key-0123456789abcdef0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
APP = "https://app.example.com"
OTHER = "https://evil.example.net"
CORS_HEADERS = ("Access-Control-Allow-Origin", "Access-Control-Expose-Headers", "Access-Control-Allow-Methods",
                "Access-Control-Allow-Headers", "Access-Control-Max-Age", "Access-Control-Allow-Credentials")


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path) -> Any:
    async def make(**settings: Any) -> TestClient[Any, Any]:
        config = Config(**{"workers": 1, "store": str(tmp_path / "jobs.db"), "access_log": "off", **settings})
        client: TestClient[Any, Any] = await started_client(aiohttp_client, create_app(config))
        return client

    return make


def preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type"}


def no_cors(headers: Any) -> bool:
    return not any(name in headers for name in CORS_HEADERS)


async def test_an_allowed_origin_can_read_answers_and_errors(make_client: Any) -> None:
    client = await make_client(api_keys=(KEY,), cors_origins=(APP, "http://localhost:3000"))
    resp = await client.post("/v1/tasks/sha256", data=b"abc", headers={**AUTH, "Origin": APP,
                                                                       "Content-Type": "application/octet-stream"})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == APP
    assert "Origin" in resp.headers["Vary"]
    exposed = {h.strip() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"Location", "Retry-After", "X-Procbridge-Elapsed-Ms", "X-Procbridge-Worker", "WWW-Authenticate"} <= exposed
    assert "Access-Control-Allow-Credentials" not in resp.headers  # cookies are never used
    job = await client.post("/v1/jobs", json={"task": "primes", "args": {"limit": 10}}, headers={**AUTH, "Origin": APP})
    assert job.status == 202 and job.headers["Access-Control-Allow-Origin"] == APP and "Location" in job.headers
    refused = await client.get("/v1/tasks", headers={"Origin": "http://localhost:3000"})  # no key
    assert refused.status == 401 and refused.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    stream = await client.get("/v1/dashboard/events", headers={**AUTH, "Origin": APP})
    assert stream.status == 200 and stream.headers["Access-Control-Allow-Origin"] == APP
    stream.close()


async def test_another_origin_gets_no_cors_headers_and_its_preflight_is_refused(make_client: Any) -> None:
    client = await make_client(api_keys=(KEY,), cors_origins=(APP,))
    resp = await client.get("/v1/tasks", headers={**AUTH, "Origin": OTHER})
    assert resp.status == 200 and no_cors(resp.headers)  # served; the browser keeps it from the page
    assert resp.headers["Vary"] == "Origin"
    refused = await client.options("/v1/tasks/primes", headers=preflight(OTHER))
    assert refused.status == 403 and refused.content_type == "application/problem+json"
    assert orjson.loads(await refused.read())["type"] == "/problems/origin-not-allowed"
    assert no_cors(refused.headers)
    plain = await client.get("/v1/tasks", headers=AUTH)  # a server-side client sends no Origin
    assert plain.status == 200 and no_cors(plain.headers)


async def test_a_preflight_needs_no_key_and_spends_no_rate(make_client: Any) -> None:
    client = await make_client(api_keys=(KEY,), cors_origins=(APP,), rate_limit=parse_rate("2/min"))
    for path in ("/v1/tasks/primes", "/v1/jobs", "/v1/jobs/abc", "/v1/dashboard/events", "/v1/no-such-route"):
        resp = await client.options(path, headers=preflight(APP, "DELETE"))
        assert resp.status == 204, (path, await resp.text())
        assert resp.headers["Access-Control-Allow-Origin"] == APP
        assert {m.strip() for m in resp.headers["Access-Control-Allow-Methods"].split(",")} == {"GET", "POST", "DELETE"}
        allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "idempotency-key", "last-event-id"} <= allowed
        assert int(resp.headers["Access-Control-Max-Age"]) > 0
    # Five preflights spent none of the 2 tokens a minute.
    for _ in range(2):
        assert (await client.get("/v1/tasks", headers={**AUTH, "Origin": APP})).status == 200
    limited = await client.get("/v1/tasks", headers={**AUTH, "Origin": APP})
    assert limited.status == 429 and limited.headers["Access-Control-Allow-Origin"] == APP
    assert "Retry-After" in limited.headers["Access-Control-Expose-Headers"]
    # An OPTIONS that is not a preflight is an ordinary request: it needs a key.
    assert (await client.options("/v1/tasks", headers={"Origin": APP})).status == 401


async def test_a_star_allows_any_origin_without_credentials(make_client: Any) -> None:
    client = await make_client(cors_origins=("*",))
    resp = await client.get("/v1/tasks", headers={"Origin": OTHER})
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in resp.headers
    pre = await client.options("/v1/tasks/primes", headers=preflight("http://anything.test:8000"))
    assert pre.status == 204 and pre.headers["Access-Control-Allow-Origin"] == "*"


async def test_without_the_setting_there_is_no_cors_at_all(make_client: Any) -> None:
    client = await make_client(api_keys=(KEY,))
    resp = await client.get("/v1/tasks", headers={**AUTH, "Origin": APP})
    assert resp.status == 200 and no_cors(resp.headers) and "Vary" not in resp.headers
    pre = await client.options("/v1/tasks/primes", headers=preflight(APP))
    assert pre.status == 401 and no_cors(pre.headers)
