"""The HTTP connection layer's limits, and problem+json for what never reaches the application.

aiohttp answers a request it cannot parse (a garbage request line, an over-long header, too many
headers, a bad Content-Length or chunked encoding) in `RequestHandler.handle_error`, outside the
app's middlewares, with a text/plain body; and it has no deadline for a request head that trickles
in, nor any cap on connections. This module closes those gaps with the smallest change that works
on the installed aiohttp (3.14): a `web.RequestHandler` subclass (the per-connection protocol,
exported by `aiohttp.web`) whose `handle_error` answers problem+json, which closes a connection
whose request head is not complete `HEADER_TIMEOUT` seconds after its first byte (or after the
connection opened), and which refuses a connection over `MAX_CONNECTIONS` in all or
`MAX_CONNECTIONS_PER_CLIENT` from one address. aiohttp has no supported hook for any of this:
`web.Server` builds its `RequestHandler` itself, so `GuardedServer` overrides `__call__` (the
protocol factory) and `GuardedAppRunner` overrides `AppRunner._make_server` to hand out a
`GuardedServer` built from the very arguments aiohttp prepared. The few private attributes read here
(`_request_count`, `_request_in_progress`, `_current_request`, `_messages`, `_loop`, `_kwargs`) are
checked by tests/e2e/test_hostile.py (`test_the_aiohttp_internals_this_module_uses_are_still_there`),
which fails if an aiohttp upgrade moves them.

Every limit is a constant here, documented in docs/security.md ("Hostile input and fuzzing").
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import Counter
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestPayloadError

from service.problems import PROBLEM_JSON, Problem

log = logging.getLogger("procbridge.http")

# -- the limits -------------------------------------------------------------------------------------

MAX_LINE_SIZE = 16 * 1024  # bytes of the request line (method, URL, version): over it, 414 uri-too-long
MAX_FIELD_SIZE = 8190  # bytes of one header field, name and value: over it, 431 header-too-large
MAX_HEADERS = 100  # header fields in one request: over it, 431 header-too-large
HEADER_TIMEOUT = 10.0  # seconds from a request head's first byte (or the connection's start) to its end
KEEPALIVE_TIMEOUT = 75.0  # an idle keep-alive connection is closed after this (above common LB idle times)
LINGERING_TIME = 5.0  # after an early answer (413, 408, ...), seconds spent discarding the unread body
READ_BUFSIZE = 64 * 1024  # bytes buffered per connection before reading pauses
BACKLOG = 1024  # the listening socket's accept queue
MAX_CONNECTIONS = 10_000  # open connections in all (also capped by the open-file limit, see below)
MAX_CONNECTIONS_PER_CLIENT = 256  # open connections from one client address
FD_RESERVE = 256  # file descriptors kept free for workers, pipes, shared memory and the job store

RUNNER_LIMITS: dict[str, Any] = {
    "keepalive_timeout": KEEPALIVE_TIMEOUT,
    "max_line_size": MAX_LINE_SIZE,
    "max_field_size": MAX_FIELD_SIZE,
    "max_headers": MAX_HEADERS,
    "lingering_time": LINGERING_TIME,
    "read_bufsize": READ_BUFSIZE,
    # Content-Encoding is refused (415) in service/body.py; never inflate a body on the event loop.
    "auto_decompress": False,
}


def connection_cap(limit: int = MAX_CONNECTIONS) -> int:
    """MAX_CONNECTIONS, lowered to what the open-file limit (RLIMIT_NOFILE) leaves after FD_RESERVE:
    past it, accept() would fail with EMFILE for everyone instead of a clear refusal for some."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limit
    return max(16, min(limit, soft - FD_RESERVE))


# -- problems for what the parser refuses -------------------------------------------------------------


def parse_problem(status: int, exc: BaseException | None, message: str | None) -> Problem:
    """The problem for an error aiohttp reports to `handle_error`: a request it could not parse
    (status 400 with the parser's exception), or a failure of the handler itself (500, 504)."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == MAX_LINE_SIZE:
            return Problem(414, "uri-too-long", f"the request line is longer than {MAX_LINE_SIZE} bytes")
        return Problem(431, "header-too-large", f"a header field is longer than {MAX_FIELD_SIZE} bytes")
    if isinstance(exc, BadHttpMessage) and "too many headers" in exc.message.lower():
        return Problem(431, "header-too-large", f"more than {MAX_HEADERS} header fields")
    if status < 500:
        reason = (getattr(exc, "message", None) or message or "").strip().splitlines()
        what = reason[0].rstrip(":")[:200] if reason else "it could not be parsed"
        return Problem(400, "bad-request", f"malformed HTTP request: {what}")
    if status == 504:
        return Problem(504, "timeout", "the request timed out inside the service")
    return Problem(500, "internal-error", "an unexpected error occurred; see the server log")


def raw_response(problem: Problem, extra_headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response with this problem, closing the connection: for writing straight
    to a transport where there is no request to answer through aiohttp."""
    body = orjson.dumps(problem.body())
    reason = {408: "Request Timeout", 503: "Service Unavailable"}.get(problem.status, "Error")
    headers = {"Content-Type": PROBLEM_JSON, "Content-Length": str(len(body)), "Connection": "close",
               **(extra_headers or {})}
    head = f"HTTP/1.1 {problem.status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


