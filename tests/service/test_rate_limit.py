"""service.rate_limit in-process: the token bucket against an injected clock (no sleeping), its
bounded table, client addresses as bucket names, and the middleware behind the real problem and
auth middlewares (429 shape and Retry-After, one bucket per key, probes free, X-Forwarded-For ignored)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import web

from service.app import create_app
from service.auth import KEY_ID, OPEN_PATHS, KeyRing, auth_middleware, key_id
from service.config import Config, RateLimit, parse_rate
from service.problems import problem_middleware
from service.rate_limit import TokenBuckets, client_bucket, rate_limit_middleware

KEY_A = "alpha-0123456789abcdef0123456789"
KEY_B = "bravo-0123456789abcdef0123456789"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_a_bucket_holds_n_and_refills_n_per_period():
    clock = FakeClock()
    buckets = TokenBuckets(parse_rate("5/10s"), clock=clock)
    assert [buckets.take("a") for _ in range(5)] == [0.0] * 5  # a burst of N
    wait = buckets.take("a")
    assert wait == pytest.approx(2.0)  # one token every 10/5 s
    clock.advance(1.0)
    assert buckets.take("a") == pytest.approx(1.0)  # half a token is not a token
    clock.advance(1.0)
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0


def test_a_refill_never_passes_the_capacity():
    clock = FakeClock()
    buckets = TokenBuckets(RateLimit(3, 1), clock=clock)
    buckets.take("a")
    clock.advance(3600)
    assert [buckets.take("a") for _ in range(4)].count(0.0) == 3


def test_buckets_are_independent():
    clock = FakeClock()
    buckets = TokenBuckets(RateLimit(2, 60), clock=clock)
    while buckets.take("a") == 0.0:
        pass
    assert buckets.take("b") == 0.0
    assert buckets.take("b") == 0.0
    assert buckets.take("b") > 0
    assert buckets.take("c") == 0.0


def test_less_than_one_per_period_still_lets_one_through():
    clock = FakeClock()
    buckets = TokenBuckets(parse_rate("0.5/s"), clock=clock)
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(2.0)


def test_the_table_drops_buckets_that_have_refilled():
    clock = FakeClock()
    buckets = TokenBuckets(RateLimit(10, 1), clock=clock)
    for name in ("a", "b", "c"):
        buckets.take(name)
    clock.advance(0.5)
    buckets.take("b")  # b was used again: it is not full yet at the next step
    clock.advance(0.6)  # a and c are untouched for a whole refill period (10 tokens at 10/s): full again
    buckets.take("d")
    assert "a" not in buckets and "c" not in buckets
    assert "b" in buckets and "d" in buckets
    assert len(buckets) == 2


def test_the_table_is_bounded_under_a_flood_of_new_addresses():
    clock = FakeClock()
    buckets = TokenBuckets(RateLimit(1, 3600), max_buckets=100, clock=clock)
    buckets.take("victim")
    for i in range(10_000):  # nothing refills in between: only the cap holds the table
        buckets.take(f"10.0.{i // 256}.{i % 256}")
        if i < 50:
            buckets.take("victim")  # the victim keeps being used for a while: least recently used goes first
        assert len(buckets) <= 100
    assert len(buckets) == 100
    assert "victim" not in buckets  # evicted at last: its owner starts again with a full bucket


def test_client_addresses_as_bucket_names():
    assert client_bucket("192.0.2.7") == "192.0.2.7"
    assert client_bucket("2001:db8:1:2:aaaa::1") == client_bucket("2001:db8:1:2:bbbb::2")  # one /64
    assert client_bucket("2001:db8:1:2::1") != client_bucket("2001:db8:1:3::1")
    assert client_bucket("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_bucket("fe80::1%eth0") == client_bucket("fe80::2")
    assert client_bucket(None) == client_bucket("") == "-"


@pytest.fixture
async def make_client(aiohttp_client) -> Any:
    """A small app behind the real middlewares (problems, optionally keys, then the rate limit) whose
    buckets run on a fake clock."""

    async def make(limit: str, keys: tuple[str, ...] = ()) -> Any:
        clock = FakeClock()
        buckets = TokenBuckets(parse_rate(limit), clock=clock)

        async def handler(request: web.Request) -> web.Response:
            return web.json_response({"key_id": request.get(KEY_ID)}, status=202 if request.method == "POST" else 200)

        middlewares = [problem_middleware]
        if keys:
            middlewares.append(auth_middleware(KeyRing(keys)))
        middlewares.append(rate_limit_middleware(parse_rate(limit), buckets))
        app = web.Application(middlewares=middlewares)
        app.router.add_get("/v1/things", handler)
        app.router.add_post("/v1/jobs", handler)
        for path in OPEN_PATHS:
            app.router.add_get(path, handler)
        client = await aiohttp_client(app)
        client.clock, client.buckets = clock, buckets
        return client

    return make


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def expect_429(resp: Any) -> int:
    body = await resp.read()
    assert resp.status == 429, body
    assert resp.content_type == "application/problem+json"
    problem = orjson.loads(body)
    assert problem["type"] == "/problems/rate-limited"
    assert problem["status"] == 429 and problem["title"] and problem["detail"]
    retry_after = resp.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    return int(retry_after)


async def test_one_keys_burst_does_not_spend_anothers_budget(make_client):
    client = await make_client("3/min", keys=(KEY_A, KEY_B))
    for _ in range(3):
        assert (await client.get("/v1/things", headers=bearer(KEY_A))).status == 200
    assert await expect_429(await client.get("/v1/things", headers=bearer(KEY_A))) == 20  # a token every 20 s
    for _ in range(3):
        resp = await client.get("/v1/things", headers=bearer(KEY_B))
        assert resp.status == 200
        assert (await resp.json())["key_id"] == key_id(KEY_B)
    await expect_429(await client.get("/v1/things", headers=bearer(KEY_B)))
    assert set(client.buckets._buckets) == {key_id(KEY_A), key_id(KEY_B)}  # by key id, never by key


async def test_retry_after_counts_down_with_the_clock(make_client):
    client = await make_client("1/10s", keys=(KEY_A,))
    assert (await client.get("/v1/things", headers=bearer(KEY_A))).status == 200
    assert await expect_429(await client.get("/v1/things", headers=bearer(KEY_A))) == 10
    client.clock.advance(6.5)
    assert await expect_429(await client.get("/v1/things", headers=bearer(KEY_A))) == 4  # 3.5 s, rounded up
    client.clock.advance(3.5)
    assert (await client.get("/v1/things", headers=bearer(KEY_A))).status == 200


async def test_job_submissions_count(make_client):
    client = await make_client("2/min", keys=(KEY_A,))
    assert (await client.post("/v1/jobs", headers=bearer(KEY_A))).status == 202
    assert (await client.get("/v1/things", headers=bearer(KEY_A))).status == 200
    await expect_429(await client.post("/v1/jobs", headers=bearer(KEY_A)))


async def test_probes_are_free_and_refused_keys_spend_nothing(make_client):
    client = await make_client("1/min", keys=(KEY_A,))
    for _ in range(5):
        for path in OPEN_PATHS:
            assert (await client.get(path)).status == 200
        assert (await client.get("/v1/things", headers=bearer("wrong-key-0123456789abcdef"))).status == 401
    assert len(client.buckets) == 0
    assert (await client.get("/v1/things", headers=bearer(KEY_A))).status == 200
    await expect_429(await client.get("/v1/things", headers=bearer(KEY_A)))
    assert (await client.get("/healthz")).status == 200


async def test_without_keys_the_client_address_is_limited_and_forwarded_for_is_ignored(make_client):
    client = await make_client("2/min")
    assert (await client.get("/v1/things")).status == 200
    assert (await client.get("/v1/things", headers={"X-Forwarded-For": "198.51.100.1"})).status == 200
    for spoof in ("198.51.100.2", "203.0.113.9, 198.51.100.3"):
        await expect_429(await client.get("/v1/things", headers={"X-Forwarded-For": spoof, "X-Real-IP": spoof}))
    assert list(client.buckets._buckets) == ["127.0.0.1"]


def test_create_app_installs_the_limiter_only_when_configured_and_after_keys(tmp_path):
    plain = create_app(Config(workers=1, store=str(tmp_path / "a.db"), api_keys=(KEY_A,)))
    assert [m.__name__ for m in plain.middlewares] == ["problem_middleware", "authenticate"]
    limited = create_app(Config(workers=1, store=str(tmp_path / "b.db"), api_keys=(KEY_A,),
                                rate_limit=RateLimit(5, 1)))
    assert [m.__name__ for m in limited.middlewares] == ["problem_middleware", "authenticate", "limit_rate"]
    open_limited = create_app(Config(workers=1, store=str(tmp_path / "c.db"), rate_limit=RateLimit(5, 1)))
    assert [m.__name__ for m in open_limited.middlewares] == ["problem_middleware", "limit_rate"]
