"""`WorkerPool`: the local executor's API, admission, and the dispatch hot path.

Why not the stock ProcessPoolExecutor: it costs ~200 µs per call (a feeder thread, a result thread
and the future layer), breaks as a whole when one worker dies, cannot stop a running task and
queues without bound. This pool instead:

- batches hand-over both ways: calls submitted during one loop iteration go out as one frame per
  worker (one `call_soon`), and workers coalesce their results; the loop reads each worker's socket
  itself (`add_reader`), no helper thread;
- keeps a small in-flight window per worker (3 calls; up to 16 for tasks that take microseconds),
  refilled straight from the read callback, and pipelines only calls that are known to be short,
  so a long task never holds a short one back; a call of a few microseconds joins a frame that
  is leaving anyway rather than wake an idle worker (the wake-up would cost more than the call);
- refuses work beyond `max_pending` waiting calls at once (Overloaded), never buffers without bound;
- with `min_workers` below `workers`, grows while calls wait and shrinks when idle (scaling.py).

This module is the path every call takes, kept in one place so a tiny call costs no extra hop:
admit → give → assign → flush on the way out, read → frame → settle → refill on the way back. The
rest of the pool sits beside it (the package's docstring draws it): supervisor.py starts, watches,
kills and replaces the workers; scaling.py grows and shrinks an elastic pool; broker.py moves large
payloads through shared memory; frames.py handles every message kind but the plain value; state.py
is what they share.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from workers import framing, protocol, registry
from workers.errors import Overloaded, PoolClosed, TaskFailed
from workers.executor import PLAIN_CALL, CallOptions, Executor, ItemStream, Outcome
from workers.local.broker import Broker
from workers.local.calls import Call, claim, drop, drop_leases, pickled_call, settle
from workers.local.frames import ControlHandler, FrameHandlers, ResultHandler
from workers.local.handle import WorkerHandle
from workers.local.loop_future import LoopFuture
from workers.local.scaling import Scaler
from workers.local.state import PoolOptions, PoolState
from workers.local.streams import PoolStream
from workers.local.supervisor import Supervisor
from workers.memory import MemorySampler, MemoryUse
from workers.protocol import CALL_FUNCTION, CALL_MAP, CALL_TASK, RESULT_JSON, RESULT_VALUE, WORKER_READY
from workers.shm import Lease, SegmentPool, new_prefix, plan_budget
from workers.shm_files import sweep_orphans
from workers.stats import WorkerRow

log = logging.getLogger("procbridge.pool")

_TICK = 0.05  # supervision period: timeouts are enforced within this of their deadline
_SHORT = 0.002  # calls whose task averages under this may be pipelined behind another
_TINY = 0.00005  # calls whose task averages under this join a frame already leaving, idle workers or not
_VALUES = frozenset((RESULT_VALUE, RESULT_JSON))  # the statuses of a plain value, settled on the hot path


class WorkerPool(Executor):
    """A supervised pool of worker processes. Create, `await start()`, use, `await aclose()`."""

    tick_interval = _TICK

    def __init__(self, options: PoolOptions) -> None:
        if not 1 <= options.fewest <= options.workers:
            raise ValueError("a pool needs at least one worker, and min_workers at most workers")
        super().__init__()
        self.options = options
        self._max_pending = options.max_pending or 4 * options.workers
        self._state = state = PoolState(options)
        self._workers = state.workers  # the same lists as the state's (never rebound): no chain per call
        self._idle = state.idle
        self._queue: deque[Call] = deque()
        self._dirty: list[WorkerHandle] = []  # workers whose outbox a frame leaves with in this loop turn
        self._flush_handle: asyncio.Handle | None = None
        self._ids = itertools.count(1)
        self._averages: dict[str, float] = {}  # task name -> moving average of its run time (s)
        self._functions: dict[Callable[..., Any], bytes] = {}  # submit(): plain functions, pickled once (calls.py)
        self._supervisor = Supervisor(
            state, restarts=self.restarts, slot_restarts=self.slot_restarts, read=self._on_readable,
            requeue=self._requeue, background=self._run_background,
        )
        self._broker: Broker | None = None  # None: large payloads go through the sockets
        self._controls: dict[int, ControlHandler] = {}
        self._results: dict[int, ResultHandler] = {}
        self.prefix = new_prefix()  # of every shared-memory name this pool creates (table and segments)
        self._memory = MemorySampler(lambda: self.pids() + [p for p in (self.parent_pid,) if p is not None])
        self._scaler = Scaler.of(state, self._queue, self._supervisor.grow, self.scaled)  # None: a fixed pool

    # -- lifecycle ------------------------------------------------------------------------------

    size = property(lambda self: len(self._state.active))  # workers now (an elastic pool's active slots)
    min_size = property(lambda self: self.options.fewest)
    max_size = property(lambda self: self.options.workers)

    @property
    def max_pending(self) -> int:
        return self._max_pending

    async def _open(self) -> None:
        """Start the workers (MIN of an elastic pool) and return once all of them are ready to take calls."""
        state, options = self._state, self.options
        state.loop = self._loop
        try:
            await asyncio.get_running_loop().run_in_executor(None, sweep_orphans)  # a SIGKILLed service left them
            budget = plan_budget(options.shm_budget, options.shm_need) if options.shm_budget != 0 else 0
            if budget > 0:
                self._broker = Broker(state, budget, self.prefix, self._run_background)
            handlers = FrameHandlers(state, self._supervisor, self._broker)
            self._controls, self._results = handlers.controls(), handlers.results()
            await self._supervisor.start(self.prefix, self.shm_threshold)
        except BaseException:
            await self.aclose()
            raise

    async def _stop(self) -> None:
        """Fail what is queued, stop every worker (killing the busy ones), free the table and segments."""
        for call in self._queue:
            settle(call.waiter, error=PoolClosed())
            drop(call)
        self._queue.clear()
        await self._supervisor.stop()
        if self._broker is not None:
            await self._broker.aclose()  # after the workers are gone: nobody writes into a segment any more

    def _tick(self) -> None:
        now = time.monotonic()
        if self._broker is not None:
            self._broker.trim(now)
        self._supervisor.tick(now)
        if self._scaler is not None:
            self._scaler.tick(now)

    def _is_quiet(self) -> bool:
        return not self._queue and all(w is None or not w.inflight for w in self._workers)

    # -- calling --------------------------------------------------------------------------------

    async def call(self, task: str, kwargs: dict[str, Any], options: CallOptions = PLAIN_CALL) -> Outcome:
        """Run a registered task in a worker; the loop-native path (no concurrent.futures layer).

        `kwargs` must be plain data (what JSON decodes to, and bytes), or a `Lease` from
        `payload_buffer()` standing for bytes: the call holds its own reference until the worker is
        done with it, so the caller releases its own whenever it likes. Bytes larger than the
        threshold travel through shared memory either way. Raises TaskFailed, WorkerCrashed,
        TaskTimeout, Overloaded or PoolClosed. `on_progress` is called on the loop with what the
        task reports through `progress()`. Cancelling the awaiting coroutine drops the call if no
        worker has taken it yet, and stops it if it runs when `kill_on_cancel` (or the pool's
        cancel_running) is set. With `shared_result`, a large bytes result comes as a `Lease` on
        the segment the worker wrote it into (no copy): the caller must `release()` it.
        """
        assert self._loop is not None, "start() the pool first"
        if (spec := registry.get(task)) is not None and spec.batch is not None:  # gathered first: batching.py
            return await self.batcher.call(spec, kwargs, options)
        waiter: asyncio.Future[Outcome] = self._loop.create_future()
        timeout = options.timeout
        call = Call(
            next(self._ids), CALL_TASK, task, kwargs, options.encode_json,
            timeout if timeout is not None else self.options.task_timeout, waiter,
        )
        call.progress = options.on_progress
        call.kill_on_cancel = options.kill_on_cancel
        call.shared = options.shared_result
        broker = self._broker
        if broker is not None:
            threshold = broker.threshold
            for value in kwargs.values():
                if type(value) is Lease or (type(value) is bytes and len(value) > threshold):
                    await broker.share(call)
                    break
        return await self._await(call, waiter)

    async def call_chunk(
        self, task: str, items: list[dict[str, Any]], timeout: float | None = None, kind: int = CALL_MAP
    ) -> list[Outcome | TaskFailed]:
        """Run a registered task over several argument sets in one worker call (a map chunk, or with
        CALL_BATCH one batch: Executor.call_chunk). Each item succeeds (an Outcome with its JSON-encoded
        value or raw bytes) or fails on its own (TaskFailed); a crash or timeout of the whole call raises
        as for `call`. `timeout` covers the whole chunk."""
        assert self._loop is not None, "start() the pool first"
        if kind == CALL_MAP and (spec := registry.get(task)) is not None and spec.batch is not None:
            return await self.batcher.call_chunk(spec, items, timeout)
        waiter: asyncio.Future[list[Outcome | TaskFailed]] = self._loop.create_future()
        per_call = self.options.task_timeout * (max(1, len(items)) if kind == CALL_MAP else 1)
        call = Call(next(self._ids), kind, task, items, True, timeout if timeout is not None else per_call, waiter)
        broker = self._broker
        threshold = broker.threshold if broker is not None else 0
        if broker is not None and any(
            type(v) is Lease or (type(v) is bytes and len(v) > threshold) for item in items for v in item.values()
        ):
            await broker.share(call)
        return await self._await(call, waiter)

    def call_stream(self, task: str, kwargs: dict[str, Any], options: CallOptions = PLAIN_CALL) -> ItemStream:
        return PoolStream(self, task, kwargs, options)  # a generator task's items, with flow control: streams.py

    async def _await(self, call: Call, waiter: asyncio.Future[Any]) -> Any:
        try:
            self._admit(call)
        except BaseException:
            drop(call)
            raise
        try:
            return await waiter
        except asyncio.CancelledError:
            self._abandon(call)
            raise

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Executor API: run a picklable module-level function in a worker (run_in_executor uses this).

        The future gets the function's return value, or TaskFailed, WorkerCrashed, TaskTimeout,
        Overloaded or PoolClosed. The function and its arguments are pickled here, in the caller's
        thread, so one that cannot be sent fails its own future only.
        """
        if self._loop is None:
            raise RuntimeError("start() the pool before submitting work")
        on_loop = threading.get_ident() == self._loop_thread
        # On the loop's thread, a future asyncio takes as its own: run_in_executor returns it as it
        # is and its result wakes the awaiting task with no thread-safe hop (loop_future.py).
        future: cf.Future[Any] = LoopFuture(self._loop, self._loop_thread) if on_loop else cf.Future()
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        try:
            blob = pickled_call(fn, args, kwargs, self._functions)
        except Exception as exc:  # noqa: BLE001 - a lambda, a lock...: this call fails, nothing else
            future.set_exception(TaskFailed(type(exc).__name__, f"the call cannot be sent to a worker: {exc}"))
            return future
        call = Call(next(self._ids), CALL_FUNCTION, name, blob, False, self.options.task_timeout, future)
        if on_loop:
            self._admit_or_fail(call)
        else:
            self._loop.call_soon_threadsafe(self._admit_or_fail, call)
        return future

    # -- shared memory and introspection ----------------------------------------------------------

    async def payload_buffer(self, size: int) -> Lease | None:
        """A writable shared-memory buffer for a payload of `size` bytes, to pass as a task argument;
        None when `size` is not above the threshold or there is no room (then use bytes). Release it."""
        broker = self._broker
        if broker is None or self._closing or size <= broker.threshold:
            return None
        return await broker.lease(size)

    def payload_stats(self) -> dict[str, Any] | None:
        return self._broker.stats() if self._broker is not None else None

    def output_stats(self) -> dict[str, Any] | None:
        return self._supervisor.output.stats()

    @property
    def segments(self) -> SegmentPool | None:
        """The shared-memory segments this pool lends (None: large payloads go through the sockets)."""
        return self._broker.segments if self._broker is not None else None

    @property
    def shm_threshold(self) -> int | None:
        """Binary payloads larger than this go through shared memory; None: never."""
        return self._broker.threshold if self._broker is not None else None

    @property
    def pending(self) -> int:
        """Calls admitted and waiting for a worker."""
        return len(self._queue)

    @property
    def alive(self) -> int:
        return sum(1 for w in self._workers if w is not None and w.ready and not w.dying)

    start_error = property(lambda self: self._supervisor.start_error)
    parent_pid = property(lambda self: self._supervisor.parent_pid)

    async def sample_memory(self, max_age: float = 1.0) -> None:
        await self._memory.sample(max_age)

    def memory(self) -> dict[int, MemoryUse]:
        return self._memory.last

    def cpu_seconds(self) -> dict[int, float]:
        return self._memory.cpu

    @property
    def replacing(self) -> int:
        """Workers being replaced right now with no back-off (a recycle, a timeout or cancel kill):
        while one is, the pool still takes calls (they wait in the queue), so it is still ready."""
        return len(self._state.replacing)

    def pids(self) -> list[int]:
        """Pids of the worker processes the pool holds now (started, not yet seen to exit)."""
        return [w.pid for w in self._workers if w is not None]

    def inflight(self) -> dict[int, int]:
        """Calls handed to each worker and not answered yet (pid -> count, the running one included)."""
        return {w.pid: len(w.inflight) for w in self._workers if w is not None}

    def rows(self) -> list[WorkerRow]:
        """The shared-memory table as the workers last wrote it: a row per slot in use (PoolState.rows)."""
        return self._state.rows() if not self._closed else []

    # -- admission and dispatch -----------------------------------------------------------------

    def _admit_or_fail(self, call: Call) -> None:
        if call.waiter.done():
            return  # cancelled before it reached the loop
        try:
            self._admit(call)
        except Exception as exc:  # noqa: BLE001 - Overloaded/PoolClosed go to the caller's future
            settle(call.waiter, error=exc)
            drop(call)

    def _admit(self, call: Call) -> None:
        if self._closing:
            raise PoolClosed()
        average = self._averages.get(call.name)
        if average is not None:
            call.short = average < _SHORT
            call.est = average * len(call.payload) if call.kind == CALL_MAP else average  # a batch: per invocation
        else:
            call.est = 1.0  # unknown: not short, so it is never pipelined and never has one behind it
        if not self._queue:
            if call.est < _TINY and self._dirty:
                # A frame leaves for these workers in this loop iteration anyway: a call of a few
                # microseconds rides along rather than wake an idle worker, whose wake-up (a context
                # switch each side) costs more CPU than the call (docs/architecture.md, "Performance notes").
                for w in self._dirty:
                    if w.ready and not w.dying and w.fits(call, self.options.window):
                        self._give(w, call)
                        return
            while self._idle:
                w = self._idle.pop()
                w.idle = False
                if w.ready and not w.dying and not w.inflight:
                    if not self._give(w, call):
                        self._park(w)
                    return
            if call.short:
                best: WorkerHandle | None = None
                for candidate in self._workers:
                    if (
                        candidate is not None and candidate.ready and not candidate.dying and candidate.inflight
                        and (best is None or len(candidate.inflight) < len(best.inflight))
                        and candidate.fits(call, self.options.window)
                    ):
                        best = candidate
                if best is not None:
                    self._give(best, call)
                    return
        if len(self._queue) >= self.max_pending:
            raise Overloaded(len(self._queue))
        self._queue.append(call)
        if self._scaler is not None:
            self._scaler.on_queued()

    def _give(self, w: WorkerHandle, call: Call) -> bool:
        """Hand `call` to `w`, unless its caller has gone away meanwhile: then release what it holds
        (False)."""
        if claim(call):
            self._assign(w, call)
            return True
        drop(call)
        return False

    def _assign(self, w: WorkerHandle, call: Call) -> None:
        call.worker = w
        if call.leases is not None:
            for lease in call.leases:
                lease.segment.mapped_by.add(w.pid)
        w.add(call)
        w.outbox.append(call.message())
        if len(w.outbox) == 1:
            self._dirty.append(w)
            if self._flush_handle is None:
                assert self._loop is not None
                self._flush_handle = self._loop.call_soon(self._flush)

    def _park(self, w: WorkerHandle) -> None:
        if not w.idle and not w.inflight and w.ready and not w.dying:
            w.idle = True
            self._idle.append(w)

    def _refill(self, w: WorkerHandle) -> None:
        """Top up a worker's window from the queue; park it as idle if there is nothing to do."""
        if not w.ready or w.dying:
            return
        queue = self._queue
        inflight = w.inflight
        while queue:
            if inflight and not w.fits(queue[0], self.options.window):
                break
            self._give(w, queue.popleft())
        self._park(w)
        self._check_quiet()

    def _pump(self) -> None:
        """Hand queued calls to idle workers (after a worker starts or calls were re-queued)."""
        while self._queue and self._idle:
            w = self._idle.pop()
            w.idle = False
            self._refill(w)

    def _requeue(self, calls: list[Call]) -> None:
        """The supervisor's hand-back: calls a dead worker never started go first in line, to idle workers."""
        self._queue.extendleft(reversed(calls))
        self._pump()
        self._check_quiet()

    def _abandon(self, call: Call) -> None:
        """The caller stopped waiting: drop the call if it is still queued, and, where the pool is
        told to, stop it if it is running (calls already in a worker's window run anyway)."""
        holder = call.worker
        if holder is None:
            with contextlib.suppress(ValueError):
                self._queue.remove(call)
                drop(call)
            self._check_quiet()
        elif self.options.cancel_running or call.kill_on_cancel:
            w = self._workers[holder.slot]
            if w is not None and w is holder and self._supervisor.running_call(w) == call.id:
                self._supervisor.kill(w, "cancelled")

    # -- the wire -------------------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_handle = None
        dirty, self._dirty = self._dirty, []
        loop = self._loop
        assert loop is not None
        for w in dirty:
            messages, w.outbox = w.outbox, []
            if w.dying or not messages:
                continue  # calls in a dying worker's window are re-queued when its death is seen
            try:
                header, payload = framing.dumps(messages)
            except Exception:  # noqa: BLE001 - an argument that will not pickle fails its own call only
                header, payload = w.dumps_sendable(messages)
                if not w.inflight:
                    self._park(w)
                    self._check_quiet()
            w.write(loop, header, payload)

    def _on_readable(self, w: WorkerHandle) -> None:
        frames, eof = w.reader.read(w.sock)
        for frame in frames:
            self._on_frame(w, frame)
        if eof and not w.eof:
            w.eof = True
            assert self._loop is not None
            self._loop.remove_reader(w.sock.fileno())
        elif frames:
            self._refill(w)

    def _on_frame(self, w: WorkerHandle, frame: Any) -> None:
        if type(frame) is not list:
            self._on_signal(w, frame)
            return
        averages = self._averages
        controls = self._controls
        for call_id, status, payload, elapsed in frame:
            if status in controls:  # PROGRESS_REPORT, SEGMENT_REQUEST, RETIRE_NOTICE: they answer no call
                controls[status](w, call_id, payload)
                continue
            w.done += 1
            call = w.take(call_id)
            if call is None:
                continue
            if call.kind == CALL_MAP:  # the time per item is what says whether the task is short
                elapsed /= max(1, len(call.payload))
            averages[call.name] = 0.8 * averages.get(call.name, elapsed) + 0.2 * elapsed
            if call.leases is not None:
                drop_leases(call.leases)  # the worker is done with its arguments
                call.leases = None
            if status in _VALUES and call.results is None:
                # The hot path, settled here: a plain value, nothing granted (frames.deliver's rule).
                if call.kind == CALL_FUNCTION:
                    settle(call.waiter, payload)
                else:
                    settle(call.waiter, Outcome(payload, w.pid, elapsed, status == RESULT_JSON))
            else:
                self._results[status](w, call, status, payload, elapsed)

    def _on_signal(self, w: WorkerHandle, frame: Any) -> None:
        """A frame that is not a list of messages: WORKER_READY, WORKER_START_FAILED or a BadFrame."""
        if frame == WORKER_READY:
            self._supervisor.on_ready(w)
            self._refill(w)
            self._pump()
        elif type(frame) is tuple and frame and frame[0] == protocol.WORKER_START_FAILED:
            self._supervisor.on_start_failed(w, str(frame[1]), str(frame[2]))
        else:  # framing.BadFrame: the stream cannot be trusted any more
            log.error("worker %d sent a frame the service cannot decode: %s", w.pid, frame)
            self._supervisor.kill(w, "crashed")
