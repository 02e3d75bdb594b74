"""service.store_url: `--store` parsed once into a StoreURL (SQLite path, or Redis URL and key prefix)."""

from __future__ import annotations

import pytest

from service.store_url import DEFAULT_REDIS_PREFIX, StoreURL, parse_store


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


@pytest.mark.parametrize("text", ["redis://h:6379/0", "redis://:pw@h/1?prefix=x:&socket_timeout=3", "unix:///s?prefix="])
def test_same_answer_as_the_stores_own_parsers(text: str):
    """Until service/store takes a StoreURL, its split_prefix and public_url must agree with it."""
    store = pytest.importorskip("service.store")
    split_prefix = getattr(store, "split_prefix", None)
    if split_prefix is None:
        pytest.skip("service.store.split_prefix is gone: the store takes a StoreURL")
    url = parse_store(text)
    assert split_prefix(text) == (url.location, url.prefix)
    redis_store = pytest.importorskip("service.store.redis")
    assert redis_store.public_url(url.location) == url.public
