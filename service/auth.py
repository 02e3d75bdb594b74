"""API keys: `Authorization: Bearer <key>` on everything but the open probes, when keys are configured.

Keys are held only as SHA-256 digests. A presented key is hashed and its digest compared with
`hmac.compare_digest` against every configured digest, without stopping at a match, so the time a
check takes does not depend on which key (or how much of one) matched. What the rest of the
service sees of a key is its **key id**: the first 8 hex digits of its SHA-256, stable across
restarts and replicas, fit for logs and rate-limit buckets, and no help in guessing the key (as
long as keys are long and random: a short word could be found from its id by trying words).

Every refusal is 401 `unauthorized` with `WWW-Authenticate: Bearer realm="procbridge"` (plus
`error="invalid_token"` when a well-formed key is simply not one of ours, RFC 6750 §3.1), and is
reported to the audit log, which never sees the key either.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Middleware

from service.problems import Handler, Problem

log = logging.getLogger("procbridge.auth")

# Paths any client may read without a key: probes for orchestrators and scrapers, the API's
# description, and the dashboard's page and files (they hold no data: the page asks for a key and
# sends it to /v1/dashboard/events). Exact matches on the request path, and one prefix whose only
# route serves the dashboard's files by name: everything else, including a path no route serves,
# needs a key, so a route added later is protected without anyone remembering to.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/dashboard", "/dashboard/"})
OPEN_PREFIX = "/dashboard/static/"


def is_open(path: str) -> bool:
    """Whether `path` is served without a key (and outside the rate limit)."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIX)

KEY_ID = web.RequestKey("key_id", str)  # request[KEY_ID]: the request's key id (absent when keys are off)

REALM = 'Bearer realm="procbridge"'
SHORT_KEY = 16  # keys shorter than this draw a warning at start-up: they could be guessed

# The audit hook: (request, reason, presented key's id or None). Reasons: missing, malformed, unknown-key.
RejectHook = Callable[[web.Request, str, "str | None"], None]


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(key: str) -> str:
    """The non-secret name of a key: 8 hex digits of its SHA-256."""
    return key_digest(key).hex()[:8]


class KeyRing:
    """The configured keys, as digests; `match` says which one a presented key is, in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests: list[tuple[bytes, str]] = []
        for key in keys:
            digest = key_digest(key)
            self._digests.append((digest, digest.hex()[:8]))
            if len(key) < SHORT_KEY:
                log.warning("API key %s is only %d characters long: use at least 32 random characters "
                            "(e.g. `openssl rand -hex 32`)", digest.hex()[:8], len(key))
        if not self._digests:
            raise ValueError("a KeyRing needs at least one key")
        ids = [kid for _, kid in self._digests]
        if len(set(ids)) != len(ids):
            log.warning("two API keys share a key id: logs cannot tell them apart and they share a rate limit")

    def __len__(self) -> int:
        return len(self._digests)

    def match(self, presented: str) -> str | None:
        """The key id of the configured key equal to `presented`, or None."""
        digest = key_digest(presented)
        found: str | None = None
        for candidate, kid in self._digests:  # every key is compared, whatever matched before
            if hmac.compare_digest(digest, candidate):
                found = kid
        return found


def _refusal(reason: str, detail: str) -> Problem:
    challenge = REALM + ', error="invalid_token"' if reason == "unknown-key" else REALM
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": challenge})


def bearer_token(request: web.Request) -> tuple[str | None, str | None]:
    """(token, None) from a single well-formed `Authorization: Bearer <token>`, else (None, reason)."""
    values = request.headers.getall("Authorization", ())
    if not values:
        return None, "missing"
    if len(values) > 1:
        return None, "malformed"
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    # The scheme is case-insensitive (RFC 9110 §11.1); a token is one word (RFC 6750 b64token).
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        return None, "malformed"
    return token, None


def auth_middleware(keys: KeyRing, on_reject: RejectHook | None = None) -> Middleware:
    """The middleware that admits a request with a configured key (or to an open path) and refuses
    the rest with 401; it records the key id as `request["key_id"]`."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_open(request.path):
            return await handler(request)
        token, reason = bearer_token(request)
        if token is not None:
            kid = keys.match(token)
            if kid is not None:
                request[KEY_ID] = kid
                return await handler(request)
            reason, presented = "unknown-key", key_id(token)
        else:
            presented = None
        assert reason is not None
        if on_reject is not None:
            on_reject(request, reason, presented)
        if reason == "missing":
            raise _refusal(reason, "this endpoint needs an API key: send 'Authorization: Bearer <key>'")
        if reason == "malformed":
            raise _refusal(reason, "the Authorization header must be a single 'Bearer <key>'")
        raise _refusal(reason, "the API key is not valid")

    return authenticate
