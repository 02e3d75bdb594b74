"""service.auth in-process: the key ring (digests only, every key compared), the middleware on a
small app behind the real problem middleware (401 shapes, WWW-Authenticate, open probes, closed by
default), the audit hook, and that create_app installs it only when keys are configured."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from service import auth
from service.app import create_app
from service.auth import KEY_ID, OPEN_PATHS, KeyRing, auth_middleware, key_id
from service.config import Config, RateLimit
from service.problems import problem_middleware
from tests.conftest import started_client

KEY_A = "alpha-0123456789abcdef0123456789"
KEY_B = "bravo-0123456789abcdef0123456789"


def test_key_id_is_the_first_8_hex_digits_of_the_sha256():
    assert key_id(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()[:8]
    assert key_id(KEY_A) != key_id(KEY_B)


def test_the_ring_matches_keys_and_holds_no_plaintext():
    ring = KeyRing([KEY_A, KEY_B])
    assert ring.match(KEY_A) == key_id(KEY_A)
    assert ring.match(KEY_B) == key_id(KEY_B)
    assert ring.match(KEY_A[:-1]) is None
    assert ring.match(KEY_A + "x") is None
    assert ring.match("") is None
    held = repr(vars(ring))
    assert KEY_A not in held and KEY_B not in held


@pytest.mark.parametrize("presented", [KEY_A, "k3-0123456789abcdef0123456789", "nobody-0123456789abcdef"])
def test_every_key_is_compared_whatever_matches(monkeypatch, presented):
    ring = KeyRing([KEY_A, KEY_B, "k3-0123456789abcdef0123456789"])
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    ring.match(presented)
    assert len(calls) == 3  # no short cut on the first match, nor on the first mismatch
    assert all(a == hashlib.sha256(presented.encode()).digest() for a, _ in calls)  # digests, not keys


def test_short_keys_draw_a_warning_naming_the_id_not_the_key(caplog):
    with caplog.at_level(logging.WARNING, "procbridge.auth"):
        KeyRing(["short"])
    assert key_id("short") in caplog.text
    assert "short" not in caplog.text.replace("only", "")  # the id, never the key itself


Rejections = list[tuple[str, "str | None", str]]


@pytest.fixture
async def client(aiohttp_client) -> Any:
    """A small app behind the real middlewares: a protected /v1/ route that echoes the key id,
    the open probe paths, and the audit hook recording what it is told."""
    rejections: Rejections = []

    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({"key_id": request.get(KEY_ID)})

    async def probe(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def on_reject(request: web.Request, reason: str, presented: str | None) -> None:
        rejections.append((reason, presented, request.path))

    app = web.Application(middlewares=[problem_middleware, auth_middleware(KeyRing([KEY_A, KEY_B]), on_reject)])
    app.router.add_get("/v1/whoami", whoami)
    app.router.add_post("/v1/whoami", whoami)
    for path in OPEN_PATHS:
        app.router.add_get(path, probe)
    c = await aiohttp_client(app)
    c.rejections = rejections
    return c


async def expect_401(resp: Any, error: str | None) -> dict[str, Any]:
    body = await resp.read()
    assert resp.status == 401, body
    assert resp.content_type == "application/problem+json"
    problem = orjson.loads(body)
    assert problem["type"] == "/problems/unauthorized"
    assert problem["status"] == 401
    assert problem["title"] and problem["detail"]
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="procbridge"')
    assert ('error="invalid_token"' in challenge) == (error == "invalid_token")
    return problem


async def test_a_right_key_passes_and_its_id_reaches_the_handler(client):
    for key in (KEY_A, KEY_B):
        resp = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 200
        assert (await resp.json()) == {"key_id": key_id(key)}
    resp = await client.post("/v1/whoami", headers={"Authorization": f"bearer {KEY_A}"})  # scheme: any case
    assert resp.status == 200
    assert client.rejections == []


async def test_no_header_is_401_missing(client):
    await expect_401(await client.get("/v1/whoami"), None)
    assert client.rejections == [("missing", None, "/v1/whoami")]


@pytest.mark.parametrize(
    "header",
    [f"Basic {KEY_A}", "Bearer", "Bearer ", "Bearer    ", f"Token {KEY_A}", KEY_A, f"Bearer {KEY_A} extra"],
)
async def test_a_malformed_header_is_401_malformed(client, header):
    problem = await expect_401(await client.get("/v1/whoami", headers={"Authorization": header}), None)
    assert KEY_A not in orjson.dumps(problem).decode()
    assert client.rejections == [("malformed", None, "/v1/whoami")]


async def test_two_authorization_headers_are_malformed(client):
    headers = [("Authorization", f"Bearer {KEY_A}"), ("Authorization", f"Bearer {KEY_B}")]
    await expect_401(await client.get("/v1/whoami", headers=headers), None)
    assert client.rejections == [("malformed", None, "/v1/whoami")]


async def test_a_wrong_key_is_401_invalid_token_and_never_echoed(client):
    wrong = "wrong-0123456789abcdef0123456789"
    for presented in (wrong, KEY_A[:-1], KEY_A.upper()):
        resp = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {presented}"})
        problem = await expect_401(resp, "invalid_token")
        assert presented not in orjson.dumps(problem).decode()
        assert presented not in str(dict(resp.headers))
    assert client.rejections == [("unknown-key", key_id(p), "/v1/whoami") for p in (wrong, KEY_A[:-1], KEY_A.upper())]


async def test_probes_are_open_and_everything_else_is_closed(client):
    for path in sorted(OPEN_PATHS):
        assert (await client.get(path)).status == 200, path
    # A path no route serves needs a key too: the router's shape is not shown to strangers, and a
    # route added later is protected without anyone remembering to.
    await expect_401(await client.get("/v1/no-such-thing"), None)
    await expect_401(await client.get("/no-such-thing"), None)
    await expect_401(await client.get("/healthz/"), None)
    resp = await client.get("/v1/no-such-thing", headers={"Authorization": f"Bearer {KEY_A}"})
    assert resp.status == 404


def test_create_app_installs_the_middleware_only_with_keys(tmp_path):
    plain = create_app(Config(workers=1, store=str(tmp_path / "a.db")))
    assert list(plain.middlewares) == [problem_middleware]  # the default path pays nothing
    keyed = create_app(Config(workers=1, store=str(tmp_path / "b.db"), api_keys=(KEY_A,)))
    assert len(keyed.middlewares) == 2
    assert keyed.middlewares[0] is problem_middleware  # outermost: a 401 is a problem like any other
    assert keyed.middlewares[1].__name__ == "authenticate"


async def rejected(client: Any) -> dict[str, float]:
    text = await (await client.get("/metrics")).text()
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "procbridge_rejected_requests_total"}


async def test_create_app_protects_the_real_routes(aiohttp_client, tmp_path):
    app = create_app(Config(workers=1, store=str(tmp_path / "jobs.db"), api_keys=(KEY_A,), access_log="off",
                            rate_limit=RateLimit(5, 60)))
    client = await started_client(aiohttp_client, app)
    assert await rejected(client) == {"unauthorized": 0, "rate-limited": 0}
    for method, path in [("GET", "/v1/tasks"), ("POST", "/v1/tasks/primes"), ("POST", "/v1/tasks/primes/map"),
                         ("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/abc"),
                         ("GET", "/v1/jobs/abc/events"), ("DELETE", "/v1/jobs/abc"), ("GET", "/v1/workers")]:
        await expect_401(await client.request(method, path), None)
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await client.get(path)).status == 200, path
    resp = await client.post("/v1/tasks/primes", json={"limit": 100}, headers={"Authorization": f"Bearer {KEY_A}"})
    assert resp.status == 200
    assert (await resp.json())["result"] == 25
    statuses = [(await client.get("/v1/tasks", headers={"Authorization": f"Bearer {KEY_A}"})).status for _ in range(6)]
    assert statuses == [200, 200, 200, 200, 429, 429]
    assert await rejected(client) == {"unauthorized": 9, "rate-limited": 2}
