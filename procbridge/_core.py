"""What the sync and the asyncio client share, without I/O: settings, request encoding, answer
decoding, the retry policy, and the incremental NDJSON readers (a job's server-sent events, and when
to reopen their stream: procbridge/_events.py).

Each client (procbridge/client.py, procbridge/aio.py) only moves bytes with httpx and sleeps: every
decision (what to send, what an answer means, whether and how long to wait before a retry) is here,
so the two cannot drift apart.
"""

from __future__ import annotations

import base64
import json
import os
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from procbridge._events import Event
from procbridge._version import __version__
from procbridge.errors import (
    Overloaded,
    ProblemError,
    ProcbridgeError,
    ProtocolError,
    RateLimited,
    ServiceUnreachable,
    Timeout,
    problem_error,
)

DEFAULT_URL = "http://127.0.0.1:8080"
CONNECT_TIMEOUT = 10.0  # seconds to open a connection when the client has no timeout of its own
JSON_TYPE = "application/json"
PROBLEM_TYPE = "application/problem+json"
NDJSON_TYPE = "application/x-ndjson"
OCTET_STREAM = "application/octet-stream"
FINAL_STATUSES = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Settings:
    url: str
    api_key: str | None
    timeout: float | None
    retries: int

    @classmethod
    def resolve(cls, url: str | None, api_key: str | None, timeout: float | None, retries: int) -> Settings:
        """The argument, else the environment (PROCBRIDGE_URL, PROCBRIDGE_API_KEY), else the default."""
        url = url or os.environ.get("PROCBRIDGE_URL") or DEFAULT_URL
        if "://" not in url:
            url = "http://" + url
        key = api_key if api_key is not None else (os.environ.get("PROCBRIDGE_API_KEY") or None)
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive (or None for no limit)")
        return cls(url.rstrip("/"), key, timeout, retries)

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"procbridge-client/{__version__}", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def http_timeout(self) -> httpx.Timeout:
        """Each connect, read and write may take the client's timeout; unset: reads wait as long as
        a task runs, only the connect is bounded."""
        if self.timeout is None:
            return httpx.Timeout(None, connect=CONNECT_TIMEOUT)
        return httpx.Timeout(self.timeout, connect=min(self.timeout, CONNECT_TIMEOUT))

    def http_options(self) -> dict[str, Any]:
        """What `httpx.Client` and `httpx.AsyncClient` are made with, the same for both: the base URL,
        the key, the timeouts, and no redirect followed (a redirect would carry the key elsewhere)."""
        return {"base_url": self.url, "headers": self.headers(), "timeout": self.http_timeout(),
                "follow_redirects": False}

    def deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout


def task_path(task: str) -> str:
    if not isinstance(task, str) or not task:
        raise TypeError("a task is named by a non-empty string")
    return "/v1/tasks/" + quote(task, safe="")


def job_path(job_id: str) -> str:
    return "/v1/jobs/" + quote(str(job_id), safe="")


def _default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}  # docs/api.md: bytes in JSON
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def encode_json(value: Any) -> bytes:
    """JSON for a request body; bytes anywhere in it go as {"base64": ...}, as the API takes them."""
    try:
        return json.dumps(value, default=_default, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"arguments are not JSON-able: {exc}") from None


def query_value(value: Any) -> str:
    """One argument as query-string text, as the service parses it (service/query_args.py)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return repr(value)
    return encode_json(value).decode()


def merge_args(args: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A task's arguments from the positional mapping (the escape hatch for names that are keywords of
    the method) and the keyword arguments; a name in both is an error, not a silent override."""
    merged = dict(args or {})
    both = sorted(set(merged) & set(kwargs))
    if both:
        raise TypeError(f"argument {both[0]!r} given both in the mapping and as a keyword")
    merged.update(kwargs)
    return merged


@dataclass(frozen=True)
class Request:
    """One HTTP request, as both clients send it."""

    method: str
    path: str
    params: dict[str, str] | None = None
    content: bytes | None = None
    content_type: str | None = None
    accept: str | None = None

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.content_type:
            headers["Content-Type"] = self.content_type
        if self.accept:
            headers["Accept"] = self.accept
        return headers


def call_request(task: str, data: bytes | bytearray | memoryview | None, args: dict[str, Any]) -> Request:
    if data is None:
        return Request("POST", task_path(task), content=encode_json(args), content_type=JSON_TYPE,
                       accept=f"{JSON_TYPE}, {NDJSON_TYPE}, */*")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"the binary body must be bytes, not {type(data).__name__}")
    params = {name: query_value(value) for name, value in args.items()}
    return Request("POST", task_path(task), params=params or None, content=bytes(data), content_type=OCTET_STREAM,
                   accept="*/*")


