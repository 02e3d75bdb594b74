"""Job stores: `open_store(url)` picks the implementation of `JobStore` (base.py) for a `--store` value.

- a file path (the default `./procbridge.db`) -> `SQLiteJobStore`, one file, one replica;
- `redis://…`, `rediss://…` or `unix://…` -> `RedisJobStore`, shared by several replicas (url.py says
  how the URL is read, `prefix` included).

The caller awaits `.open()` on the store it gets, and `.close()` at the end. The backends are imported
only when chosen, so a SQLite deployment never imports redis.
"""

from __future__ import annotations

from service.jobs.store.base import JobStore, StoreUnavailable, dumps_json, loads_json
from service.jobs.store.url import DEFAULT_REDIS_PREFIX, REDIS_SCHEMES, scheme, split_prefix

__all__ = [
    "DEFAULT_REDIS_PREFIX", "JobStore", "StoreUnavailable", "dumps_json", "loads_json", "open_store", "split_prefix",
]


def open_store(url: str) -> JobStore:
    """The store for a `--store` value: a SQLite file path, or a Redis URL."""
    if not url:
        raise ValueError("the job store must be a SQLite file path or a redis:// URL")
    kind = scheme(url)
    if kind in REDIS_SCHEMES:
        from service.jobs.store.redis import RedisJobStore

        redis_url, prefix = split_prefix(url)
        return RedisJobStore(redis_url, prefix=prefix)
    if kind:
        raise ValueError(f"unsupported job store {kind}://: use a SQLite file path or a redis:// URL")
    from service.jobs.store.sqlite import SQLiteJobStore

    return SQLiteJobStore(url)
