"""Adaptive batching: concurrent calls of a `@task(batch=Batch(...))` task gathered into one invocation.

A batch task's function takes a list per parameter and returns one result per call (workers/registry.py,
`Batch`); a caller passes one element per parameter and gets one result. The service validates each call
against the element types (`registry.element_hints`) before it gets here, so a call with bad arguments is
refused on its own (422) and never joins a batch. The Batcher sits at the executor seam, whatever the
backend: every executor holds one (`Executor.batcher`), its `call` and `call_chunk` hand the calls of a
batch task to it, and it sends each batch back through `call_chunk(task, items, timeout, kind=CALL_BATCH)`,
which runs the batch as ONE invocation in one worker (workers/execution.py, `run_batch`) and answers one
Outcome or TaskFailed per call:

    executor.call(task, kwargs) ──▶ Batcher.call ──▶ gathering[task]: [call, call, ...]
    executor.call_chunk(map items) ──▶ Batcher.call_chunk ──┘        │ leaves (policy below)
                                                                     ▼
             each call's own answer ◀── executor.call_chunk(task, [kwargs, ...], timeout, kind=CALL_BATCH)

When a batch leaves (per task; the policy, in order):
1. at once when `max_size` calls are waiting;
2. `max_wait_ms` after its first call arrived, however many there are, unless this Batcher's batches already
   hold every lane of the executor (`size`): then it would only wait in the executor's queue, so it goes on
   gathering (up to max_size) and leaves the moment one of those batches ends. No call waits longer for it:
   it waits for a lane instead of in the queue, and the batch that takes the lane is as full as it can be;
3. early, when the executor has a free lane and nothing else is coming: a loop turn passed with no new
   call of the task, nothing is queued in the executor (`pending` 0) and fewer of this Batcher's batches
   are running than the executor has lanes (`size`). So a lone call waits one loop turn, not max_wait_ms,
   and under load, while every lane is busy, calls keep gathering (up to max_size or max_wait_ms) and a
   batch leaves the moment a lane frees. (The lanes other tasks' calls hold are not known here: with other
   work running, an early batch may wait in the executor's queue instead.)

Timeouts: each call keeps its own (`CallOptions.timeout`, else the task's `timeout=`). It counts from the
moment its batch leaves for the executor (the gathering, at most max_wait_ms, is not counted): a call whose
deadline passes gets TaskTimeout (504) at its deadline, while the batch runs on for the others. The batch's
own timeout, the one the executor enforces by stopping the worker, is the longest of its calls' timeouts
(the executor's --task-timeout when a call has none), so the invocation is stopped only once no call
still waits for it. A crash (or that stop) fails only that batch's calls (WorkerCrashed / TaskTimeout: 502 /
504); a function that raises, or returns something that is not one result per call, fails every call of its
batch with TaskFailed (500) saying so; the next batch runs as usual.

A caller that goes away (cancelled) leaves its batch: before the batch leaves it is simply taken out; after,
the batch runs for the others, and once every call of a running batch is gone, the batch is cancelled (the
executor drops it if it has not started). Progress reports from inside a batch function go nowhere.

Draining: `flush()` sends every gathering batch at once (the executor's drain calls it before it stops taking
calls); `close()` fails what is still gathering with PoolClosed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from workers.errors import PoolClosed, TaskFailed, TaskTimeout
from workers.protocol import CALL_BATCH

if TYPE_CHECKING:
    from workers.registry import TaskSpec

log = logging.getLogger("procbridge.batching")


class BatchSink(Protocol):
    """What the Batcher needs of its executor (workers/executor.py's Executor; a Protocol so that the two
    modules do not import each other)."""

    @property
    def closing(self) -> bool: ...
    @property
    def pending(self) -> int: ...
    @property
    def max_size(self) -> int: ...

    async def call_chunk(
        self, task: str, items: list[dict[str, Any]], timeout: float | None = None, kind: int = ...
    ) -> list[Any]: ...


class _Call:
    """One call in a batch: its arguments, the future its caller awaits, its own timeout."""

    __slots__ = ("batch", "encode", "future", "kwargs", "timeout", "timer")

    def __init__(self, kwargs: dict[str, Any], future: asyncio.Future[Any], timeout: float | None, encode: bool):
        self.kwargs = kwargs
        self.future = future
        self.timeout = timeout
        self.encode = encode  # the caller wants the result JSON-encoded (else decoded here)
        self.timer: asyncio.TimerHandle | None = None
        self.batch: _Batch | None = None  # set when it leaves


class _Batch:
    __slots__ = ("calls", "task")

    def __init__(self, calls: list[_Call]) -> None:
        self.calls = calls
        self.task: asyncio.Future[None] | None = None


class _Gathering:
    """The calls of one task waiting for their batch to leave."""

    __slots__ = ("calls", "check", "max_size", "max_wait", "name", "overdue", "timer")

    def __init__(self, spec: TaskSpec) -> None:
        assert spec.batch is not None
        self.name = spec.name
        self.max_size = spec.batch.max_size
        self.max_wait = spec.batch.max_wait_ms / 1000.0
        self.calls: list[_Call] = []
        self.timer: asyncio.TimerHandle | None = None  # max_wait after the first call
        self.check: asyncio.Handle | None = None  # the early-leave check, one loop turn on
        self.overdue = False  # max_wait passed while every lane ran a batch: it leaves when one frees


class Batcher:
    """Gathers the calls of batch tasks per task and sends each batch through its executor (see above)."""

    def __init__(self, executor: BatchSink) -> None:
        self.executor = executor
        self._gatherings: dict[str, _Gathering] = {}
        self._running: set[_Batch] = set()
        self.sent: dict[str, list[int]] = {}  # task -> [batches sent, calls in them] (/metrics)

    @property
    def waiting(self) -> int:
        """Calls gathering, not yet sent."""
        return sum(len(g.calls) for g in self._gatherings.values())

    async def call(self, spec: TaskSpec, kwargs: dict[str, Any], options: Any) -> Any:
        """One call of batch task `spec` (`options`: the executor's CallOptions): its own Outcome, or the
        executor's errors (TaskFailed, WorkerCrashed, TaskTimeout, Overloaded, PoolClosed)."""
        if self.executor.closing:
            raise PoolClosed()
        loop = asyncio.get_running_loop()
        timeout = options.timeout if options.timeout is not None else spec.timeout
        call = _Call(kwargs, loop.create_future(), timeout, options.encode_json)
        self._add(spec, call, loop)
        try:
            return await call.future
        except asyncio.CancelledError:
            self._abandon(spec.name, call)
            raise

    async def call_chunk(self, spec: TaskSpec, items: list[dict[str, Any]], timeout: float | None) -> list[Any]:
        """A map chunk of batch task `spec`: each item is a call of its own (batched with any others); one
        Outcome or TaskFailed per item, like `Executor.call_chunk`. An item that crashed or timed out raises
        (the map handler then runs the chunk's items one by one). `timeout` covers the chunk: each item gets
        its share."""
        per_item = None if timeout is None else timeout / max(1, len(items))
        options = _Options(per_item)
        results = await asyncio.gather(*(self.call(spec, kwargs, options) for kwargs in items), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, TaskFailed):
                raise result
        return results

    def flush(self) -> None:
        """Send every gathering batch now (a drain: they must reach the executor before it stops taking calls)."""
        for g in list(self._gatherings.values()):
            if g.calls:
                self._leave(g)

    def close(self) -> None:
        """Fail the calls still gathering with PoolClosed (the executor fails those it holds itself)."""
        for g in self._gatherings.values():
            self._stop_timers(g)
            calls, g.calls = g.calls, []
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(PoolClosed())

    # -- gathering --------------------------------------------------------------------------------------

    def _add(self, spec: TaskSpec, call: _Call, loop: asyncio.AbstractEventLoop) -> None:
        g = self._gatherings.get(spec.name)
        if g is None:
            g = self._gatherings[spec.name] = _Gathering(spec)
        g.calls.append(call)
        if len(g.calls) >= g.max_size:
            self._leave(g)
            return
        if g.timer is None and not g.overdue:
            g.timer = loop.call_later(g.max_wait, self._waited, g)
        if g.check is None:
            g.check = loop.call_soon(self._check, g, len(g.calls))

    def _check(self, g: _Gathering, seen: int) -> None:
        """The early leave: one loop turn after a call arrived, leave if no other call came meanwhile and a
        lane is free; if calls keep coming, look again a turn later; if no lane is free, a finishing batch
        looks again (`_done`)."""
        g.check = None
        if not g.calls:
            return
        if len(g.calls) > seen:
            g.check = asyncio.get_running_loop().call_soon(self._check, g, len(g.calls))
        elif self._lane_free():
            self._leave(g)

    def _waited(self, g: _Gathering) -> None:
        """max_wait_ms since the first call: leave, unless this Batcher's batches hold every lane (the batch
        would only wait in the executor's queue): then it goes on gathering and leaves when one of them ends.
        Lanes are the executor's most workers: an elastic pool grows for a batch that waits."""
        g.timer = None
        if len(self._running) < self.executor.max_size:
            self._leave(g)
        else:
            g.overdue = True

    def _lane_free(self) -> bool:
        executor = self.executor
        return executor.pending == 0 and len(self._running) < executor.max_size

    def _stop_timers(self, g: _Gathering) -> None:
        if g.timer is not None:
            g.timer.cancel()
            g.timer = None
        if g.check is not None:
            g.check.cancel()
            g.check = None

    def _leave(self, g: _Gathering) -> None:
        """Send the gathered calls (at most max_size: `_add` sends a full batch at once) as one batch."""
        self._stop_timers(g)
        g.overdue = False
        calls = [c for c in g.calls if not c.future.done()]
        g.calls = []
        if not calls:
            return
        loop = asyncio.get_running_loop()
        batch = _Batch(calls)
        timeouts = [c.timeout for c in calls]
        for call in calls:
            call.batch = batch
            if call.timeout is not None:
                call.timer = loop.call_later(call.timeout, _expire, call)
        longest = None if None in timeouts else max(t for t in timeouts if t is not None)
        self._running.add(batch)
        sent = self.sent.setdefault(g.name, [0, 0])
        sent[0] += 1
        sent[1] += len(calls)
        batch.task = asyncio.ensure_future(self._send(g, batch, longest))

    def _abandon(self, name: str, call: _Call) -> None:
        if call.timer is not None:
            call.timer.cancel()
        batch = call.batch
        if batch is None:  # still gathering: just leave
            g = self._gatherings.get(name)
            if g is not None and call in g.calls:
                g.calls.remove(call)
                if not g.calls:
                    self._stop_timers(g)
        elif batch.task is not None and all(c.future.done() for c in batch.calls):
            batch.task.cancel()  # nobody waits for it any more

    # -- sending ----------------------------------------------------------------------------------------

    async def _send(self, g: _Gathering, batch: _Batch, timeout: float | None) -> None:
        calls = batch.calls
        try:
            results = await self.executor.call_chunk(g.name, [c.kwargs for c in calls], timeout, kind=CALL_BATCH)
        except asyncio.CancelledError:
            _fail(calls, PoolClosed())  # only when every caller is gone, or at close
            raise
        except Exception as exc:  # noqa: BLE001 - the batch's failure (a crash, a timeout, overload) is each call's
            _fail(calls, exc)
        else:
            if len(results) != len(calls):  # cannot happen: run_batch answers one row per call
                _fail(calls, TaskFailed("RuntimeError", f"a batch of {len(calls)} calls got {len(results)} results"))
            for call, result in zip(calls, results, strict=False):
                if call.timer is not None:
                    call.timer.cancel()
                if call.future.done():
                    continue
                if isinstance(result, BaseException):
                    call.future.set_exception(result)
                elif call.encode or not result.json:
                    call.future.set_result(result)
                else:  # the caller wants the value itself: the batch came back JSON-encoded
                    call.future.set_result(result._replace(value=orjson.loads(result.value), json=False))
        finally:
            self._running.discard(batch)
            self._done()

    def _done(self) -> None:
        """A lane freed: gatherings that stopped growing may leave now."""
        loop = asyncio.get_running_loop()
        for g in list(self._gatherings.values()):
            if g.calls and g.overdue:
                self._leave(g)
            elif g.calls and g.check is None:
                g.check = loop.call_soon(self._check, g, len(g.calls))


class _Options:
    """The CallOptions fields `Batcher.call` reads, for the items of a map chunk."""

    __slots__ = ("encode_json", "timeout")

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.encode_json = True


def _expire(call: _Call) -> None:
    call.timer = None
    if not call.future.done():
        assert call.timeout is not None
        call.future.set_exception(TaskTimeout(call.timeout))
        batch = call.batch
        if batch is not None and batch.task is not None and all(c.future.done() for c in batch.calls):
            batch.task.cancel()  # every call of it has its answer: nobody waits for the invocation


def _fail(calls: list[_Call], error: BaseException) -> None:
    for call in calls:
        if call.timer is not None:
            call.timer.cancel()
        if not call.future.done():
            call.future.set_exception(error)
