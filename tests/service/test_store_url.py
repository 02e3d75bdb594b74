"""service.jobs.store.url: `--store` parsed once into a StoreURL (SQLite path, or Redis URL and key prefix)."""

from __future__ import annotations

import pytest

from service.jobs.store.url import DEFAULT_REDIS_PREFIX, StoreURL, parse_store


def test_sqlite_paths():
    assert parse_store("./procbridge.db") == StoreURL("sqlite", "./procbridge.db")
    assert parse_store("/data/jobs.db").shared is False
    assert parse_store("/data/jobs.db").public == "/data/jobs.db"


def test_redis_urls_and_their_prefix():
    assert parse_store("redis://h:6379/0") == StoreURL("redis", "redis://h:6379/0", DEFAULT_REDIS_PREFIX)
    assert parse_store("rediss://h/0?prefix=pb:") == StoreURL("redis", "rediss://h/0", "pb:")
    assert parse_store("unix:///run/redis.sock?db=2&prefix=a:&prefix=b:") == StoreURL(
        "redis", "unix:///run/redis.sock?db=2", "b:")  # the last prefix wins; other options stay
    assert parse_store("redis://h").shared is True


def test_a_password_is_never_shown():
    url = parse_store("redis://user:hunter2@[::1]:6379/0")
    assert url.public == "redis://user:***@[::1]:6379/0"
    assert "hunter2" not in repr(url) and "hunter2" not in url.public
    assert url.location == "redis://user:hunter2@[::1]:6379/0"  # what the client connects with


@pytest.mark.parametrize("text", ["", "ftp://somewhere", "http://h/x", "REDIS://h"])
def test_refused(text: str):
    with pytest.raises(ValueError, match="must be a SQLite file path or a redis:// URL"):
        parse_store(text)
