"""`--store`, parsed once: a SQLite file path, or a Redis URL with an optional `?prefix=` for the keys.

The config checks the text with `parse_store` and keeps the result (`Config.store_url`); `open_store`
and the Redis store read its fields instead of parsing the URL again. Standard library only, so the
config can use it without importing a store backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
DEFAULT_REDIS_PREFIX = "procbridge:"
_REFUSED = "must be a SQLite file path or a redis:// URL"


@dataclass(frozen=True, repr=False)
class StoreURL:
    """Where jobs are kept. `location` is the SQLite path, or the Redis URL as redis-py takes it
    (`prefix` removed: redis-py would refuse an option it does not know)."""

    kind: Literal["sqlite", "redis"]
    location: str
    prefix: str = ""  # Redis key prefix; "" for SQLite

    @property
    def shared(self) -> bool:
        """Several replicas may use this store at once (Redis); a SQLite file belongs to one."""
        return self.kind == "redis"

    @property
    def public(self) -> str:
        """The location with any password shown as `***`, for messages and logs."""
        return public_url(self.location) if self.kind == "redis" else self.location

    def __repr__(self) -> str:  # never the password, whoever logs it
        return f"StoreURL({self.kind!r}, {self.public!r}, prefix={self.prefix!r})"


def parse_store(text: str) -> StoreURL:
    """`./jobs.db` -> SQLite; `redis://`, `rediss://` or `unix://` URLs -> Redis; any other scheme is refused
    (ValueError, worded for `--store=...: <message>`)."""
    if not text:
        raise ValueError(_REFUSED)
    if text.startswith(REDIS_SCHEMES):
        location, prefix = _split_prefix(text)
        return StoreURL("redis", location, prefix)
    if "://" in text:
        raise ValueError(_REFUSED)
    return StoreURL("sqlite", text)


def _split_prefix(url: str) -> tuple[str, str]:
    """Take the `prefix` query parameter out of a Redis URL; the last one wins."""
    base, _, query = url.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    prefixes = [value for key, value in pairs if key == "prefix"]
    if not prefixes:
        return url, DEFAULT_REDIS_PREFIX
    rest = urlencode([(key, value) for key, value in pairs if key != "prefix"])
    return (f"{base}?{rest}" if rest else base), prefixes[-1]


def public_url(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]  # as written: an IPv6 address keeps its brackets, the port stays
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
