"""What a `--store` value means: the one place that reads a store URL.

A file path (the default `./procbridge.db`) is a SQLite file; `redis://…`, `rediss://…` or `unix://…`
is a Redis server, with a `prefix` query parameter for the key prefix (default `procbridge:`), e.g.
`redis://host:6379/0?prefix=pb:`. Kept apart from the backends so that reading a URL imports neither.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

REDIS_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_REDIS_PREFIX = "procbridge:"


def scheme(url: str) -> str:
    """The URL's scheme in lower case, or "" for a plain path (a SQLite file)."""
    return url.split("://", 1)[0].lower() if "://" in url else ""


def split_prefix(url: str) -> tuple[str, str]:
    """Take the `prefix` query parameter out of a Redis URL (redis-py would reject it)."""
    base, _, query = url.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    prefixes = [value for key, value in pairs if key == "prefix"]
    if not prefixes:
        return url, DEFAULT_REDIS_PREFIX
    rest = urlencode([(key, value) for key, value in pairs if key != "prefix"])
    return (f"{base}?{rest}" if rest else base), prefixes[-1]
