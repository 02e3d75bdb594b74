"""The relay's messages and `FrameLink`, the asyncio protocol both ends speak.

A frame is a list of messages (tuples whose first item is the kind below). `FrameLink.send` queues
a message and the queue leaves as one frame at the end of the loop turn (one `call_soon`), so a
burst of calls or results costs one pickle and one write, not one each.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from workers import framing

log = logging.getLogger("procbridge.relay")

# serving process -> core
CALL = 1  # (CALL, id, task, kwargs, timeout): run a task, answer RESULT or ERROR
CANCEL = 2  # (CANCEL, id): the caller went away
TAKE = 3  # (TAKE, id, bucket): spend a rate-limit token; answered RESULT with the seconds to wait
NOTE = 4  # (NOTE, what, args): a figure for the core's metrics (a call's outcome, a refused request)
HELLO = 5  # (HELLO, pid): a serving process is listening
# core -> serving process
RESULT = 6  # (RESULT, id, value, pid, elapsed, json)
ERROR = 7  # (ERROR, id, exception): a PoolError, pickled (they carry only strings and numbers)
WELCOME = 8  # (WELCOME, size, max_pending): sent on connect


class FrameLink(asyncio.Protocol):
    """One end of a relay connection: frames in (`on_messages`), batched frames out (`send`)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._reader = framing.FrameReader()
        self._outbox: list[tuple[Any, ...]] = []
        self._loop = asyncio.get_running_loop()
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def data_received(self, data: bytes) -> None:
        for frame in self._reader.feed(data):
            if type(frame) is list:
                self.on_messages(frame)
            else:  # a BadFrame: cannot happen between our own processes; the link is dropped
                log.error("the relay got a frame it cannot decode (%s): closing the link", frame)
                if self.transport is not None:
                    self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closed.set()
        self.on_lost()

    def send(self, message: tuple[Any, ...]) -> None:
        outbox = self._outbox
        outbox.append(message)
        if len(outbox) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        messages, self._outbox = self._outbox, []
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            header, payload = framing.dumps(messages)
        except Exception:
            log.exception("a relay message could not be pickled; sending the others one by one")
            for message in messages:
                try:
                    transport.writelines(framing.dumps([message]))
                except Exception:  # noqa: BLE001
                    log.error("dropped relay message %r", message[:2])
            return
        transport.writelines((header, payload))

    def on_messages(self, messages: list[Any]) -> None:
        raise NotImplementedError

    def on_lost(self) -> None:
        """The connection is gone (the other process exited or closed it)."""