def map_request(task: str, items: Iterable[Mapping[str, Any]], ordered: bool, task_timeout: float | None) -> Request:
    listed = [dict(item) for item in items]
    params = {"timeout": query_value(task_timeout)} if task_timeout is not None else None
    return Request("POST", task_path(task) + "/map", params=params,
                   content=encode_json({"items": listed, "ordered": bool(ordered)}), content_type=JSON_TYPE,
                   accept=NDJSON_TYPE)


def submit_request(task: str, args: dict[str, Any], idempotency_key: str | None, priority: int | None,
                   delay: float | None, timeout: float | None, *, run_at: float | None = None,
                   retries: int | None = None, webhook: str | None = None) -> tuple[Request, dict[str, str]]:
    """POST /v1/jobs; each option goes in the body only when given, so the service's own default holds
    (docs/api.md "Jobs": priority 0, at once, the task's retries, no webhook)."""
    if delay is not None and run_at is not None:
        raise ValueError("give delay (seconds from now) or run_at (epoch seconds), not both")
    body: dict[str, Any] = {"task": task, "args": args}
    for name, value in (("timeout", timeout), ("priority", priority), ("delay", delay), ("run_at", run_at),
                        ("retries", retries), ("webhook", webhook)):
        if value is not None:
            body[name] = value
    extra = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
    return Request("POST", "/v1/jobs", content=encode_json(body), content_type=JSON_TYPE), extra


def jobs_request(status: str | None, limit: int | None, task: str | None, cursor: str | None = None) -> Request:
    """GET /v1/jobs: one page, newest first; `cursor` is the `next` of the page before."""
    pairs = (("status", status), ("limit", limit), ("task", task), ("cursor", cursor))
    params = {name: str(value) for name, value in pairs if value is not None}
    return Request("GET", "/v1/jobs", params=params or None)


