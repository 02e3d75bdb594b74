"""The errors a procbridge client raises: one family, so `except procbridge.ProcbridgeError` catches
everything the client can fail with, and never an exception of the HTTP library underneath.

- `ProblemError`: the service answered with an RFC 9457 problem document (docs/api.md, "Errors"). One
  subclass per slug, named after it in CamelCase (`invalid-arguments` -> `InvalidArguments`);
  `problem_error(doc)` picks the class. A slug this client does not know gives a plain `ProblemError`.
- `ServiceUnreachable`: no answer at all (connection refused, reset, the server went away mid-answer).
- `ProtocolError`: an answer that is not what the API says (a proxy's HTML error page, a broken line).
- `Timeout`: a deadline this client was given ran out (also a `TimeoutError`, so
  `concurrent.futures`-style code that catches `TimeoutError` catches it).
"""

from __future__ import annotations

from typing import Any


class ProcbridgeError(Exception):
    """Base of every error the client raises."""


class ServiceUnreachable(ProcbridgeError):
    """The service could not be reached, or the connection broke before a whole answer arrived."""


class ProtocolError(ProcbridgeError):
    """The service's answer does not follow the API (unexpected content type, malformed body)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Timeout(ProcbridgeError, TimeoutError):  # a TimeoutError too, as concurrent.futures code expects
    """A client-side deadline (the client's `timeout`, `Job.result(timeout=)`, `map(timeout=)`) passed."""


class ProblemError(ProcbridgeError):
    """The service refused or failed the request with a problem document.

    `status` (HTTP status), `slug` (the last part of `type`, e.g. "invalid-arguments"), `title`,
    `detail`, `problem` (the whole document: extra members such as `errors` or `exception` are
    there), `retry_after` (seconds, from the `Retry-After` header, or None). Map items carry their
    `index` (None elsewhere).
    """

    slug_name: str | None = None  # the slug a subclass stands for

    def __init__(self, problem: dict[str, Any], retry_after: float | None = None) -> None:
        self.problem = dict(problem)
        status = problem.get("status")
        self.status: int = status if isinstance(status, int) else 0
        self.slug: str = slug_of(problem)
        self.title: str = str(problem.get("title") or "")
        self.detail: str = str(problem.get("detail") or "")
        self.retry_after = retry_after
        self.index: int | None = None
        super().__init__(self.detail or self.title or self.slug)

    def __str__(self) -> str:
        return f"{self.status} {self.slug}: {self.detail or self.title}"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (an executor's future may cross processes)
        return (type(self), (self.problem, self.retry_after))


def slug_of(problem: dict[str, Any]) -> str:
    kind = problem.get("type")
    return kind.rsplit("/", 1)[-1] if isinstance(kind, str) and kind else "about:blank"


def _camel(slug: str) -> str:
    return "".join(part.capitalize() for part in slug.split("-"))


# Every slug the service answers with (service/problems.py); docs/api.md's table first.
SLUGS = (
    "invalid-json", "unauthorized", "unknown-task", "unknown-job", "job-finished", "payload-too-large",
    "unsupported-media-type", "invalid-arguments", "rate-limited", "task-failed", "worker-crashed",
    "overloaded", "draining", "task-timeout",
    # beyond the table
    "not-found", "method-not-allowed", "job-not-finished", "job-failed", "job-cancelled", "expectation-failed",
    "bad-request", "request-timeout", "uri-too-long", "header-too-large", "internal-error",
    "streaming-unsupported", "too-many-connections", "timeout",
)


class InvalidJson(ProblemError):
    slug_name = "invalid-json"


class Unauthorized(ProblemError):
    slug_name = "unauthorized"


class NotFound(ProblemError):
    slug_name = "not-found"


class UnknownTask(NotFound):
    slug_name = "unknown-task"


class UnknownJob(NotFound):
    slug_name = "unknown-job"


class MethodNotAllowed(ProblemError):
    slug_name = "method-not-allowed"


class JobFinished(ProblemError):
    slug_name = "job-finished"


class JobNotFinished(ProblemError):
    slug_name = "job-not-finished"


class JobFailed(ProblemError):
    slug_name = "job-failed"


class JobCancelled(ProblemError):
    slug_name = "job-cancelled"


class ExpectationFailed(ProblemError):
    slug_name = "expectation-failed"


class PayloadTooLarge(ProblemError):
    slug_name = "payload-too-large"


class UnsupportedMediaType(ProblemError):
    slug_name = "unsupported-media-type"


class InvalidArguments(ProblemError):
    slug_name = "invalid-arguments"

    @property
    def errors(self) -> list[dict[str, Any]]:
        """[{"field", "message"}, ...] as the service lists the faulty fields."""
        errors = self.problem.get("errors")
        return list(errors) if isinstance(errors, list) else []


class BadRequest(ProblemError):
    slug_name = "bad-request"


class RequestTimeout(ProblemError):
    slug_name = "request-timeout"


class UriTooLong(ProblemError):
    slug_name = "uri-too-long"


class HeaderTooLarge(ProblemError):
    slug_name = "header-too-large"


class RateLimited(ProblemError):
    slug_name = "rate-limited"


class TaskFailed(ProblemError):
    slug_name = "task-failed"

    @property
    def exception(self) -> str | None:
        """The task's exception type, as the service names it ("ValueError")."""
        value = self.problem.get("exception")
        return value if isinstance(value, str) else None


class InternalError(ProblemError):
    slug_name = "internal-error"


class StreamingUnsupported(ProblemError):
    slug_name = "streaming-unsupported"


class WorkerCrashed(ProblemError):
    slug_name = "worker-crashed"


class Overloaded(ProblemError):
    slug_name = "overloaded"


class Draining(ProblemError):
    slug_name = "draining"


class TooManyConnections(ProblemError):
    slug_name = "too-many-connections"


class TaskTimeout(ProblemError):
    slug_name = "task-timeout"


class ServiceTimeout(ProblemError):  # slug "timeout": the request timed out inside the service
    slug_name = "timeout"


def _classes() -> dict[str, type[ProblemError]]:
    found: dict[str, type[ProblemError]] = {}
    todo = list(ProblemError.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.slug_name:
            found[cls.slug_name] = cls
    return found


PROBLEM_CLASSES: dict[str, type[ProblemError]] = _classes()


def problem_error(problem: dict[str, Any], retry_after: float | None = None) -> ProblemError:
    """The `ProblemError` subclass for the document's slug (a plain `ProblemError` for one unknown here)."""
    return PROBLEM_CLASSES.get(slug_of(problem), ProblemError)(problem, retry_after)
