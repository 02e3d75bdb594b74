"""Job stores: `open_store(url)` picks the implementation of `JobStore` (base.py) for a `--store` value.

- a file path (the default `./procbridge.db`) -> `SQLiteJobStore`, one file, one replica;
- `redis://…`, `rediss://…` or `unix://…` -> `RedisJobStore`, shared by several replicas (url.py is
  the one reader of the URL, `prefix` included).

The caller awaits `.open()` on the store it gets, and `.close()` at the end. The backends are imported
only when chosen, so a SQLite deployment never imports redis.
"""

from __future__ import annotations

from service.jobs.store.base import JobStore, StoreUnavailable, dumps_json, loads_json
from service.jobs.store.url import DEFAULT_REDIS_PREFIX, StoreURL, parse_store

__all__ = [
    "DEFAULT_REDIS_PREFIX", "JobStore", "StoreURL", "StoreUnavailable", "dumps_json", "loads_json", "open_store",
    "parse_store",
]


def open_store(url: StoreURL | str) -> JobStore:
    """The store for a `--store` value (as the Config parsed it, or as text): ValueError for anything
    that is neither a SQLite file path nor a Redis URL."""
    target = parse_store(url) if isinstance(url, str) else url
    if target.kind == "redis":
        from service.jobs.store.redis import RedisJobStore

        return RedisJobStore(target.location, prefix=target.prefix)
    from service.jobs.store.sqlite import SQLiteJobStore

    return SQLiteJobStore(target.location)