def jobs_page(doc: Any) -> tuple[list[dict[str, Any]], str | None]:
    """A listing's jobs and the cursor of the page after it (None after the last page)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise ProtocolError(f"expected an object with 'jobs' (list), got {str(doc)[:200]}")
    following = doc.get("next")
    if following is not None and (not isinstance(following, str) or not following):
        raise ProtocolError(f"the listing's 'next' is not a cursor: {following!r}")
    return list(doc["jobs"]), following


def events_request(job_id: str) -> Request:
    return Request("GET", job_path(job_id) + "/events", accept="text/event-stream")


def media_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None  # an HTTP date: not what this service sends; treated as absent
    return max(0.0, value) if value == value else None


def parse_json(body: bytes, what: str, status: int | None = None) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise ProtocolError(f"{what} is not JSON: {body[:200]!r}", status) from None


def error_for(response: httpx.Response, body: bytes) -> ProcbridgeError:
    """The error an unsuccessful answer stands for: its problem document as a ProblemError, or a
    ProtocolError for an answer that is not a problem document (a proxy's error page)."""
    doc: Any = None
    if media_type(response) in (PROBLEM_TYPE, JSON_TYPE):
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
    if isinstance(doc, dict) and isinstance(doc.get("type"), str):
        doc.setdefault("status", response.status_code)
        return problem_error(doc, retry_after(response))
    text = body[:200].decode("utf-8", "replace")
    return ProtocolError(f"HTTP {response.status_code} without a problem document: {text!r}", response.status_code)


def decode_result(response: httpx.Response, body: bytes) -> Any:
    """A successful call's result: the JSON envelope's "result", or the bytes of a binary answer."""
    kind = media_type(response)
    if kind == JSON_TYPE:
        envelope = parse_json(body, "the answer", response.status_code)
        if not isinstance(envelope, dict) or "result" not in envelope:
            raise ProtocolError(f"the answer has no result: {body[:200]!r}", response.status_code)
        return envelope["result"]
    if kind == NDJSON_TYPE:  # a generator task, read whole: its items as a list
        items = []
        for line in body.splitlines():
            item = stream_line(line)
            if item is not END:
                items.append(item)
        return items
    return body  # application/octet-stream, image/png: the bytes as they are


class _End:
    pass


END: Any = _End()


def stream_line(line: bytes | str) -> Any:
    """One line of a generator task's NDJSON answer: the item, END, or raise its error."""
    if not line.strip():
        return END
    doc = parse_json(line if isinstance(line, bytes) else line.encode(), "a stream line")
    if isinstance(doc, dict):
        if "item" in doc:
            return doc["item"]
        if doc.get("end") is True:
            return END
        if isinstance(doc.get("error"), dict):
            raise problem_error(doc["error"])
    raise ProtocolError(f"not a stream line: {line[:200]!r}")


def map_line(line: bytes | str) -> tuple[int, Any] | None:
    """One line of a map answer: (index, result), (index, ProblemError) for an item's error, None for
    a blank line."""
    if not line.strip():
        return None
    doc = parse_json(line if isinstance(line, bytes) else line.encode(), "a map line")
    if not isinstance(doc, dict) or not isinstance(doc.get("index"), int):
        raise ProtocolError(f"not a map line: {line[:200]!r}")
    index = doc["index"]
    if "error" in doc:
        error = problem_error(doc["error"] if isinstance(doc["error"], dict) else {"detail": str(doc["error"])})
        error.index = index
        return index, error
    if "result" not in doc:
        raise ProtocolError(f"a map line with neither result nor error: {line[:200]!r}")
    result = doc["result"]
    if doc.get("encoding") == "base64" and isinstance(result, str):
        result = base64.b64decode(result)
    return index, result


class MapOrder:
    """Turns the (index, value) lines of a map answer into what `map` yields; checks every item came."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.seen: set[int] = set()

    def take(self, index: int) -> None:
        if index in self.seen or not 0 <= index < self.total:
            raise ProtocolError(f"map line for index {index}: repeated or out of range (0..{self.total - 1})")
        self.seen.add(index)

    def finish(self) -> None:
        if len(self.seen) != self.total:
            missing = self.total - len(self.seen)
            raise ServiceUnreachable(f"the map answer ended with {missing} of {self.total} items missing")


class JobHandle:
    """What `Job` and `AsyncJob` share: the id, the client that asks about it, the last document seen;
    two handles are equal when they name the same job through the same client."""

    def __init__(self, client: Any, job_id: str, doc: dict[str, Any] | None = None) -> None:
        self.id = job_id
        self._client = client
        self._doc = doc

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobHandle) and type(other) is type(self) and other.id == self.id \
            and other._client is self._client

    def __hash__(self) -> int:
        return hash(self.id)


def job_outcome(event: Event) -> tuple[bool, Any]:
    """A final event: (True, result) for `result` (a binary result: (True, None), fetch result_url),
    raise the job's error for `error`."""
    if event.type == "result":
        data = event.data if isinstance(event.data, dict) else {}
        return True, data
    error = event.data if isinstance(event.data, dict) else {}
    raise job_error(error)


def job_error(error: dict[str, Any]) -> ProblemError:
    if isinstance(error.get("type"), str):
        return problem_error(error)
    status = error.get("status")
    if status == "cancelled":
        return problem_error({"type": "/problems/job-cancelled", "status": 409, "title": "Job cancelled",
                              "detail": "the job was cancelled"})
    return ProblemError({"type": "about:blank", "status": 0, "title": "Job failed", "detail": str(error)})


class Backoff:
    """When (and whether) to try a request again.

    Retried: 503 `overloaded` and 429 `rate-limited` (the service did not start the work), after
    `Retry-After` seconds stretched by up to 20 % of jitter so that clients refused together do not
    come back together; and a failure to connect (nothing was sent). Nothing else: an answer lost after
    the request went out may belong to a task that ran, and running it again is the caller's decision
    (at-most-once). At most `retries` retries, and none that would end past the client's deadline.
    """

    def __init__(self, settings: Settings, retries: int | None = None) -> None:
        self.retries = settings.retries if retries is None else retries
        self.deadline = settings.deadline()
        self.attempt = 0

    def _wait(self, base: float) -> float | None:
        if self.attempt >= self.retries:
            return None
        delay = base * random.uniform(1.0, 1.2)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        self.attempt += 1
        return delay

    def after_answer(self, error: ProcbridgeError) -> float | None:
        """Seconds to wait before retrying a refused request, or None: raise `error`."""
        if not isinstance(error, Overloaded | RateLimited):
            return None
        base = error.retry_after if error.retry_after is not None else 0.5 * 2**self.attempt
        return self._wait(base)

    def after_connect_error(self) -> float | None:
        return self._wait(0.1 * 2**self.attempt)


def transport_error(exc: httpx.HTTPError, url: str) -> ProcbridgeError:
    """An httpx failure as this client's error (never the httpx exception itself)."""
    if isinstance(exc, httpx.TimeoutException):
        return Timeout(f"{url}: no answer in time ({type(exc).__name__})")
    if isinstance(exc, httpx.TransportError):
        return ServiceUnreachable(f"{url}: {type(exc).__name__}: {exc}")
    return ProtocolError(f"{url}: {type(exc).__name__}: {exc}")


def is_connect_error(exc: BaseException) -> bool:
    """The request never reached the service: safe to send again."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise Timeout("the deadline passed")
    return left


__all__ = ["END", "Backoff", "Event", "ProblemError", "Request", "Settings"]
