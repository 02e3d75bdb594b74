"""Rate limits: a token bucket per API key, or per client address when the service has no keys.

A bucket holds up to N tokens (the N of `--rate-limit N/period`) and refills at N per period; each
request takes one, and a request that finds less than one is refused with 429 `rate-limited` and
`Retry-After` (whole seconds until a token is back, at least 1). Each key (or address) has its own
bucket, so one client's burst never spends another's budget.

The table of buckets is bounded: without keys its entries are chosen by whoever connects, and
must not grow with the number of addresses an attacker controls. It is kept in least-recently-used
order; a bucket untouched for a whole refill period is full again, which is the same as having no
bucket, so it is dropped whenever a new bucket is made; and past `max_buckets` the least recently
used one goes (its owner starts again with a full bucket: a little lenient, never unfair to others).

Addresses come from the TCP peer (`request.remote`), never from `X-Forwarded-For`, which a client
writes itself. An IPv6 client is limited per /64, the block one host or one customer is usually
given, so it cannot multiply its budget by hopping addresses within its own prefix.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from service.auth import KEY_ID, is_open
from service.config import RateLimit
from service.problems import Handler, Problem

DEFAULT_MAX_BUCKETS = 100_000  # about 27 MB at most (measured: ~270 bytes per bucket)


class TokenBuckets:
    """Token buckets by name, bounded in number; `take(name)` spends one token or says how long to wait."""

    def __init__(
        self, limit: RateLimit, *, max_buckets: int = DEFAULT_MAX_BUCKETS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_buckets < 1:
            raise ValueError("max_buckets must be at least 1")
        self.capacity = max(1.0, limit.requests)  # "0.5/s" still lets one request through, every 2 s
        self.rate = limit.rate  # tokens per second
        self.full_after = self.capacity / self.rate  # an untouched bucket is full again after this long
        self.max_buckets = max_buckets
        self.clock = clock
        # name -> [tokens, time of the last update]; least recently used first.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, name: str) -> bool:
        return name in self._buckets

    def take(self, name: str) -> float:
        """Spend a token from `name`'s bucket: 0.0 when allowed, else seconds until one is back."""
        now = self.clock()
        bucket = self._buckets.get(name)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[name] = [self.capacity, now]
        else:
            self._buckets.move_to_end(name)
            tokens = bucket[0] + (now - bucket[1]) * self.rate
            bucket[0] = tokens if tokens < self.capacity else self.capacity
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.rate

    def _make_room(self, now: float) -> None:
        buckets = self._buckets
        # Oldest first: drop every bucket that has refilled (stop at the first that has not: the rest
        # were used more recently), then, if still full, the least recently used.
        stale_before = now - self.full_after
        while buckets:
            oldest = next(iter(buckets.values()))
            if oldest[1] > stale_before:
                break
            buckets.popitem(last=False)
        while len(buckets) >= self.max_buckets:
            buckets.popitem(last=False)


def client_bucket(remote: str | None) -> str:
    """The bucket name of a client address: IPv4 as is, IPv6 by its /64 (an IPv4-mapped one as IPv4)."""
    if not remote:
        return "-"  # a Unix socket, or a peer the transport could not name
    if ":" not in remote:
        return remote
    try:
        address = ipaddress.IPv6Address(remote.split("%", 1)[0])
    except ValueError:
        return remote
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return address.exploded[:19] + "::/64"


def rate_limit_middleware(
    limit: RateLimit,
    buckets: TokenBuckets | None = None,
    on_limited: Callable[[], None] | None = None,
    take: Callable[[str], Awaitable[float]] | None = None,
) -> Middleware:
    """The middleware spending one token per request to anything but the open paths (auth.py); with keys,
    from the key's bucket (set by the auth middleware, which runs first), else from the address's.
    `on_limited` is called for each refusal (the metrics count them). `take`: spend the tokens
    elsewhere instead of in `buckets` (a serving process asks the core, which holds the buckets of
    the whole service: service/relay_calls.py)."""
    local = (buckets if buckets is not None else TokenBuckets(limit)).take
    what = f"{limit.requests:g} per {limit.per_seconds:g} s"

    @web.middleware
    async def limit_rate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_open(request.path):
            return await handler(request)
        kid = request.get(KEY_ID)
        name = kid if kid is not None else client_bucket(request.remote)
        wait = local(name) if take is None else await take(name)
        if wait:
            retry_after = max(1, math.ceil(wait))
            if on_limited is not None:
                on_limited()
            raise Problem(429, "rate-limited",
                          f"over the rate limit of {what} for this {'key' if kid is not None else 'client'}; "
                          f"retry in {retry_after} s",
                          headers={"Retry-After": str(retry_after)})
        return await handler(request)

    return limit_rate
