"""Text -> value for each setting: what a flag or environment variable may say, and what it means.

Each converter takes the stripped text and returns the value, or raises ValueError with a sentence a
user can act on (never Python's "invalid literal for int()"): `service.config.load` puts the flag or
variable's name in front of it. Kept apart from the table (service/settings.py) so the table reads as
a list of settings, and so tests and other modules can use one parser per kind of value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from service.jobs.store.url import parse_store
from service.jobs.webhook_allow import parse_allow
from workers.executor_url import parse_executor

MIB = 1024 * 1024


@dataclass(frozen=True)
class RateLimit:
    """`--rate-limit`: `requests` per `per_seconds`, one token bucket per key or client."""

    requests: float
    per_seconds: float

    @property
    def rate(self) -> float:
        return self.requests / self.per_seconds


def _int(s: str, requirement: str) -> int:
    """int(s), or ValueError(requirement) instead of Python's "invalid literal for int()"."""
    try:
        return int(s)
    except ValueError:
        raise ValueError(requirement) from None


def _float(s: str, requirement: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise ValueError(requirement) from None


class WorkerRange(int):
    """`--workers MIN..MAX`: an int, the most workers (MAX: what the pool, its worker table and the
    defaults derived from the worker count are sized by), that also holds the fewest it keeps, `min`.
    An int, so that whatever reads `Config.workers` as a count goes on doing so; `Config.min_workers`
    reads `min` (of a plain int: the int itself, a fixed pool). Equal to another range with the same
    bounds, and to a plain int only when fixed (`3..3 == 3`, `1..3 != 3`), so two Configs that differ in
    MIN differ; arithmetic gives plain ints."""

    min: int

    def __new__(cls, low: int, high: int) -> WorkerRange:
        if not 1 <= low <= high:
            raise ValueError(f"workers {low}..{high}: MIN must be at least 1 and at most MAX")
        value = super().__new__(cls, high)
        value.min = low
        return value

    def __repr__(self) -> str:
        return f"{self.min}..{int(self)}"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WorkerRange):
            return (self.min, int(self)) == (other.min, int(other))
        return isinstance(other, int) and self.min == int(self) == other

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return int.__hash__(self)  # equal objects hash alike: 3..3 as 3

    def __reduce__(self) -> tuple[type[WorkerRange], tuple[int, int]]:
        return WorkerRange, (self.min, int(self))


_WORKERS = "must be a number of workers ≥ 1, or MIN..MAX (e.g. 1..8: a pool that grows and shrinks)"


def workers(s: str) -> int:
    """`N`: a fixed pool of N; `MIN..MAX`: a `WorkerRange`, a pool that grows from MIN to MAX while calls
    wait and shrinks back when idle (MIN ≥ 1: it never shrinks to none; MIN ≤ MAX)."""
    low_text, dots, high_text = s.partition("..")
    try:
        high = int(high_text if dots else s)
        low = int(low_text) if dots else high
    except ValueError:
        raise ValueError(_WORKERS) from None
    if not dots:
        if high < 1:
            raise ValueError(_WORKERS)
        return high
    if low < 1:
        raise ValueError(f"MIN..MAX: MIN must be at least 1 (a pool never shrinks to no worker), not {low}")
    if low > high:
        raise ValueError(f"MIN..MAX: MIN ({low}) is more than MAX ({high})")
    return high if low == high else WorkerRange(low, high)


def positive_int(s: str) -> int:
    n = _int(s, "must be a whole number ≥ 1")
    if n < 1:
        raise ValueError("must be a whole number ≥ 1")
    return n


def non_negative_int(s: str) -> int:
    n = _int(s, "must be a whole number ≥ 0")
    if n < 0:
        raise ValueError("must be a whole number ≥ 0")
    return n


def seconds(s: str) -> float:
    """A finite number of seconds > 0 (inf and nan are refused: a timeout must end)."""
    x = _float(s, "must be a number of seconds > 0")
    if not math.isfinite(x) or x <= 0:
        raise ValueError("must be a number of seconds > 0")
    return x


