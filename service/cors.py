"""CORS for browser clients of the API (`--cors-origins`): which other origins' pages may call it.

Off by default: without `--cors-origins` nothing here is installed and no response carries a CORS
header, so a browser lets no other origin read an answer. With it:

- a request whose `Origin` is allowed gets `Access-Control-Allow-Origin: <that origin>` (with `*`
  configured: `Access-Control-Allow-Origin: *`, any origin), and
  `Access-Control-Expose-Headers` naming the headers the API sets for clients. That holds for every
  answer, errors included (a 401 or a 429 a page should be able to read), event streams too;
- a preflight (`OPTIONS` with `Access-Control-Request-Method`) on a /v1/ path is answered here,
  before the API keys and the rate limit (a browser sends no credentials with it): 204 with the
  methods, headers and max-age allowed, or 403 problem+json for an origin not allowed;
- a request from an origin not allowed is served as if CORS were off (no CORS header: the browser
  keeps the answer from the page; a server-side client, which sends no `Origin`, is unaffected);
- with a list of origins (not `*`) every answer says `Vary: Origin`, so a cache in between keeps
  one copy per origin.

`Access-Control-Allow-Credentials` is never sent: the API authenticates with the Authorization
header, which a page sets itself, not with cookies; so `*` means "any origin, no credentials".

Why not the aiohttp-cors library: it answers preflights from handlers it adds to each route, so they
would run behind our API-key and rate-limit middlewares (a preflight carries no key: 401), only on the
routes registered with it (a path with no route gets no preflight answer), and its refusals are plain
text, not problem+json. What it would do for us is the few lines below.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Middleware

from service.problems import Handler, Problem

ANY = "*"
ALLOW_METHODS = "GET, POST, DELETE"
ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID"
EXPOSE_HEADERS = "Location, Retry-After, WWW-Authenticate, X-Procbridge-Elapsed-Ms, X-Procbridge-Worker"
MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer (Chromium caps it at 7200)


class CorsPolicy:
    """The allowed origins; `*` among them allows any."""

    def __init__(self, origins: Iterable[str]) -> None:
        origins = tuple(origins)
        self.any = ANY in origins
        self.origins = frozenset(o for o in origins if o != ANY)

    def allows(self, origin: str) -> bool:
        return self.any or origin in self.origins

    def install(self, app: web.Application) -> Middleware:
        """Add the response headers to `app` (a signal: they reach streamed answers too, before
        their headers go out) and return the preflight middleware, to place before the keys."""
        app.on_response_prepare.append(self._on_prepare)
        return self._middleware()

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        if not self.any:  # the answer depends on the Origin: a cache must keep one per origin
            vary = headers.get("Vary")
            if vary is None:
                headers["Vary"] = "Origin"
            elif "origin" not in vary.lower():
                headers["Vary"] = f"{vary}, Origin"
        origin = request.headers.get("Origin")
        if origin is None or not self.allows(origin):
            return
        headers["Access-Control-Allow-Origin"] = ANY if self.any else origin
        if request.method != "OPTIONS":
            headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS

    def _middleware(self) -> Middleware:
        @web.middleware
        async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
            if (
                request.method == "OPTIONS"
                and "Access-Control-Request-Method" in request.headers
                and request.path.startswith("/v1/")
            ):
                origin = request.headers.get("Origin")
                if origin is None or not self.allows(origin):
                    raise Problem(403, "origin-not-allowed",
                                  f"the origin {origin!r} may not call this API from a browser (--cors-origins)")
                return web.Response(status=204, headers={
                    "Access-Control-Allow-Methods": ALLOW_METHODS,
                    "Access-Control-Allow-Headers": ALLOW_HEADERS,
                    "Access-Control-Max-Age": MAX_AGE,
                })
            return await handler(request)

        return preflight