_HEAD_TIMEOUT_RESPONSE = raw_response(
    Problem(408, "request-timeout", f"the request head did not arrive within {HEADER_TIMEOUT:g} s")
)


# -- the connection -------------------------------------------------------------------------------------


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol with a request-head deadline, the connection caps and
    problem+json for errors raised before a request reaches the application."""

    __slots__ = ("_client", "_guard", "_head_bytes", "_head_timer")

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._client: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        refusal = self._guard.admit(client)
        if refusal is not None:
            # Answer before reading anything, so a real client learns why; then drop the connection.
            cast(asyncio.Transport, transport).write(refusal)  # uvloop's transports are not registered subclasses
            self.force_close()
            return
        self._client = client
        self._arm_head_timer()  # the first request head, too, has HEADER_TIMEOUT to arrive

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_timer()
        if self._client is not None:
            self._guard.release(self._client)
            self._client = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:  # a request head was parsed (or refused as malformed)
            self._disarm_head_timer()
            self._fail_body_on_parse_error()
        elif data and not self._request_in_progress:  # the start of a request head, or more of one
            self._head_bytes = True
            if self._head_timer is None:
                self._arm_head_timer()

    def _fail_body_on_parse_error(self) -> None:
        """The body of the request being handled broke its framing (a bad chunk size, say): aiohttp's
        C parser queues a 400 for after the handler but leaves the handler's body stream waiting for
        bytes that will never be parsed. End that stream with the error, so the handler answers 400
        now instead of waiting for the body deadline."""
        current = self._current_request
        if current is None or not self._messages:
            return
        error = getattr(self._messages[-1][0], "exc", None)  # an _ErrInfo: the parser refused the rest
        if isinstance(error, HttpProcessingError) and not current.content.is_eof():
            current.content.set_exception(RequestPayloadError(error.message))
            self._guard.broken_bodies += 1

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(HEADER_TIMEOUT, self._head_expired)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_bytes = False

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport is None or self._request_in_progress:
            return
        if self._head_bytes:  # part of a head came: say why the connection ends
            self.transport.write(_HEAD_TIMEOUT_RESPONSE)
        self._guard.head_timeouts += 1
        self.force_close()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """As aiohttp's, but the answer is problem+json; a malformed request (the client's fault,
        and what a scanner sends) is logged at debug level, not as an error with a traceback."""
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            log.debug("malformed request from %s: %s", request.remote, exc)
        if request.writer.output_size > 0:  # as aiohttp's: part of a response is out, the connection is lost
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        response = parse_problem(status, exc, message).response()
        response.force_close()
        return response


class GuardedServer(web.Server):
    """aiohttp's protocol factory, handing out `GuardedRequestHandler`s and counting connections."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = connection_cap()
        self.max_per_client = MAX_CONNECTIONS_PER_CLIENT
        self.open_connections = 0
        self.per_client: Counter[str] = Counter()
        self.refused = 0
        self.head_timeouts = 0
        self.broken_bodies = 0

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)

    def admit(self, client: str) -> bytes | None:
        """None: the connection is counted; else the response that refuses it."""
        if self.open_connections >= self.max_connections:
            detail = f"the service has {self.open_connections} connections open, its limit; retry later"
        elif self.per_client[client] >= self.max_per_client:
            detail = f"{self.max_per_client} connections from {client} are open, the limit per client"
        else:
            self.open_connections += 1
            self.per_client[client] += 1
            return None
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warning("refused a connection from %s (%d so far): %s", client, self.refused, detail)
        return raw_response(Problem(503, "too-many-connections", detail), {"Retry-After": "1"})

    def release(self, client: str) -> None:
        self.open_connections -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]


class GuardedAppRunner(web.AppRunner):
    """`web.AppRunner` whose server is a `GuardedServer`, built from the arguments aiohttp's own
    `_make_server` prepared (after the app's startup hooks ran there)."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )
