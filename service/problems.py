"""The error model: every failure leaves the service as RFC 9457 problem+json.

Handlers raise `Problem`; the middleware here turns it (and aiohttp's own HTTP errors, and anything
unexpected) into one response shape: {"type": "/problems/<slug>", "title", "status", "detail"}.
The problems several places raise are built here, once each (`invalid_argument`, `draining`,
`overloaded`, `from_pool_error`), so a slug, a header or a wording cannot drift between endpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import orjson
from aiohttp import web

from workers.errors import (
    ExecutorUnavailable,
    Overloaded,
    PoolClosed,
    PoolError,
    StreamingUnsupported,
    TaskFailed,
    TaskTimeout,
    WorkerCrashed,
)

log = logging.getLogger("procbridge.http")

PROBLEM_JSON = "application/problem+json"

TITLES = {
    "invalid-json": "Body is not valid JSON, or not a JSON object",
    "unauthorized": "Missing or wrong API key",
    "not-found": "No such resource",
    "unknown-task": "No such task",
    "unknown-job": "No such job",
    "method-not-allowed": "Method not allowed",
    "job-finished": "The job has already finished",
    "expectation-failed": "Expectation failed",
    "payload-too-large": "Request body too large",
    "unsupported-media-type": "Unsupported media type",
    "invalid-arguments": "Arguments do not fit the task",
    "rate-limited": "Too many requests",
    "task-failed": "The task raised an exception",
    "internal-error": "Internal server error",
    "worker-crashed": "The worker process died while running the task",
    "overloaded": "Too much work is waiting",
    "draining": "The service is shutting down",
    "task-timeout": "The task ran past its timeout",
    "bad-request": "Malformed request",
    "request-timeout": "The request did not arrive in time",
    "uri-too-long": "Request line too long",
    "header-too-large": "Request header fields too large",
    "too-many-connections": "Too many open connections",
    "timeout": "The request timed out inside the service",
    "streaming-unsupported": "This executor cannot stream the task's items",
    "origin-not-allowed": "This origin may not call the API from a browser",
}


SLUG = web.ResponseKey("slug", str)  # response[SLUG]: the slug of a problem response, for the access log


class Problem(Exception):
    """An HTTP error with a problem+json body; raise it anywhere below a handler."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {
            "type": f"/problems/{self.slug}",
            "title": TITLES.get(self.slug, self.slug.replace("-", " ").capitalize()),
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }

    def response(self) -> web.Response:
        response = web.Response(
            status=self.status, body=orjson.dumps(self.body()), content_type=PROBLEM_JSON, headers=self.headers
        )
        response[SLUG] = self.slug  # for the access log, which sees the response but not the Problem
        return response


def invalid_arguments(detail: str, errors: list[dict[str, str]]) -> Problem:
    """422 `invalid-arguments`: `errors` lists each faulty field as {"field", "message"}."""
    return Problem(422, "invalid-arguments", detail, errors=errors)


def invalid_argument(field: str, detail: str, message: str, *, more: Iterable[str] = ()) -> Problem:
    """422 `invalid-arguments` for one field: the detail reads "<field>: <detail>", and `errors` lists
    the field (and `more` fields with the same fault) with the short `message`."""
    return invalid_arguments(f"{field}: {detail}", [{"field": f, "message": message} for f in (field, *more)])


DRAINING = "the service is shutting down and takes no new work"


def draining() -> Problem:
    """503 `draining`: new work while the service shuts down. Retry-After 5: by then a load balancer
    has taken this replica out (its /readyz answers 503), or the restarted one is up."""
    return Problem(503, "draining", DRAINING, headers={"Retry-After": "5"})


def overloaded(pending: int) -> Problem:
    """503 `overloaded`: `pending` calls already wait for a worker. Retry-After 1: a queue drains fast."""
    return Problem(503, "overloaded", f"{pending} tasks are already waiting for a worker; retry later",
                   headers={"Retry-After": "1"})


def from_pool_error(exc: PoolError, *, debug: bool = False) -> Problem:
    """The one place where a pool outcome becomes an HTTP status and slug."""
    if isinstance(exc, TaskFailed):
        extra: dict[str, Any] = {"exception": exc.exc_type}
        if debug and exc.traceback:
            extra["traceback"] = exc.traceback
        return Problem(500, "task-failed", str(exc), **extra)
    if isinstance(exc, WorkerCrashed | ExecutorUnavailable):  # the upstream failed: one 502 for both
        return Problem(502, "worker-crashed", str(exc))
    if isinstance(exc, TaskTimeout):
        return Problem(504, "task-timeout", str(exc))
    if isinstance(exc, Overloaded):
        return overloaded(exc.pending)
    if isinstance(exc, PoolClosed):
        return draining()
    if isinstance(exc, StreamingUnsupported):
        return Problem(501, "streaming-unsupported", str(exc))
    return Problem(500, "internal-error", f"{type(exc).__name__}: {exc}")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_SLUGS = {
    404: "not-found",
    405: "method-not-allowed",
    413: "payload-too-large",
    415: "unsupported-media-type",
    400: "bad-request",
    408: "request-timeout",
    414: "uri-too-long",
    431: "header-too-large",
}


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as p:
        return p.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        slug = _HTTP_SLUGS.get(exc.status, "bad-request" if exc.status < 500 else "internal-error")
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 404:
            detail = f"no route for {request.method} {request.path}"
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return Problem(exc.status, slug, detail, headers=headers).response()
    except (ConnectionResetError, TimeoutError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return Problem(500, "internal-error", "an unexpected error occurred; see the server log").response()
