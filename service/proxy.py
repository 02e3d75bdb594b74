"""The serving processes' pass-through to the core (`--http-processes N`, N ≥ 2): every request a
serving process does not answer itself (jobs, maps, streams, /metrics, /v1/workers, the dashboard,
/openapi.json) goes, after this process's keys, rate and CORS checks, to the core's private Unix
socket, and its answer comes back as it is, streamed (an SSE stream or an NDJSON map stays live).

Written by hand (about 60 lines) because no maintained aiohttp reverse-proxy library exists; it
uses aiohttp's own client. Hop-by-hop headers are dropped both ways (RFC 9110 §7.6.1); the body is
passed on as it arrives, and the core applies its own limits and deadlines to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from service.problems import draining

CORE_SESSION = web.AppKey("core_session", aiohttp.ClientSession)

_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "expect",
})


def setup(app: web.Application, core_path: str) -> None:
    """Route everything this app does not serve itself to the core at `core_path`."""
    app.router.add_route("*", "/{tail:.*}", proxy)
    app.cleanup_ctx.append(lambda app: _session(app, core_path))


async def _session(app: web.Application, core_path: str) -> AsyncIterator[None]:
    connector = aiohttp.UnixConnector(path=core_path, limit=0)
    timeout = aiohttp.ClientTimeout(total=None, connect=10.0)  # a stream may stay open for hours
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        app[CORE_SESSION] = session
        yield


async def proxy(request: web.Request) -> web.StreamResponse:
    session = request.app[CORE_SESSION]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
    body = request.content if request.body_exists else None
    try:
        upstream = await session.request(
            request.method, "http://core" + request.rel_url.raw_path_qs, headers=headers, data=body,
            allow_redirects=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
    except aiohttp.ClientError as exc:
        raise draining() from exc  # the core is stopping (or gone): this process stops with it
    async with upstream:
        out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
        if upstream.content_length is not None or request.method == "HEAD":
            return web.Response(status=upstream.status, headers=out, body=await upstream.read())
        response = web.StreamResponse(status=upstream.status, headers=out)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response
