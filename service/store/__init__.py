"""Job stores: `open_store(url)` picks the implementation of `JobStore` (service/store/base.py).

- a file path (the default `./procbridge.db`) -> `SQLiteJobStore`, one file, one replica;
- `redis://…`, `rediss://…` or `unix://…` -> `RedisJobStore`, shared by several replicas. A `prefix`
  query parameter sets the key prefix (default `procbridge:`), e.g. `redis://host:6379/0?prefix=pb:`.

The caller awaits `.open()` on the store it gets, and `.close()` at the end. The backends are imported
only when chosen, so a SQLite deployment never imports redis.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

from service.store.base import JobStore

REDIS_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_REDIS_PREFIX = "procbridge:"

__all__ = ["DEFAULT_REDIS_PREFIX", "JobStore", "dumps_json", "loads_json", "open_store"]


def open_store(url: str) -> JobStore:
    """The store for a `--store` value: a SQLite file path, or a Redis URL."""
    if not url:
        raise ValueError("the job store must be a SQLite file path or a redis:// URL")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in REDIS_SCHEMES:
        from service.store.redis import RedisJobStore

        redis_url, prefix = split_prefix(url)
        return RedisJobStore(redis_url, prefix=prefix)
    if scheme:
        raise ValueError(f"unsupported job store {scheme}://: use a SQLite file path or a redis:// URL")
    from service.store.sqlite import SQLiteJobStore

    return SQLiteJobStore(url)


def split_prefix(url: str) -> tuple[str, str]:
    """Take the `prefix` query parameter out of a Redis URL (redis-py would reject it)."""
    base, _, query = url.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    prefixes = [value for key, value in pairs if key == "prefix"]
    if not prefixes:
        return url, DEFAULT_REDIS_PREFIX
    rest = urlencode([(key, value) for key, value in pairs if key != "prefix"])
    return (f"{base}?{rest}" if rest else base), prefixes[-1]


def dumps_json(value: Any) -> bytes:
    """JSON for a stored field: orjson, or the standard library for what orjson refuses (ints beyond 64 bits,
    non-str keys). Such text starts with a space (still valid JSON) so `loads_json` reads it back with the
    standard library too: orjson would turn big ints into floats."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return b" " + json.dumps(value, separators=(",", ":")).encode()


def loads_json(data: bytes | str) -> Any:
    if data[:1] in (b" ", " "):
        return json.loads(data)
    return orjson.loads(data)
