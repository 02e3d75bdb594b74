"""The job store fixtures, shared by the store suites (test_store.py, test_store_further.py): every test
parametrized over SQLite (a file in a tmp dir) and Redis (a real redis-server on a free loopback port,
started once for the session by tests/conftest.py's `redis_server`; each test gets its own key prefix)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from service.jobs.store import open_store
from service.jobs.store.base import JobStore
from tests.support.redis_server import RedisServer, need_redis_server


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, for tests that kill it."""
    need_redis_server()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


# -- stores -------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where this test's jobs live: every store opened on it shares them."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.db")
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url(f"test-{uuid.uuid4().hex[:12]}:")


@dataclass
class Stores:
    url: str
    opened: list[JobStore] = field(default_factory=list)

    async def open(self) -> JobStore:
        store = open_store(self.url)
        await store.open()
        self.opened.append(store)
        return store


@pytest.fixture
async def stores(store_url: str) -> AsyncIterator[Stores]:
    stores = Stores(store_url)
    yield stores
    for store in stores.opened:
        await store.close()


@pytest.fixture
async def store(stores: Stores) -> JobStore:
    return await stores.open()

