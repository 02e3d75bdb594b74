"""The local worker pool: a `concurrent.futures.Executor` built for the event loop.

Why not the stock ProcessPoolExecutor: it costs ~200 µs per call (a feeder thread, a result thread
and the future layer), breaks as a whole when one worker dies, cannot stop a running task and
queues without bound. This pool instead:

- starts workers through the forkserver (the service process, with its loop and threads, is never
  forked) and gives each one socket pair whose parent end the loop reads itself (`add_reader`);
- batches hand-over both ways: calls submitted during one loop iteration go out as one frame per
  worker, and workers coalesce their results;
- keeps a small in-flight window per worker (3 calls; up to 16 for tasks that take microseconds),
  refilled straight from the read callback, and pipelines only calls that are known to be short,
  so a long task never holds a short one back; a call of a few microseconds joins a frame that
  is leaving anyway rather than wake an idle worker (the wake-up would cost more than the call);
- watches each worker's death through its process sentinel: the call that was running fails
  (WorkerCrashed) at once, the calls that had not started move to another worker, a replacement
  starts, and a task that keeps crashing workers meets an exponential back-off instead of a spin;
- enforces timeouts from the start time each worker writes in the shared-memory table, by killing
  the worker (the only way to stop arbitrary Python code) and replacing it; with a memory limit,
  a worker whose RSS passes twice the limit in the middle of a task is killed the same way;
- refuses work beyond `max_pending` waiting calls at once (Overloaded), never buffers without bound;
- moves binary payloads larger than `shm_threshold` through shared-memory segments instead of the
  sockets (workers/shm.py): the pool owns the segment pool, hands each call's segments to its worker
  as (name, length) handles, grants result segments on request, and releases every segment a call
  held once its worker is done with it: result, error, crash, timeout kill, abandonment or close.

Everything on the loop is a short non-blocking step; process start, which can block for a few
milliseconds inside multiprocessing, and the final stop run on one small helper thread.

Beside this module: `calls.py` (a call's record, its Outcome, completing its waiter), `handle.py`
(the loop's end of one worker: socket, window, write buffer), `processes.py` (killing and reaping
workers) and `loop_future.py` (the future `submit` returns on the loop's thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import itertools
import logging
import multiprocessing as mp
import pickle
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FunctionType
from typing import Any

from workers import framing
from workers.errors import Overloaded, PoolClosed, TaskFailed, TaskTimeout, WorkerCrashed, describe_exit
from workers.executor import PLAIN_CALL, CallOptions, Executor, ExecutorSettings, Outcome
from workers.local.calls import Call, claim, drop, drop_leases, settle
from workers.local.handle import WorkerHandle
from workers.local.loop_future import LoopFuture
from workers.local.processes import exit_code_of, kill_group, kill_tree, reap, stop_processes
from workers.shm import Lease, Segment, SegmentPool, ShmRef, new_prefix, plan_budget
from workers.stats import BUSY, RETIRE_REASONS, RETIRING, WorkerRow, WorkerTable
from workers.worker import (
    ALLOC,
    ERROR,
    FORGET,
    GRANT,
    KIND_FUNCTION,
    KIND_MAP,
    KIND_TASK,
    OK,
    OK_JSON,
    OK_MAP,
    OK_PICKLED,
    OK_SHM,
    PROGRESS,
    READY,
    RETIRE,
    WorkerOptions,
    rss_of,
)
from workers.worker import main as worker_main

log = logging.getLogger("procbridge.pool")

_TICK = 0.05  # supervision period: timeouts are enforced within this of their deadline
_SHORT = 0.002  # calls whose task averages under this may be pipelined behind another
_TINY = 0.00005  # calls whose task averages under this join a frame already leaving, idle workers or not
_CRASH_WINDOW = 10.0
_MEMORY_CEILING = 2  # a running task is killed once its worker's RSS passes this × max_worker_memory
_FUNCTIONS_KEPT = 256  # plain functions whose pickle submit() keeps
_DRAIN_READS = 1024  # bound on reads of a dead worker's socket (it holds at most its buffer)


@dataclass(frozen=True)
class PoolOptions:
    workers: int
    modules: tuple[str, ...] = ()
    max_pending: int = 0  # 0: four per worker
    task_timeout: float = 60.0
    max_tasks_per_worker: int = 0
    max_worker_memory: int = 0  # bytes of RSS: recycle between tasks past it, kill mid-task past twice it
    nice: int = 10
    window: int = 3
    start_timeout: float = 60.0
    cancel_running: bool = False  # stop a running call when its caller goes away
    debug: bool = False
    shm_threshold: int = 256 * 1024  # binary payloads larger than this go through shared memory
    shm_budget: int | None = None  # bytes of /dev/shm for payloads; None: 3/4 of its free space; 0: off
    shm_need: int = 0  # bytes the largest payload in and out takes: less budget than this is warned about

    @classmethod
    def from_settings(cls, settings: ExecutorSettings) -> PoolOptions:
        return cls(
            workers=settings.workers,
            modules=settings.tasks,
            max_pending=settings.max_pending,
            task_timeout=settings.task_timeout,
            max_tasks_per_worker=settings.max_tasks_per_worker,
            max_worker_memory=settings.max_worker_memory,
            nice=settings.worker_nice,
            cancel_running=settings.cancel_running_on_disconnect,
            debug=settings.debug,
            shm_threshold=settings.shm_threshold,
            shm_budget=settings.shm_budget,
            shm_need=2 * settings.max_body,  # one body of the largest size in, one result out
        )


class WorkerPool(Executor):
    """A supervised pool of worker processes. Create, `await start()`, use, `await aclose()`."""

    tick_interval = _TICK

    def __init__(self, options: PoolOptions) -> None:
        if options.workers < 1:
            raise ValueError("a pool needs at least one worker")
        super().__init__()
        self.options = options
        self._size = options.workers
        self._max_pending = options.max_pending or 4 * options.workers
        self._ctx = mp.get_context("forkserver")
        self._table: WorkerTable | None = None
        self._spawner = cf.ThreadPoolExecutor(1, thread_name_prefix="procbridge-spawn")
        self._workers: list[WorkerHandle | None] = [None] * self.size
        self._replacing: set[int] = set()  # slots whose replacement is starting (no back-off)
        self._starting: dict[int, tuple[BaseProcess, socket.socket]] = {}
        self._idle: list[WorkerHandle] = []
        self._queue: deque[Call] = deque()
        self._dirty: list[WorkerHandle] = []
        self._flush_handle: asyncio.Handle | None = None
        self._ids = itertools.count(1)
        self._averages: dict[str, float] = {}
        self._functions: dict[Callable[..., Any], bytes] = {}  # submit(): plain functions, pickled once
        self._crashes: deque[float] = deque()
        self._started: asyncio.Event | None = None
        self.prefix = new_prefix()  # of every shared-memory name this pool creates (table and segments)
        self.segments: SegmentPool | None = None  # None: large payloads go through the sockets

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def max_pending(self) -> int:
        return self._max_pending

    async def _open(self) -> None:
        """Start every worker and return once all of them are ready to take calls."""
        assert self._loop is not None
        self._table = WorkerTable.create(self.size, name=f"{self.prefix}table")
        options = self.options
        budget = plan_budget(options.shm_budget, options.shm_need) if options.shm_budget != 0 else 0
        if budget > 0:
            self.segments = SegmentPool(
                threshold=options.shm_threshold, budget=budget, prefix=self.prefix, on_unlink=self._forget
            )
        # The forkserver imports these once; every worker forked from it starts with them loaded.
        self._ctx.set_forkserver_preload(["workers.worker", "workers.builtin_tasks"])
        self._started = asyncio.Event()
        try:
            await asyncio.gather(*(self._spawn(slot) for slot in range(self.size)))
        except BaseException:
            await self.aclose()
            raise
        try:
            await asyncio.wait_for(self._started.wait(), self.options.start_timeout)
        except TimeoutError:
            await self.aclose()
            raise RuntimeError(f"workers did not start within {self.options.start_timeout:g} s") from None
        if self.restarts:
            await self.aclose()
            raise RuntimeError("a worker died while starting (its traceback is above): check the task modules")

    async def _stop(self) -> None:
        """Stop every worker (killing those still busy), fail what is left, free the table."""
        for call in self._queue:
            settle(call.waiter, error=PoolClosed())
            drop(call)
        self._queue.clear()
        procs: list[BaseProcess] = []
        for w in self._workers:
            if w is None:
                continue
            for call in w.inflight:
                settle(call.waiter, error=PoolClosed())
                drop(call)  # the segments are unlinked once the workers are gone
            w.dying = w.dying or "shutdown"
            busy = bool(w.inflight)
            w.inflight.clear()
            self._detach(w)  # closing our end tells an idle worker to exit
            if busy:
                kill_tree(w.pid)
            procs.append(w.proc)
        for proc, parent in self._starting.values():  # still inside proc.start(): stopped right after it
            parent.close()
            procs.append(proc)
        self._starting.clear()
        self._workers = [None] * self.size
        self._idle.clear()
        for task in list(self._background):
            task.cancel()
        if self._loop is not None:
            # The spawner runs one thing at a time, so any proc.start() in progress finishes first.
            await self._loop.run_in_executor(self._spawner, stop_processes, procs, 2.0)
        self._spawner.shutdown(wait=False)
        if self._table is not None:
            self._table.close()
            self._table = None
        if self.segments is not None:
            await self.segments.aclose()  # after the workers are gone: nobody writes into a segment any more

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
        waiter: asyncio.Future[Outcome] = self._loop.create_future()
        timeout = options.timeout
        call = Call(
            next(self._ids), KIND_TASK, task, kwargs, options.encode_json,
            timeout if timeout is not None else self.options.task_timeout, waiter,
        )
        call.progress = options.on_progress
        call.kill_on_cancel = options.kill_on_cancel
        call.shared = options.shared_result
        segments = self.segments
        if segments is not None:
            threshold = segments.threshold
            for value in kwargs.values():
                if type(value) is Lease or (type(value) is bytes and len(value) > threshold):
                    await self._share(call)
                    break
        return await self._await(call, waiter)

    async def call_chunk(
        self, task: str, items: list[dict[str, Any]], timeout: float | None = None
    ) -> list[Outcome | TaskFailed]:
        """Run a registered task over several argument sets in one worker call (a map chunk).

        Each item succeeds (an Outcome with its JSON-encoded value or raw bytes) or fails on its own
        (TaskFailed); a crash or timeout of the whole call raises as for `call`. `timeout` covers
        the whole chunk.
        """
        assert self._loop is not None, "start() the pool first"
        waiter: asyncio.Future[list[Outcome | TaskFailed]] = self._loop.create_future()
        call = Call(
            next(self._ids), KIND_MAP, task, items, True,
            timeout if timeout is not None else self.options.task_timeout * max(1, len(items)), waiter,
        )
        segments = self.segments
        if segments is not None:
            threshold = segments.threshold
            if any(
                type(v) is Lease or (type(v) is bytes and len(v) > threshold) for item in items for v in item.values()
            ):
                await self._share(call)
        return await self._await(call, waiter)

    async def payload_buffer(self, size: int) -> Lease | None:
        """A writable shared-memory buffer for a payload of `size` bytes (e.g. a request body read
        from the socket), to pass as a task argument; None when `size` is not above the threshold
        or there is no room (then use bytes: `call()` tries shared memory once more, else they go
        through the socket). Release it when done."""
        segments = self.segments
        if segments is None or self._closing or size <= segments.threshold:
            return None
        return await segments.lease(size, "in", count_pipe=False)  # counted when the bytes are sent

    def payload_stats(self) -> dict[str, Any] | None:
        segments = self.segments
        if segments is None:
            return None
        return {**segments.stats(), "payloads": dict(segments.payloads)}

    @property
    def shm_threshold(self) -> int | None:
        """Binary payloads larger than this go through shared memory; None: never."""
        return self.segments.threshold if self.segments is not None else None

    async def _share(self, call: Call) -> None:
        """Give the call its own reference to each Lease among its arguments, and copy bytes larger
        than the threshold into new leases (those that find no room stay bytes)."""
        assert self.segments is not None
        segments = self.segments
        leases: list[Lease] = []
        call.leases = leases  # released with the call, even if this is cancelled half-way
        try:
            if call.kind == KIND_MAP:
                call.payload = [await self._share_kwargs(item, segments, leases) for item in call.payload]
            else:
                call.payload = await self._share_kwargs(call.payload, segments, leases)
        except BaseException:
            drop(call)
            raise

    @staticmethod
    async def _share_kwargs(kwargs: dict[str, Any], segments: SegmentPool, leases: list[Lease]) -> dict[str, Any]:
        out = dict(kwargs)
        for key, value in kwargs.items():
            if type(value) is Lease:
                leases.append(value.retain())
            elif type(value) is bytes and len(value) > segments.threshold:
                lease = await segments.lease(len(value), "in")
                if lease is not None:
                    leases.append(lease)
                    lease.buffer[: len(value)] = value
                    out[key] = lease
        return out

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
        # is and its result wakes the awaiting task with no thread-safe hop (workers/loop_future.py).
        future: cf.Future[Any] = LoopFuture(self._loop, self._loop_thread) if on_loop else cf.Future()
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        try:
            fn_blob = self._functions.get(fn) if type(fn) is FunctionType else None
            if fn_blob is None:
                fn_blob = pickle.dumps(fn, protocol=5)
                if type(fn) is FunctionType and len(self._functions) < _FUNCTIONS_KEPT:
                    self._functions[fn] = fn_blob  # a plain function pickles as its name: the same every time
            blob = pickle.dumps((fn_blob, args, kwargs), protocol=5)
        except Exception as exc:  # noqa: BLE001 - a lambda, a lock...: this call fails, nothing else
            future.set_exception(TaskFailed(type(exc).__name__, f"the call cannot be sent to a worker: {exc}"))
            return future
        call = Call(next(self._ids), KIND_FUNCTION, name, blob, False, self.options.task_timeout, future)
        if on_loop:
            self._admit_or_fail(call)
        else:
            self._loop.call_soon_threadsafe(self._admit_or_fail, call)
        return future

    # -- introspection --------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Calls admitted and waiting for a worker."""
        return len(self._queue)

    @property
    def alive(self) -> int:
        return sum(1 for w in self._workers if w is not None and w.ready and not w.dying)

    @property
    def replacing(self) -> int:
        """Workers being replaced right now with no back-off (a recycle, a timeout or cancel kill):
        while one is, the pool still takes calls (they wait in the queue), so it is still ready."""
        return len(self._replacing)

    def pids(self) -> list[int]:
        """Pids of the worker processes the pool holds now (started, not yet seen to exit)."""
        return [w.pid for w in self._workers if w is not None]

    def inflight(self) -> dict[int, int]:
        """Calls handed to each worker and not answered yet (pid -> count, the running one included)."""
        return {w.pid: len(w.inflight) for w in self._workers if w is not None}

    def rows(self) -> list[WorkerRow]:
        """The shared-memory table as the workers last wrote it, one row per slot."""
        return self._table.rows() if self._table is not None and not self._closed else []

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
            call.est = average * len(call.payload) if call.kind == KIND_MAP else average
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
            if w is not None and w is holder and self._running_call(w) == call.id:
                self._kill(w, "cancelled")

    def _running_call(self, w: WorkerHandle) -> int | None:
        if self._table is None:
            return None
        row = self._table.read(w.slot)
        return row.call_id if row.state == BUSY and row.pid == w.pid else None

    # -- the wire -------------------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_handle = None
        dirty, self._dirty = self._dirty, []
        for w in dirty:
            messages, w.outbox = w.outbox, []
            if w.dying or not messages:
                continue  # calls in a dying worker's window are re-queued when its death is seen
            try:
                header, payload = framing.dumps(messages)
            except Exception:  # noqa: BLE001 - an argument that will not pickle fails its own call only
                header, payload = self._dumps_isolating(w, messages)
            self._write(w, header, payload)

    def _dumps_isolating(self, w: WorkerHandle, messages: list[tuple[Any, ...]]) -> tuple[bytes, bytes]:
        good = []
        for message in messages:
            try:
                pickle.dumps(message, protocol=5)
                good.append(message)
            except Exception as exc:  # noqa: BLE001
                for call in [c for c in w.inflight if c.id == message[0]]:
                    w.unassign(call)
                    settle(call.waiter, error=TaskFailed(type(exc).__name__, f"arguments cannot be sent: {exc}"))
                    drop(call)
        if not w.inflight:
            self._park(w)
            self._check_quiet()
        return framing.dumps(good)

    def _write(self, w: WorkerHandle, header: bytes, payload: bytes) -> None:
        assert self._loop is not None
        w.write(self._loop, header, payload)

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
            if frame == READY:
                w.ready = True
                self._replacing.discard(w.slot)
                if self._started is not None and all(x is not None and x.ready for x in self._workers):
                    self._started.set()
                self._refill(w)
                self._pump()
            else:  # framing.BadFrame: the stream cannot be trusted any more
                log.error("worker %d sent a frame the service cannot decode: %s", w.pid, frame)
                self._kill(w, "crashed")
            return
        averages = self._averages
        for call_id, status, payload, elapsed in frame:
            if status == PROGRESS:
                self._progress(w, call_id, payload)
                continue
            if status == ALLOC:
                self._grant(w, call_id, payload)
                continue
            if status == RETIRE:  # it will exit once this frame is out: send it nothing more
                w.dying = w.dying or RETIRE_REASONS.get(payload, "retired")
                self._replacing.add(w.slot)
                if w.idle:
                    w.idle = False
                    with contextlib.suppress(ValueError):
                        self._idle.remove(w)
                continue
            w.done += 1
            call = w.take(call_id)
            if call is None:
                continue
            if call.kind == KIND_MAP:  # the time per item is what says whether the task is short
                elapsed /= max(1, len(call.payload))
            averages[call.name] = 0.8 * averages.get(call.name, elapsed) + 0.2 * elapsed
            if call.leases is not None:
                drop_leases(call.leases)  # the worker is done with its arguments
                call.leases = None
            if status == ERROR:
                settle(call.waiter, error=TaskFailed(*payload))
                if call.results is not None:
                    drop(call)
                continue
            if status == OK_SHM:
                payload = self._shared_result(call, payload, call.shared)
            elif status == OK_MAP and call.results is not None:
                payload = [
                    (OK, self._shared_result(call, value, False), item_elapsed) if item_status == OK_SHM
                    else (item_status, value, item_elapsed)
                    for item_status, value, item_elapsed in payload
                ]
            if call.results is not None:
                drop(call)  # granted but not used (the result was small after all, or failed)
            if status == OK_PICKLED:
                try:
                    payload = pickle.loads(payload)
                except BaseException as exc:  # noqa: BLE001 - not even SystemExit may escape into the loop
                    settle(call.waiter, error=TaskFailed(
                        type(exc).__name__, f"the task's result cannot be decoded by the service: {exc}"
                    ))
                    continue
            if call.kind == KIND_FUNCTION:
                settle(call.waiter, payload)
            elif status == OK_MAP:
                settle(call.waiter, [
                    TaskFailed(*value) if item_status == ERROR
                    else Outcome(value, w.pid, item_elapsed, item_status == OK_JSON)
                    for item_status, value, item_elapsed in payload
                ])
            elif not settle(call.waiter, Outcome(payload, w.pid, elapsed, status == OK_JSON)) and type(
                payload
            ) is Lease:
                payload.release()  # nobody is waiting for it any more

    def _shared_result(self, call: Call, ref: ShmRef, shared: bool) -> Lease | bytes:
        """The result the worker wrote into a segment granted to this call: that lease (the caller
        takes it over) or its bytes (copied, the segment released at once)."""
        results = call.results or []
        for i, lease in enumerate(results):
            if lease.name == ref[0]:
                del results[i]
                break
        else:  # cannot happen: the worker writes only into segments granted to this call
            log.error("call %d answered with segment %s, which was not granted to it", call.id, ref[0])
            return b""
        lease.length = ref[1]
        if shared:
            return lease
        try:
            return lease.tobytes()
        finally:
            lease.release()

    def _grant(self, w: WorkerHandle, call_id: int, size: int) -> None:
        """The worker asks for a segment for its running call's bytes result: from the free list now,
        or a new one made off the loop; with no room, None (it sends the bytes inline)."""
        call = next((c for c in w.inflight if c.id == call_id), None)
        segments = self.segments
        lease = segments.take(size, "out") if segments is not None and call is not None else None
        if lease is not None or call is None or segments is None:
            if lease is None and segments is not None:
                segments.count_pipe("out")
            self._send_grant(w, call_id, call, lease)
        else:
            self._run_background(self._grant_new(w, call, segments, size))

    async def _grant_new(self, w: WorkerHandle, call: Call, segments: SegmentPool, size: int) -> None:
        self._send_grant(w, call.id, call, await segments.lease(size, "out"))

    def _send_grant(self, w: WorkerHandle, call_id: int, call: Call | None, lease: Lease | None) -> None:
        """Answer an ALLOC (the worker waits for it): the segment, now the call's, or None."""
        if lease is not None:
            if call is None or w.eof or w.dying or not any(c is call for c in w.inflight):
                lease.release()  # the call or its worker is gone meanwhile
                lease = None
            else:
                lease.segment.mapped_by.add(w.pid)
                if call.results is None:
                    call.results = []
                call.results.append(lease)
        if not w.eof:
            self._write(w, *framing.dumps((GRANT, call_id, None if lease is None else lease.name)))

    def _forget(self, segment: Segment) -> None:
        """A segment was unlinked: the workers that may have it mapped unmap it (freeing its memory)."""
        for w in self._workers:
            if w is not None and w.pid in segment.mapped_by and not w.eof and not w.dying:
                self._write(w, *framing.dumps((FORGET, [segment.name])))

    @staticmethod
    def _progress(w: WorkerHandle, call_id: int, report: tuple[float, float | None, str | None]) -> None:
        for call in w.inflight:
            if call.id == call_id:
                if call.progress is not None and not call.waiter.done():
                    try:
                        call.progress(*report)
                    except Exception:
                        log.exception("a progress callback failed")
                return

    # -- supervision ----------------------------------------------------------------------------

    def _tick(self) -> None:
        """Enforce timeouts from the start times the workers wrote, and the memory ceiling of
        running tasks; runs every _TICK seconds."""
        if self._table is None:
            return
        now = time.monotonic()
        if self.segments is not None:
            self.segments.trim(now)
        ceiling = _MEMORY_CEILING * self.options.max_worker_memory
        for w in self._workers:
            if w is None or w.dying or not w.inflight:
                continue
            row = self._table.read(w.slot)
            if row.state != BUSY or row.pid != w.pid:
                continue
            for call in w.inflight:
                if call.id == row.call_id:
                    if call.timeout is not None and row.started_at > 0 and now - row.started_at > call.timeout:
                        # A row read while its worker rewrites it can mix fields of two states (the
                        # next call's id, the previous start): act only when two ticks agree.
                        seen = (row.call_id, row.started_at)
                        if w.overdue == seen:
                            settle(call.waiter, error=TaskTimeout(call.timeout))
                            self._kill(w, "timeout")
                        w.overdue = seen
                    break
            if ceiling and not w.dying and rss_of(w.pid) > ceiling:
                self._kill(w, "max_memory")  # its call gets WorkerCrashed when the death is seen

    def _kill(self, w: WorkerHandle, reason: str) -> None:
        if w.dying:
            return
        w.dying = reason
        if reason in ("timeout", "cancelled"):  # planned: its replacement starts at once
            self._replacing.add(w.slot)
        if w.idle:
            w.idle = False
            with contextlib.suppress(ValueError):
                self._idle.remove(w)
        log.warning("stopping worker %d (%s)", w.pid, reason)
        with contextlib.suppress(ValueError, OSError):
            if w.proc.exitcode is not None:
                return  # already gone (and reaped): its pid may not be ours any more
        kill_tree(w.pid)

    def _on_exit(self, w: WorkerHandle) -> None:
        """The worker's process sentinel fired: it is gone. Settle its calls, re-queue the ones it
        never started, and start its replacement: all in this one callback, no waiting."""
        assert self._loop is not None and self._table is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(w.proc.sentinel)
        reason = w.dying or "crashed"
        w.dying = reason
        for _ in range(_DRAIN_READS):  # results it sent before dying still count
            if w.eof:
                break
            self._on_readable(w)
        row = self._table.read(w.slot)
        mine = row.pid == w.pid
        if reason == "crashed" and mine and row.state == RETIRING:
            reason = w.dying = RETIRE_REASONS.get(row.retire_reason, "retired")
        self._detach(w)
        self._table.clear(w.slot)
        if self._workers[w.slot] is w:
            self._workers[w.slot] = None
        if w.idle:
            w.idle = False
            with contextlib.suppress(ValueError):
                self._idle.remove(w)
        exitcode = exit_code_of(w.proc)
        kill_group(w.pid)  # whatever the task started in the worker's process group goes with it
        running = row.call_id if mine and row.state == BUSY else None
        lost = max(0, row.tasks_done - w.done) if mine else 0  # finished, results never sent
        requeue = []
        for i, call in enumerate(w.inflight):
            if call.results is not None:  # it may have half-written them: never handed on
                drop_leases(call.results)
                call.results = None
            if i < lost or call.id == running:
                if settle(call.waiter, error=WorkerCrashed(w.pid, exitcode)):
                    log.error("worker %d died running %s (%s)", w.pid, call.name, describe_exit(exitcode))
                drop(call)
            elif not call.waiter.done():
                call.worker = None
                requeue.append(call)  # with its argument segments, for the next worker
            else:
                drop(call)
        w.inflight.clear()
        if reason == "crashed" and running is None and not lost:
            log.error("worker %d exited unexpectedly (%s)", w.pid, describe_exit(exitcode))
        self.restarts[reason] += 1
        if self._started is not None and not self._started.is_set():
            self._started.set()  # a death during start-up: start() reports it
        self._release(w.proc)
        self._queue.extendleft(reversed(requeue))
        self._pump()
        self._check_quiet()
        if not self._closed:
            unplanned = reason == "crashed" or (reason == "max_memory" and running is not None)
            delay = self._backoff() if unplanned else 0.0
            if not delay:
                self._replacing.add(w.slot)
            self._run_background(self._respawn(w.slot, delay))

    def _release(self, proc: BaseProcess) -> None:
        """Free the dead process's handles; its exit code is known, so this does not block."""
        try:
            proc.close()
        except ValueError:  # exit status not in yet (cannot really happen once the sentinel fired)
            with contextlib.suppress(RuntimeError):
                self._spawner.submit(reap, proc)

    async def _respawn(self, slot: int, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        await self._spawn(slot)

    def _backoff(self) -> float:
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > _CRASH_WINDOW:
            self._crashes.popleft()
        excess = len(self._crashes) - max(3, self.size)
        if excess <= 0:
            return 0.0
        delay = min(10.0, 0.1 * 2**excess)
        log.warning(
            "workers keep crashing (%d in %g s): waiting %.1f s before the next restart",
            len(self._crashes), _CRASH_WINDOW, delay,
        )
        return delay

    async def _spawn(self, slot: int) -> None:
        if self._closed:
            return
        assert self._loop is not None and self._table is not None
        parent, child = socket.socketpair()
        options = WorkerOptions(
            slot=slot,
            modules=self.options.modules,
            table_name=self._table.name,
            table_slots=self.size,
            nice=self.options.nice,
            max_tasks=self.options.max_tasks_per_worker,
            max_memory=self.options.max_worker_memory,
            debug=self.options.debug,
            shm_threshold=self.shm_threshold,
        )
        proc = self._ctx.Process(
            target=worker_main, args=(child, options), name=f"procbridge-worker-{slot}", daemon=True
        )
        self._starting[slot] = (proc, parent)  # if the pool closes meanwhile, _close stops it
        try:
            await self._loop.run_in_executor(self._spawner, proc.start)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._starting.pop(slot, None)
            self._replacing.discard(slot)
            parent.close()
            if self._started is None or not self._started.is_set():
                raise  # at start-up a failure to start is the caller's to see
            log.exception("could not start a worker; retrying in 1 s")
            if not self._closed:
                self._loop.call_later(1.0, lambda: self._run_background(self._spawn(slot)))
            return
        finally:
            child.close()
        if self._closed or self._starting.get(slot, (None,))[0] is not proc:
            return  # the pool closed while it started: _close has it
        del self._starting[slot]
        w = WorkerHandle(slot, proc, parent)
        parent.setblocking(False)
        self._workers[slot] = w
        self._loop.add_reader(parent.fileno(), self._on_readable, w)
        self._loop.add_reader(proc.sentinel, self._on_exit, w)

    def _detach(self, w: WorkerHandle) -> None:
        assert self._loop is not None
        fd = w.sock.fileno()
        if fd >= 0:
            if not w.eof:
                self._loop.remove_reader(fd)
            if w.wbuf:
                self._loop.remove_writer(fd)
                w.wbuf.clear()
            w.eof = True
            w.sock.close()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(w.proc.sentinel)

    def _is_quiet(self) -> bool:
        return not self._queue and all(w is None or not w.inflight for w in self._workers)
