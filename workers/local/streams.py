"""The local pool's side of a streaming call (`WorkerPool.call_stream`): items as they come, with
flow control back to the worker. The worker's side is workers/streaming.py.

    consumer (HTTP handler, job runner)   this module (on the loop)           worker process
    ───────────────────────────────────   ─────────────────────────           ──────────────
    async for item in stream  ──────▶     StreamCall admitted like a call ──▶ CALL_STREAM
                                          items ◀── on_item ◀──────────────── [STREAM_ITEM] at once,
          ◀── one item per __anext__ ─────┘                                   one per yield
                                          taken count ──────────────────────▶ (STREAM_ACK, id, taken)
    aclose() / hang-up  ───────────────▶  (STREAM_CLOSE, id) ───────────────▶ gen.close(); next call
                                          waiter settled ◀─────────────────── RESULT_JSON (count) /
                                                                              RESULT_ERROR / death

**The bound.** A worker may have at most `streaming.WINDOW` (16) items sent and not yet *taken*
by the consumer (taken: returned by `__anext__`; acknowledged when the queue here runs dry or half
a window was taken since the last acknowledgement); before asking its generator for one more it
waits for a STREAM_ACK. So this module queues at most WINDOW items per stream, whatever the
consumer does; a consumer that writes each item to an HTTP response before it asks for the next
(service/stream_handler.py) adds what the transport buffers (aiohttp's write buffer, drained at
its high-water mark, and the kernel's socket buffers). A reader that stops reading stops the
generator WINDOW items (plus what those buffers hold) ahead of it, suspended at its `yield`.

Everything else is an ordinary call: it is queued and admitted like one (`max_pending`), holds its
worker for its whole life (never pipelined behind or ahead of another call: `StreamCall.short` is
always False), its timeout covers the whole stream (the supervisor's tick, from the worker's row),
and it ends through its waiter like any call: the count (RESULT_JSON), TaskFailed, TaskTimeout,
WorkerCrashed (a death mid-stream) or PoolClosed. Items that arrived before the end are handed out
before the end is told.

Stopping. `aclose()` drops a call still queued; for a running one it sends STREAM_CLOSE: the worker
closes the generator when it next yields (or at once, if it is waiting for credit) and takes its
next call; a generator that never yields again runs into its timeout as any call does. A consumer
cancelled while it waits for an item (the HTTP client hung up) closes the stream the same way,
and where the pool kills cancelled calls (`kill_on_cancel`, `--cancel-running-on-disconnect`), the
worker is killed as for `call`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any, Protocol

from workers.executor import CallOptions, Outcome
from workers.local.broker import Broker
from workers.local.calls import Call, drop
from workers.local.handle import WorkerHandle
from workers.local.state import PoolOptions, PoolState
from workers.protocol import CALL_STREAM, STREAM_ACK, STREAM_CLOSE
from workers.shm import Lease
from workers.streaming import WINDOW


class StreamHost(Protocol):
    """What a stream uses of its `WorkerPool` (pool.py; typed here so this module does not import it)."""

    options: PoolOptions
    _loop: asyncio.AbstractEventLoop | None
    _ids: itertools.count[int]
    _broker: Broker | None
    _state: PoolState

    def _admit(self, call: Call) -> None: ...

    def _abandon(self, call: Call) -> None: ...


class StreamCall(Call):
    """A CALL_STREAM in the pool: a Call, plus the items received and not yet taken."""

    __slots__ = ("acked", "closed", "handle", "items", "taken", "wake")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.items: deque[bytes] = deque()
        self.taken = 0  # items handed to the consumer
        self.acked = 0  # ...of which the worker was told (STREAM_ACK)
        self.handle: WorkerHandle | None = None  # the worker its items come from
        self.closed = False  # its consumer is gone: items that still arrive are dropped
        self.wake: asyncio.Future[None] | None = None  # the consumer waits on it for an item or the end

    @property
    def short(self) -> bool:
        """Never: a stream holds its worker as long as its reader, so nothing is pipelined behind it."""
        return False

    @short.setter
    def short(self, value: bool) -> None:
        pass

    def wakeup(self, _: object = None) -> None:
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)


def on_item(w: WorkerHandle, call_id: int, item: bytes) -> None:
    """A STREAM_ITEM row (frames.py's control table): queue the item for its consumer."""
    for call in w.inflight:
        if call.id == call_id:
            if type(call) is StreamCall and not call.closed:
                call.handle = w
                call.items.append(item)
                call.wakeup()
            return


class PoolStream:
    """`WorkerPool.call_stream`'s ItemStream (workers/executor.py). The call is admitted on the
    first `__anext__` (where Overloaded or PoolClosed are raised)."""

    def __init__(self, pool: StreamHost, task: str, kwargs: dict[str, Any], options: CallOptions) -> None:
        self._pool = pool
        self._task = task
        self._kwargs = kwargs
        self._options = options
        self._call: StreamCall | None = None
        self._done = False
        self.outcome: Outcome | None = None

    @property
    def pid(self) -> int | None:
        handle = self._call.handle if self._call is not None else None
        if handle is not None:
            return handle.pid
        return self.outcome.pid if self.outcome is not None else None

    def __aiter__(self) -> PoolStream:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        call = self._call or await self._start()
        while True:
            if call.items:
                call.taken += 1
                item = call.items.popleft()
                self._ack(call)
                return item
            if call.waiter.done():
                self._end(call)
            loop = self._pool._loop
            assert loop is not None
            call.wake = loop.create_future()
            try:
                await call.wake
            except asyncio.CancelledError:
                self._pool._abandon(call)  # dropped if queued; killed if running and the pool kills on cancel
                await self.aclose()
                raise
            finally:
                call.wake = None

    async def aclose(self) -> None:
        """Stop the stream: drop the call if queued, else tell its worker to close the generator.
        Never waits (safe in a cancelled task's `finally`)."""
        call = self._call
        self._done = True
        if call is None or call.closed:
            return
        call.closed = True
        call.items.clear()
        waiter = call.waiter
        if waiter.done():
            if not waiter.cancelled():
                waiter.exception()  # retrieved: an error nobody read is not logged as lost
            return
        if call.worker is None:
            self._pool._abandon(call)
        else:
            w = self._pool._state.workers[call.worker.slot]
            if w is not None and not w.eof and not w.dying and call in w.inflight:
                self._pool._state.send(w, (STREAM_CLOSE, call.id))
        assert isinstance(waiter, asyncio.Future)
        waiter.cancel()  # what the call still says (its count, its timeout) has nobody to tell

    async def _start(self) -> StreamCall:
        pool, options = self._pool, self._options
        assert pool._loop is not None, "start() the pool first"
        waiter: asyncio.Future[Any] = pool._loop.create_future()
        timeout = options.timeout if options.timeout is not None else pool.options.task_timeout
        call = StreamCall(next(pool._ids), CALL_STREAM, self._task, self._kwargs, True, timeout, waiter)
        call.progress = options.on_progress
        call.kill_on_cancel = options.kill_on_cancel
        broker = pool._broker
        if broker is not None and any(
            type(v) is Lease or (type(v) is bytes and len(v) > broker.threshold) for v in self._kwargs.values()
        ):
            await broker.share(call)
        try:
            pool._admit(call)
        except BaseException:
            drop(call)
            self._done = True
            raise
        self._call = call
        waiter.add_done_callback(call.wakeup)
        return call

    def _ack(self, call: StreamCall) -> None:
        """Tell the worker how many items were taken: when the queue ran dry (it may be waiting) or
        half a window was taken since the last time (it keeps producing meanwhile)."""
        unacked = call.taken - call.acked
        w = call.handle
        if unacked and (not call.items or unacked >= WINDOW // 2) and w is not None and not w.eof and not w.dying:
            call.acked = call.taken
            self._pool._state.send(w, (STREAM_ACK, call.id, call.taken))

    def _end(self, call: StreamCall) -> None:
        """The call is over and every item was taken: StopAsyncIteration, or what ended it."""
        self._done = True
        call.closed = True
        error = call.waiter.exception()
        if error is not None:
            raise error
        outcome: Outcome = call.waiter.result()
        self.outcome = Outcome(int(outcome.value), outcome.pid, outcome.elapsed, False)
        raise StopAsyncIteration