def seconds_or_zero(s: str) -> float:
    x = _float(s, "must be a number of seconds ≥ 0")
    if not math.isfinite(x) or x < 0:
        raise ValueError("must be a number of seconds ≥ 0")
    return x


_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(s: str) -> float:
    """Seconds, or a number with a unit: 90s, 30m, 24h, 7d."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", s.lower())
    if not m or float(m.group(1)) <= 0:
        raise ValueError("must be a duration > 0 in seconds, or with a unit: 90s, 30m, 24h, 7d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def lease(s: str) -> float:
    """A lease renewed every 0.5 s (service/jobs/runner.py): under 2 s, a loop stalled for a moment
    would lose it and the job would run twice."""
    x = duration(s)
    if x < 2:
        raise ValueError("must be a duration of at least 2 s (e.g. 30s, 2m)")
    return x


def port(s: str) -> int:
    n = _int(s, "must be a port number from 0 to 65535")
    if not 0 <= n <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return n


def host(s: str) -> str:
    if not s or any(c.isspace() for c in s):
        raise ValueError("must be a host name or IP address")
    return s


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": MIB,
               "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def size(s: str) -> int:
    """Bytes, or a number with a unit: 512KiB, 1.5 MiB, 10MB (KiB/MiB/GiB are powers of 1024)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", s)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("must be a size in bytes, optionally with a unit (KiB, MiB, GiB, KB, MB, GB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def positive_size(s: str) -> int:
    n = size(s)
    if n < 1:
        raise ValueError("must be at least 1 byte")
    return n


def modules(s: str) -> tuple[str, ...]:
    """Comma-separated importable module names (checked for their shape here, imported at start-up)."""
    names = tuple(part.strip() for part in s.split(",") if part.strip())
    for name in names:
        if not all(piece.isidentifier() for piece in name.split(".")):
            raise ValueError(f"{name!r} is not an importable module name")
    return names


def store(s: str) -> str:
    """A SQLite file path or a Redis URL, checked by the one parser of store URLs (service/jobs/store/url.py);
    the Config keeps the text and its parsed form (`Config.store_url`)."""
    parse_store(s)
    return s


def executor(s: str) -> str:
    """`local` or `dask://HOST:PORT[?isolate=…]`, checked by the one parser of executor URLs
    (workers/executor_url.py); the Config keeps the text and its parsed form (`Config.executor_url`)."""
    parse_executor(s)
    return s


def api_keys(s: str) -> tuple[str, ...]:
    """Keys from "k1,k2" or from "@FILE" (one per line; blank lines and `#` comments skipped).

    A key must be something a client can send as `Authorization: Bearer <key>`: visible ASCII, no
    spaces or commas; and not start with `@` or `#`, which would read as a file or a comment.
    Messages name a bad key by its position, never by its text.
    """
    if s.startswith("@"):
        try:
            text = Path(s[1:]).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError("the key file is not UTF-8 text") from None
        keys = [line.strip() for line in text.splitlines()]
        keys = [k for k in keys if not k.startswith("#")]
    else:
        keys = [part.strip() for part in s.split(",")]
    keys = [k for k in keys if k]
    if not keys:
        raise ValueError("no keys given")
    for position, key in enumerate(keys, 1):
        if not all("!" <= c <= "~" for c in key) or "," in key:
            raise ValueError(f"key {position} has a character a Bearer token cannot carry "
                             "(use visible ASCII without spaces or commas, e.g. letters, digits, -._~+/=)")
        if key.startswith(("@", "#")):
            raise ValueError(f"key {position} starts with {key[0]!r}, which would read as a file or a comment")
    return tuple(dict.fromkeys(keys))  # duplicates dropped, order kept


def backoff(s: str) -> float:
    """A first retry's delay: seconds > 0, at most 300 (the longest any back-off grows to)."""
    x = _float(s, "must be a number of seconds > 0, at most 300")
    if not math.isfinite(x) or not 0 < x <= 300:
        raise ValueError("must be a number of seconds > 0, at most 300")
    return x


def webhook_allow(s: str) -> tuple[str, ...]:
    """`host[:port]` patterns, comma-separated; the grammar and its checks: service/jobs/webhook_allow.py."""
    return parse_allow(s)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def cors_origins(s: str) -> tuple[str, ...]:
    """Comma-separated origins, each `scheme://host[:port]` as a browser sends it in `Origin` (scheme and
    host in lower case, no default port), or `*` for any origin."""
    origins = []
    for part in (p.strip() for p in s.split(",")):
        if not part:
            continue
        if part == "*":
            origins.append(part)
            continue
        want = f"each origin is `http(s)://host[:port]` (e.g. `https://app.example.com`) or `*`, not {part!r}"
        try:
            url = urlsplit(part)
            port = url.port
        except ValueError:
            raise ValueError(want) from None
        if url.scheme not in _DEFAULT_PORTS or not url.hostname or url.username is not None or url.password is not None:
            raise ValueError(want)
        if url.path or url.query or url.fragment or part.endswith(("?", "#")):
            raise ValueError(f"an origin has no path: {part!r} (try {url.scheme}://{url.netloc})")
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        shown_port = f":{port}" if port not in (None, _DEFAULT_PORTS[url.scheme]) else ""
        origins.append(f"{url.scheme}://{host}{shown_port}")
    if not origins:
        raise ValueError("no origin given (e.g. `https://app.example.com`, or `*`)")
    return tuple(dict.fromkeys(origins))


MIN_SECRET = 16


def secret(s: str) -> str:
    """An HMAC key, or `@FILE`: the first line of FILE (a mounted secret). Visible ASCII without spaces
    (it survives shells, env files and YAML unchanged), at least MIN_SECRET characters. Messages never
    show it."""
    if s.startswith("@"):
        try:
            lines = Path(s[1:]).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError("the secret file is not UTF-8 text") from None
        s = lines[0].strip() if lines else ""
        if not s:
            raise ValueError("the secret file's first line is empty")
    if not all("!" <= c <= "~" for c in s):
        raise ValueError("the secret has a character other than visible ASCII (spaces included); "
                         "make one with e.g. `openssl rand -hex 32`")
    if len(s) < MIN_SECRET:
        raise ValueError(f"the secret is shorter than {MIN_SECRET} characters; "
                         "make one with e.g. `openssl rand -hex 32`")
    return s


def access_log(s: str) -> str:
    """`-` (stdout), `off`, or a file to append to: its directory must exist now, not at the first request."""
    if s in ("-", "off"):
        return s
    path = Path(s)
    if not s or "\0" in s or path.is_dir():
        raise ValueError("must be - (stdout), off, or a file path")
    if not path.parent.is_dir():
        raise ValueError(f"the directory {str(path.parent)!r} does not exist")
    return s


_PERIODS = {"s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0, "m": 60.0, "min": 60.0,
            "mins": 60.0, "minute": 60.0, "minutes": 60.0, "h": 3600.0, "hour": 3600.0, "hours": 3600.0}


def parse_rate(s: str) -> RateLimit:
    """'20/s' -> 20 per second, '600/min', '1000/h', '5/10s' (5 per 10 s)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*/\s*(\d*(?:\.\d+)?)\s*([a-z]+)", s.lower())
    if not m or m.group(3) not in _PERIODS or float(m.group(1)) <= 0 or float(m.group(2) or 1) <= 0:
        raise ValueError("must look like 20/s, 600/min or 1000/h")
    return RateLimit(float(m.group(1)), float(m.group(2) or 1) * _PERIODS[m.group(3)])


def boolean(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def nice(s: str) -> int:
    n = _int(s, "must be from 0 to 19")
    if not 0 <= n <= 19:
        raise ValueError("must be from 0 to 19")
    return n


def log_level(s: str) -> str:
    v = s.lower()
    if v not in ("debug", "info", "warning", "error"):
        raise ValueError("must be debug, info, warning or error")
    return v
