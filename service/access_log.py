"""The access log and the audit log: one JSON line per response, one per refused API key.

Access lines come from aiohttp's own hook (`AbstractAccessLogger`, handed to `web.AppRunner`), so
they cover every response, aiohttp's own errors included:

    {"event": "access", "time": "2026-11-26T07:19:55.123Z", "method": "POST", "path": "/v1/tasks/primes",
     "status": 200, "slug": null, "latency_ms": 18.4, "key_id": "9f86d081", "remote": "10.0.0.7"}

`path` never includes the query string (it can carry a task's arguments); `slug` is the problem
slug of an error response (`Problem.response()` stores it on the response); `key_id` is the
non-secret id of the request's key (see service/auth.py), null without keys. Keys never appear.

Audit lines go to the same stream, one per refused key, coalesced so that a flood of bad requests
cannot flood the disk: the first refusal of a (client address, reason) pair is written at once, the
ones in the second after it are counted and written as one line when that second is over:

    {"event": "auth-rejected", "time": ..., "remote": ..., "method": ..., "path": ..., "reason": "unknown-key",
     "key_id": "1b4f0e98", "count": 37}

Nothing here blocks the event loop: a line is encoded (orjson) and appended to an in-memory buffer;
a daemon thread writes the buffer out with `os.write` at most every 100 ms, or at once when it
passes 64 KiB. The buffer is bounded: when the writer cannot keep up (a stdout pipe nobody reads,
a full disk) lines are dropped and counted, with a warning on stderr at most every 10 s. At
shutdown the rest is written within a deadline; a stuck writer is abandoned, not waited for.
The standard `logging` module is not used on this path: its handlers write (and take locks) on
the caller's thread, i.e. on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, Request, StreamResponse

from service.auth import KEY_ID
from service.problems import SLUG

log = logging.getLogger("procbridge.access")

STDOUT = "-"
STDERR = "stderr"  # not a --access-log value: where audit lines go when the access log is off

KIB = 1024


class IsoClock:
    """ISO 8601 UTC timestamps with milliseconds ("2026-11-26T07:19:55.123Z"). Formatting a datetime
    costs about 1 µs; here the date and time are formatted once a second and the whole text once a
    millisecond, which under load is shared by many lines."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._ms = -1
        self._second = -1
        self._prefix = ""
        self._text = ""

    def __call__(self) -> str:
        ms = int(self._now() * 1000)
        if ms != self._ms:
            self._ms = ms
            second, fraction = divmod(ms, 1000)
            if second != self._second:
                self._second = second
                self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self._text = self._prefix + _MILLIS[fraction]
        return self._text


_MILLIS = [f"{n:03d}Z" for n in range(1000)]


