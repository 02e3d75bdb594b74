"""A job's server-sent events, without I/O: the `Event`, the parser of the stream, and the rules for
opening a broken stream again where it broke (`StreamResume`), which the sync client
(procbridge/_sync_events.py) and the asyncio client (procbridge/aio.py) follow alike."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any, Protocol

from procbridge.errors import Draining, Overloaded, ProblemError, ProcbridgeError, RateLimited, ServiceUnreachable

RESUMABLE = (ServiceUnreachable, Overloaded, RateLimited, Draining)  # a job's event stream opens again after these


class Limits(Protocol):
    """What StreamResume takes from the client's settings (`_core.Settings`)."""

    @property
    def retries(self) -> int: ...

    @property
    def timeout(self) -> float | None: ...


@dataclass(frozen=True)
class Event:
    """One server-sent event of a job: `type` ("progress", "status", "item", "result", "error"),
    `data` (its JSON, decoded) and `id` (the event id, or None)."""

    type: str
    data: Any
    id: str | None = None


class SSEParser:
    """Server-sent events, fed line by line (https://html.spec.whatwg.org/#event-stream-interpretation)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> Event | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._event = ""
                return None
            raw = "\n".join(self._data)
            event, self._event, self._data = self._event or "message", "", []
            try:
                data: Any = json.loads(raw)
            except ValueError:
                data = raw
            return Event(event, data, self._id)
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value or None
        return None


FINAL_EVENTS = ("result", "error")
LAST_EVENT_ID = "end-2"  # the id of a job stream's last event (its result or error): nothing follows it


class StreamResume:
    """Where a job's event stream is, and when to open it again after it broke.

    Every event the service sends has an id (docs/api.md "Jobs"); a request with `Last-Event-ID`
    gets exactly the events after that one. So when the connection breaks (a transport error), or the
    answer ends before the final `result` or `error` event, the stream is opened again with the id of
    the last event the caller got, and the caller sees each event once. A GET runs nothing twice, so
    any transport error is retried (not a read timeout: that is the caller's `timeout`), and a 503
    `overloaded` or `draining` and a 429 too (after their `Retry-After`).

    A connection that delivered no event (it could not be opened, or broke or ended before an event) is
    a failure; `retries` (the client's) consecutive failures after a break give up, raising the last
    error. The first reopening after a connection that delivered events is at once; the next after
    0.1 s, doubling, with up to 20 % of jitter. With a client `timeout`, no reopening starts past that
    many seconds after the break. A service that sends no ids cannot be resumed: its stream ends (or
    raises) where it breaks, as before ids existed.
    """

    def __init__(self, settings: Limits, where: str, last_event_id: str | None = None) -> None:
        if last_event_id is not None and (not isinstance(last_event_id, str) or not last_event_id.strip()):
            raise ValueError("last_event_id is the id of an event of this job's stream (Event.id)")
        self.retries = settings.retries
        self.timeout = settings.timeout
        self.where = where
        self.last_id = last_event_id.strip() if last_event_id else None
        self.finished = self.last_id == LAST_EVENT_ID  # the caller has seen the whole stream
        self.resumable = True
        self.failures = 0
        self.progressed = False  # an event came since the last failure
        self.deadline: float | None = None

    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": self.last_id} if self.last_id is not None else {}

    def seen(self, event: Event) -> None:
        """`event` is handed to the caller."""
        if event.id is None:
            self.resumable = False
        else:
            self.last_id = event.id
        self.failures, self.progressed, self.deadline = 0, True, None
        if event.type in FINAL_EVENTS:
            self.finished = True

    def broke(self, error: ProcbridgeError | None) -> float | None:
        """The stream could not be opened or broke (`error`: one of RESUMABLE), or ended before its final
        event (None): the seconds to wait before opening it again, None when the stream is over (it
        ended, from a service that cannot resume it), or raise: the error, or ServiceUnreachable for a
        stream that keeps ending early."""
        if not self.resumable:
            if error is None:
                return None
            raise error
        failure = error or ServiceUnreachable(f"{self.where}: the event stream ended before the job's final event")
        self.failures += 1
        if self.failures > self.retries:
            raise failure
        if self.progressed:
            delay = 0.0
        elif isinstance(failure, ProblemError) and failure.retry_after is not None:
            delay = failure.retry_after * random.uniform(1.0, 1.2)
        else:
            delay = 0.1 * 2 ** (self.failures - 1) * random.uniform(1.0, 1.2)
        self.progressed = False
        now = time.monotonic()
        if self.deadline is None and self.timeout is not None:
            self.deadline = now + self.timeout
        if self.deadline is not None and now + delay >= self.deadline:
            raise failure
        return delay
