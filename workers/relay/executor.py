"""`RelayExecutor`: the executor of a serving process (`--http-processes N`, N ≥ 2). Its calls run
in the core's one pool: each goes out as a CALL message and comes back as a RESULT or an ERROR
(wire.py). Admission is the core's (one queue, one limit for the whole service), so this executor
reports nothing pending and never refuses by itself; the core's Overloaded and PoolClosed come back
as the errors they are. Large payloads travel over the socket: the core's pool puts them in shared
memory for the workers."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable
from typing import Any

from workers.errors import PoolClosed
from workers.executor import PLAIN_CALL, CallOptions, Executor, Outcome
from workers.relay.wire import CALL, CANCEL, ERROR, HELLO, NOTE, RESULT, TAKE, WELCOME, FrameLink

_UNLIMITED = 1 << 62


class _FrontLink(FrameLink):
    def __init__(self, executor: RelayExecutor) -> None:
        super().__init__()
        self._executor = executor
        self.waiters: dict[int, asyncio.Future[Any]] = {}
        self.welcomed = asyncio.Event()

    def on_messages(self, messages: list[Any]) -> None:
        waiters = self.waiters
        for message in messages:
            kind = message[0]
            if kind == RESULT:
                waiter = waiters.pop(message[1], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
            elif kind == ERROR:
                waiter = waiters.pop(message[1], None)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(message[2])
            elif kind == WELCOME:
                self._executor.core_size, self._executor.core_max_pending = message[1], message[2]
                self.welcomed.set()

    def on_lost(self) -> None:
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_exception(PoolClosed())
        self.waiters.clear()
        self._executor.on_lost()


class RelayExecutor(Executor):
    """Forwards calls to the core over the relay socket at `path`. `on_lost` is called once if the
    core goes away (the serving process then stops: it has nothing to serve with)."""

    def __init__(self, path: str, on_lost: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.path = path
        self._on_lost = on_lost
        self._link: _FrontLink | None = None
        self._ids = itertools.count(1)
        self.core_size = 0
        self.core_max_pending = 0

    @property
    def size(self) -> int:
        return self.core_size

    @property
    def max_pending(self) -> int:
        return _UNLIMITED  # the core decides (admission is one queue for every serving process)

    @property
    def pending(self) -> int:
        return 0

    @property
    def alive(self) -> int:
        return self.core_size if self._link is not None and self._link.transport is not None else 0

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        _, link = await loop.create_unix_connection(lambda: _FrontLink(self), self.path)
        self._link = link
        await link.welcomed.wait()

    async def _stop(self) -> None:
        link = self._link
        if link is not None and link.transport is not None:
            link.transport.close()
            await link.closed.wait()

    def _is_quiet(self) -> bool:
        return self._link is None or not self._link.waiters

    def hello(self) -> None:
        """Tell the core this serving process is listening."""
        assert self._link is not None
        self._link.send((HELLO, os.getpid()))

    def note(self, what: str, *args: Any) -> None:
        """A figure for the core's metrics (dropped if the core is gone: it has no metrics then)."""
        link = self._link
        if link is not None and link.transport is not None:
            link.send((NOTE, what, args))

    async def take(self, bucket: str) -> float:
        """Spend one of `bucket`'s rate-limit tokens in the core: 0.0, or the seconds to wait."""
        message = await self._request(lambda call_id: (TAKE, call_id, bucket))
        return float(message[2])

    async def call(self, task: str, kwargs: dict[str, Any], options: CallOptions = PLAIN_CALL) -> Outcome:
        if self._closing:
            raise PoolClosed()
        timeout = options.timeout
        message = await self._request(lambda call_id: (CALL, call_id, task, kwargs, timeout), cancel=True)
        return Outcome(message[2], message[3], message[4], message[5])

    async def _request(self, build: Callable[[int], tuple[Any, ...]], cancel: bool = False) -> Any:
        link = self._link
        if link is None or link.transport is None:
            raise PoolClosed()
        call_id = next(self._ids)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.waiters[call_id] = waiter
        link.send(build(call_id))
        try:
            return await waiter
        except asyncio.CancelledError:
            if link.waiters.pop(call_id, None) is not None and cancel:
                link.send((CANCEL, call_id))
            raise
        finally:
            if not link.waiters:
                self._check_quiet()

    def on_lost(self) -> None:
        if self._on_lost is not None and not self._closing:
            self._on_lost()

