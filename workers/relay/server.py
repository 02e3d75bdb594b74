"""`RelayServer`: the core's end of the relay, a Unix socket the serving processes connect to.

Each CALL runs as a task of the core's loop on the handler the service gives (admission, task
concurrency limits, then the executor), and its answer goes back in the next batched frame; a
CANCEL cancels that task (the executor drops or stops the call as for a client that hung up), and a
link that closes (its serving process exited or was killed) cancels every call it had running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import Any, Protocol

from workers.errors import PoolError
from workers.executor import Outcome
from workers.relay.wire import CALL, CANCEL, ERROR, HELLO, NOTE, RESULT, TAKE, WELCOME, FrameLink, log


class RelayHandler(Protocol):
    """What the core does with what the serving processes send (service/relay_calls.py)."""

    async def call(self, task: str, kwargs: dict[str, Any], timeout: float | None) -> Outcome: ...
    def take(self, bucket: str) -> float: ...
    def note(self, what: str, args: tuple[Any, ...]) -> None: ...
    def welcome(self) -> tuple[int, int]: ...


class _CoreLink(FrameLink):
    def __init__(self, server: RelayServer) -> None:
        super().__init__()
        self._server = server
        self._handler = server.handler
        self._calls: dict[int, asyncio.Task[None]] = {}
        self.pid: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server.links.add(self)
        self.send((WELCOME, *self._handler.welcome()))

    def on_messages(self, messages: list[Any]) -> None:
        calls = self._calls
        for message in messages:
            kind = message[0]
            if kind == CALL:
                _, call_id, task, kwargs, timeout = message
                calls[call_id] = asyncio.ensure_future(self._run(call_id, task, kwargs, timeout))
            elif kind == CANCEL:
                running = calls.get(message[1])
                if running is not None:
                    running.cancel()
            elif kind == TAKE:
                self.send((RESULT, message[1], self._handler.take(message[2]), 0, 0.0, False))
            elif kind == NOTE:
                self._handler.note(message[1], message[2])
            elif kind == HELLO:
                self.pid = message[1]
                self._server.on_hello(message[1])

    async def _run(self, call_id: int, task: str, kwargs: dict[str, Any], timeout: float | None) -> None:
        try:
            outcome = await self._handler.call(task, kwargs, timeout)
            self._calls.pop(call_id, None)
        except PoolError as exc:
            self._calls.pop(call_id, None)
            self.send((ERROR, call_id, exc))
        except asyncio.CancelledError:
            self._calls.pop(call_id, None)
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must answer its call, not hang it
            self._calls.pop(call_id, None)
            log.exception("relay call of %s failed", task)
            self.send((ERROR, call_id, PoolError(f"{type(exc).__name__}: {exc}")))
        else:
            self.send((RESULT, call_id, outcome.value, outcome.pid, outcome.elapsed, outcome.json))

    def on_lost(self) -> None:
        self._server.links.discard(self)
        for running in list(self._calls.values()):
            running.cancel()


class RelayServer:
    """Listens on `path` (created mode 0600, in a directory only this user can enter) for the
    serving processes; `on_hello(pid)` is called as each one starts listening."""

    def __init__(self, path: str, handler: RelayHandler, on_hello: Callable[[int], None]) -> None:
        self.path = path
        self.handler = handler
        self.on_hello = on_hello
        self.links: set[_CoreLink] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _CoreLink(self), self.path)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for link in list(self.links):
                if link.transport is not None:
                    link.transport.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