class AccessLogSink:
    """A bounded, non-blocking line writer: `write(line)` on the loop, the writing on a daemon thread.

    `destination`: STDOUT, STDERR or a file path (appended to); or pass an open `fd` (which stays
    the caller's to close). Buffered bytes never pass `max_buffer`, plus one batch being written:
    beyond that, lines are dropped and counted in `dropped`.
    """

    def __init__(
        self,
        destination: str,
        *,
        fd: int | None = None,
        max_buffer: int = 1024 * KIB,
        flush_bytes: int = 64 * KIB,
        flush_interval: float = 0.1,
        warn_every: float = 10.0,
    ) -> None:
        self.destination = destination
        self.max_buffer = max_buffer
        self.flush_bytes = flush_bytes
        self.flush_interval = flush_interval
        self.warn_every = warn_every
        self.written = 0  # lines written
        self.dropped = 0  # lines lost: buffer full, write errors, or still unwritten at the shutdown deadline
        self._lines: list[bytes] = []
        self._buffered = 0
        self._in_flight = 0  # lines the writer thread holds now
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._writer: _Writer | None = None
        self._fd = -1 if fd is None else fd
        self._owns_fd = False
        self._waiters: list[asyncio.Future[None]] = []
        self._unreported = 0
        self._last_warning = -math.inf
        self._why = ""
        self.with_keys = False  # whether requests may carry a key id (set by create_app)

    def start(self) -> None:
        """Open the destination and start the writer; call on the event loop that will log."""
        if self._loop is not None:
            return
        if self._fd >= 0:
            pass
        elif self.destination == STDOUT:
            self._fd = 1
        elif self.destination == STDERR:
            self._fd = 2
        else:
            try:
                self._fd = os.open(self.destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            except OSError as exc:
                raise RuntimeError(f"cannot open the access log {self.destination!r}: {exc.strerror}") from None
            self._owns_fd = True
        self._loop = asyncio.get_running_loop()
        self._writer = _Writer(self._fd, self._loop, self._written)
        self._writer.start()
        if self._lines:
            self._schedule()

    def write(self, line: bytes) -> None:
        """Queue one line (with its newline); drop it if the buffer is full. Event loop only."""
        n = len(line)
        if self._buffered + n > self.max_buffer:
            self._drop(1, "the writer cannot keep up")
            return
        self._lines.append(line)
        self._buffered += n
        if self._in_flight or self._loop is None:
            return  # the batch in flight schedules the next one when it is done
        if self._buffered >= self.flush_bytes:
            self._flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(self.flush_interval, self._flush)

    def _schedule(self) -> None:
        assert self._loop is not None
        if self._buffered >= self.flush_bytes:
            self._flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(self.flush_interval, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._in_flight or not self._lines or self._writer is None:
            return
        lines, self._lines, self._buffered = self._lines, [], 0
        self._in_flight = len(lines)
        self._writer.submit(lines)

    def _written(self, error: str | None) -> None:
        """The writer thread finished a batch (called on the loop)."""
        n, self._in_flight = self._in_flight, 0
        if error is None:
            self.written += n
        else:
            self._drop(n, error)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()
        if self._lines:
            self._schedule()

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        self._unreported += n
        self._why = why
        now = time.monotonic()
        if now - self._last_warning >= self.warn_every:
            self._last_warning = now
            self._report()

    def _report(self) -> None:
        if self._unreported:
            log.warning("access log %s: %d lines dropped (%s)", self._name(), self._unreported, self._why)
            self._unreported = 0

    def _name(self) -> str:
        return {STDOUT: "stdout", STDERR: "stderr"}.get(self.destination, repr(self.destination))

    async def aclose(self, timeout: float = 2.0) -> None:
        """Write what is buffered, waiting at most `timeout` seconds; then stop the writer."""
        loop = self._loop
        if loop is None:
            return
        deadline = loop.time() + timeout
        while self._lines or self._in_flight:
            if not self._in_flight:
                self._flush()
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                break
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        stuck = self._in_flight
        if self._lines or stuck:
            self._why = "still unwritten at shutdown"
            self.dropped += len(self._lines) + stuck
            self._unreported += len(self._lines) + stuck
            self._lines, self._buffered = [], 0
        self._report()
        assert self._writer is not None
        self._writer.stop()
        if self._owns_fd and not stuck:  # a write blocked on the fd keeps it: the process exit closes it
            os.close(self._fd)
            self._owns_fd = False
        self._loop = None


class _Writer(threading.Thread):
    """Writes batches of lines with os.write (unbuffered, so an abandoned thread holds no Python lock
    that interpreter shutdown would need) and reports each batch back to the loop."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop, done: Callable[[str | None], None]) -> None:
        super().__init__(name="procbridge-access-log", daemon=True)
        self._fd = fd
        self._loop = loop
        self._done = done
        self._batches: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()

    def submit(self, lines: list[bytes]) -> None:
        self._batches.put(lines)

    def stop(self) -> None:
        self._batches.put(None)

    def run(self) -> None:
        while True:
            lines = self._batches.get()
            if lines is None:
                return
            error = None
            try:
                data = memoryview(b"".join(lines))
                while data:
                    data = data[os.write(self._fd, data):]
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc.strerror or exc}"
            try:
                self._loop.call_soon_threadsafe(self._done, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return


class JsonAccessLogger(AbstractAccessLogger):
    """aiohttp's access-log hook, one JSON line per response. aiohttp makes one per connection and
    passes it the `access_log=` object of the runner, which here is the AccessLogSink."""

    __slots__ = ("sink",)
    now = IsoClock()

    def __init__(self, logger: Any, log_format: str) -> None:
        super().__init__(logger, log_format)
        self.sink: AccessLogSink = logger

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        # This runs on the event loop for every response: ~2 µs, measured (docs/security.md).
        status = response.status
        sink = self.sink
        sink.write(orjson.dumps({
            "event": "access",
            "time": self.now(),
            "method": request.method,
            "path": request.path,
            "status": status,
            # .get() on these mappings raises and catches KeyError when absent: only look when it can be there.
            "slug": response.get(SLUG) if status >= 400 else None,
            "latency_ms": int(time * 1e6) / 1e3,  # round() costs 4 times more; under uvloop the clock ticks in ms
            "key_id": request.get(KEY_ID) if sink.with_keys else None,
            "remote": request.remote,
        }, option=orjson.OPT_APPEND_NEWLINE))


class AuditLog:
    """The auth middleware's reject hook. A (client address, reason) pair's first refusal is written
    at once (`count` 1) and opens a window of `interval` seconds; refusals inside the window are only
    counted, and when it ends one line (the latest refusal's fields) carries how many there were.
    The table of open windows is bounded, since attackers choose the addresses: a window evicted
    early is reported then."""

    def __init__(
        self,
        sink: AccessLogSink,
        *,
        interval: float = 1.0,
        max_pairs: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.interval = interval
        self.max_pairs = max_pairs
        self.clock = clock
        self.now = IsoClock()
        # (remote, reason) -> [window start, refusals since, the latest one's fields]; oldest first.
        self._windows: OrderedDict[tuple[str, str], list[Any]] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._windows)

    def __call__(self, request: Request, reason: str, key_id: str | None) -> None:
        remote = request.remote or "-"
        fields = {"remote": remote, "method": request.method, "path": request.path, "reason": reason,
                  "key_id": key_id}
        now = self.clock()
        self.expire(now)
        window = self._windows.get((remote, reason))
        if window is not None:
            window[1] += 1
            window[2] = fields
            return
        while len(self._windows) >= self.max_pairs:
            self._close_window(self._windows.popitem(last=False)[1])
        self._windows[remote, reason] = [now, 0, None]
        self._line(fields, 1)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def _tick(self) -> None:
        """While windows are open, close the finished ones about once per interval, so the count of a
        burst is written soon after it ends, not only at the next refusal."""
        self._timer = None
        self.expire(self.clock())
        if self._windows:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def expire(self, now: float) -> None:
        """Close every window older than the interval (the table is ordered by window start)."""
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if now - window[0] < self.interval:
                return
            del self._windows[key]
            self._close_window(window)

    def _close_window(self, window: list[Any]) -> None:
        if window[1]:
            self._line(window[2], window[1])

    def close(self) -> None:
        """Report every refusal not yet reported (at shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._windows:
            self._close_window(self._windows.popitem(last=False)[1])

    def _line(self, fields: dict[str, Any], count: int) -> None:
        self.sink.write(orjson.dumps({"event": "auth-rejected", "time": self.now(), **fields, "count": count},
                                     option=orjson.OPT_APPEND_NEWLINE))
