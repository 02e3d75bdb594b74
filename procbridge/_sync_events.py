"""The sync client's job event stream (`Job.events`, `Job.result`): read as it comes, and opened again
with `Last-Event-ID` where it broke, as `procbridge._events.StreamResume` says. procbridge/aio.py
does the same for asyncio."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Protocol

import httpx

from procbridge import _core
from procbridge._core import Request, Settings
from procbridge._events import RESUMABLE, Event, SSEParser, StreamResume
from procbridge.errors import ProcbridgeError


class Lines(Iterator[str], Protocol):
    """The lines of an open streamed answer (`client._Lines`)."""

    def close(self) -> None: ...


class StreamClient(Protocol):
    """What the stream needs of `Client`."""

    _settings: Settings

    @property
    def url(self) -> str: ...

    def _lines(self, req: Request, headers: Mapping[str, str] | None = None, *, retries: int | None = None,
               timeout: httpx.Timeout | None = None) -> Lines: ...


class EventStream:
    """A job's event stream that opens again where it broke (`_events.StreamResume` decides when, and when
    to give up); closes its connection at the end, on error, on `close()`, at the end of a `with`
    block, or when dropped. The first request is sent when it is made."""

    def __init__(self, client: StreamClient, job_id: str, timeout: float | None, last_event_id: str | None,
                 deadline: float | None = None) -> None:
        self._client = client
        self._req = _core.events_request(job_id)
        self._timeout = timeout
        self._deadline = deadline  # Job.result's: each read waits at most until then
        self._resume = StreamResume(client._settings, client.url + self._req.path, last_event_id)
        self._lines: Lines | None = None
        self._parser = SSEParser()
        self._done = self._resume.finished
        if not self._done:
            self._connect()

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> Event:
        if self._done:
            raise StopIteration
        try:
            while True:
                if self._lines is None:
                    self._connect()
                assert self._lines is not None
                try:
                    line = next(self._lines)
                except StopIteration:
                    self._broke(None)
                    continue
                except RESUMABLE as exc:
                    self._broke(exc)
                    continue
                event = self._parser.feed(line)
                if event is None:
                    continue
                self._resume.seen(event)
                if self._resume.finished:
                    self.close()
                return event
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        """Open the stream (after the last event seen), retrying as StreamResume allows."""
        while True:
            read = self._timeout
            left = _core.remaining(self._deadline)  # Timeout once the deadline has passed
            if left is not None:
                read = left if read is None else min(read, left)
            try:
                self._lines = self._client._lines(self._req, self._resume.headers(), retries=0,
                                                  timeout=httpx.Timeout(read, connect=_core.CONNECT_TIMEOUT))
            except RESUMABLE as exc:
                self._pause(self._resume.broke(exc))
                continue
            except BaseException:
                self._done = True
                raise
            self._parser = SSEParser()
            return

    def _broke(self, error: ProcbridgeError | None) -> None:
        if self._lines is not None:
            self._lines.close()
            self._lines = None
        self._pause(self._resume.broke(error))

    def _pause(self, delay: float | None) -> None:
        if delay is None:  # over: a stream that cannot be resumed ended
            self._done = True
            raise StopIteration
        if delay > 0:
            time.sleep(delay)

    def close(self) -> None:
        self._done = True
        if self._lines is not None:
            self._lines.close()
            self._lines = None

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing left to close
            self.close()
