"""The executor: the one seam between the service (`service/`) and whatever runs tasks.

    service/ (handlers, jobs, metrics)
        │  await executor.call(task, kwargs, CallOptions(...)) ──▶ Outcome | PoolError
        │  await executor.call_chunk(task, items, timeout)      ──▶ [Outcome | TaskFailed, ...]
        │  (a `batch=` task's calls and map items: gathered by `executor.batcher`, workers/batching.py, and
        │   sent as call_chunk(task, [kwargs, ...], timeout, kind=CALL_BATCH): one invocation per batch)
        │  async for item in executor.call_stream(task, kwargs, CallOptions(...)) ──▶ JSON bytes, ...
        │  executor.pending / alive / closing / rows() / readiness() / payload_stats() ...
        ▼
    Executor (this module: the declared interface, neutral defaults, one lifecycle)
        ├── workers.local.pool.WorkerPool      the local supervised pool (default)
        └── workers.dask.executor.DaskExecutor  a Dask cluster (--executor dask://HOST:PORT)

The service knows only what is written down here: it types its executor as `Executor`, never as a
backend, and never probes for attributes. A capability only one backend has (shared-memory payloads,
a custom worker listing) is declared here with a neutral default that the other backend inherits,
so a third backend works by overriding what it has. Both backends are also
`concurrent.futures.Executor`s, so `loop.run_in_executor(executor, fn, *args)` works with either.

Lifecycle, the same for every backend: `await start()` (bind to the running loop, then `_open()`;
calls may be made as soon as it has begun: they wait for the workers, up to `max_pending`), calls,
then `await drain(grace)` (refuse new calls, wait until `_is_quiet()` or the grace ends) or
`await aclose()` (once, shielded, however many callers: background tasks cancelled, then `_stop()`).
A backend's periodic `_tick()` (timeouts, supervision) runs every `tick_interval` seconds until close.

Errors a call can raise (all from `workers.errors`, each mapped to one HTTP answer by
`service.problems.from_pool_error`): TaskFailed (500), WorkerCrashed (502), ExecutorUnavailable
(502), Overloaded (503), PoolClosed (503 draining), TaskTimeout (504).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from workers.batching import Batcher
from workers.errors import StreamingUnsupported, TaskFailed
from workers.protocol import CALL_MAP

if TYPE_CHECKING:
    from workers.memory import MemoryUse
    from workers.stats import WorkerRow

log = logging.getLogger("procbridge.executor")

ProgressCallback = Callable[[float, float | None, str | None], None]


class Outcome(NamedTuple):
    """A finished call: the task's value, the worker pid, the seconds it ran, and whether `value`
    is the result already encoded as JSON bytes (calls made with encode_json=True)."""

    value: Any
    pid: int
    elapsed: float
    json: bool = False


class CallOptions(NamedTuple):
    """How one call runs, given once by the caller and read by the backend (a tuple: cheap to build
    on the hot path, and `_replace` derives one from a shared default).

    - timeout: seconds before the call's worker is stopped (None: the executor's task timeout);
    - encode_json: the Outcome's value is the result encoded as JSON bytes (bytes results stay bytes);
    - on_progress: called on the loop with the task's `progress()` reports;
    - kill_on_cancel: cancelling the awaiting coroutine stops a call that is already running (a call
      not started yet is always dropped);
    - shared_result: a large bytes result may come back as a `PayloadBuffer` (no copy) that the
      caller must `release()`; backends without shared memory return bytes.
    """

    timeout: float | None = None
    encode_json: bool = False
    on_progress: ProgressCallback | None = None
    kill_on_cancel: bool = False
    shared_result: bool = False


PLAIN_CALL = CallOptions()


class ItemStream(Protocol):
    """A generator task's items as they come (`Executor.call_stream`): each one JSON bytes, in the
    order yielded. `async for` ends after the last item (then `outcome` holds the count as its value,
    the pid and the seconds it ran), or raises what ended the call (TaskFailed mid-stream, WorkerCrashed,
    TaskTimeout, Overloaded, PoolClosed, StreamingUnsupported). `pid`: the worker, once known.
    `aclose()` (always call it: `contextlib.aclosing`) stops the generator if it still runs; it never
    waits. Cancelling a consumer waiting for an item stops the call as cancelling `call` does."""

    outcome: Outcome | None

    @property
    def pid(self) -> int | None: ...

    def __aiter__(self) -> ItemStream: ...

    async def __anext__(self) -> bytes: ...

    async def aclose(self) -> None: ...


class PayloadBuffer(Protocol):
    """A buffer the executor lends for one payload (the local pool's shared-memory segment):
    `buffer` is all of it, `length` the bytes in use; `release()` gives it back."""

    length: int

    @property
    def buffer(self) -> memoryview: ...

    def release(self) -> None: ...


class ExecutorSettings(Protocol):
    """The settings an executor is built from (the service's Config has them all): one object passed
    down, instead of its fields copied into each backend's options by hand."""

    @property
    def workers(self) -> int: ...  # the most workers (a fixed pool: the number)
    @property
    def min_workers(self) -> int: ...  # the fewest the pool shrinks to (a fixed pool: `workers`)
    @property
    def worker_idle(self) -> float: ...  # seconds without work before a worker above the fewest stops
    @property
    def tasks(self) -> tuple[str, ...]: ...
    @property
    def max_pending(self) -> int: ...
    @property
    def task_timeout(self) -> float: ...
    @property
    def worker_start_timeout(self) -> float: ...
    @property
    def max_tasks_per_worker(self) -> int: ...
    @property
    def max_worker_memory(self) -> int: ...
    @property
    def worker_nice(self) -> int: ...
    @property
    def cancel_running_on_disconnect(self) -> bool: ...
    @property
    def debug(self) -> bool: ...
    @property
    def shm_threshold(self) -> int: ...
    @property
    def shm_budget(self) -> int | None: ...
    @property
    def max_body(self) -> int: ...


class Executor(cf.Executor):
    """What `service/` may use, with neutral defaults; the backends override what they have."""

    tick_interval: float | None = None  # seconds between `_tick()` calls; None: no tick

    def __init__(self) -> None:
        self.restarts: Counter[str] = Counter()  # worker restarts by reason (crashed, timeout, ...)
        self.slot_restarts: Counter[int] = Counter()  # the same restarts by slot (where a backend has slots)
        self.scaled: Counter[str] = Counter()  # times an elastic pool grew ("up") or shrank ("down") by a worker
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._closing = False
        self._closed = False
        self._quiet: asyncio.Event | None = None
        self._started = asyncio.Event()  # set when start() has finished (no loop is bound before use)
        self._close_task: asyncio.Future[None] | None = None
        self._shutdown_task: asyncio.Future[None] | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self.batcher = Batcher(self)  # gathers the calls of `batch=` tasks; `call` and `call_chunk` hand them to it

    # -- what every backend must say ---------------------------------------------------------------

    @property
    def size(self) -> int:
        """Parallel lanes now: worker processes (local; an elastic pool's current size) or worker threads
        of the Dask cluster."""
        raise NotImplementedError

    @property
    def min_size(self) -> int:
        """The fewest lanes (an elastic local pool's MIN); neutral default: `size`."""
        return self.size

    @property
    def max_size(self) -> int:
        """The most lanes (an elastic local pool's MAX: what to size concurrency by); neutral default: `size`."""
        return self.size

    @property
    def max_pending(self) -> int:
        """Calls admitted and waiting beyond which the HTTP layer answers 503 `overloaded`."""
        raise NotImplementedError

    @property
    def pending(self) -> int:
        """Calls admitted and not yet running."""
        raise NotImplementedError

    @property
    def alive(self) -> int:
        """Workers able to take a call now (0, with `replacing` 0 too, makes /readyz answer 503)."""
        raise NotImplementedError

    async def call(self, task: str, kwargs: dict[str, Any], options: CallOptions = PLAIN_CALL) -> Outcome:
        """Run registered task `task` with `kwargs` (plain data, bytes, or a PayloadBuffer this
        executor lent). Raises one of the errors above. Cancelling the awaiting coroutine drops a
        call not started yet, and stops a running one when `options.kill_on_cancel` is set."""
        raise NotImplementedError

    async def call_chunk(
        self, task: str, items: list[dict[str, Any]], timeout: float | None = None, kind: int = CALL_MAP
    ) -> list[Outcome | TaskFailed]:
        """Run a task over several argument sets in one worker call (a map chunk); each item
        succeeds (JSON-encoded Outcome) or fails (TaskFailed) on its own; `timeout` covers the chunk.
        A map chunk of a `batch=` task goes to `self.batcher` instead, which sends each batch back here
        with kind=CALL_BATCH: one invocation over all items, one result each (its timeout: the
        executor's task timeout when None, not one per item)."""
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """concurrent.futures: run a picklable module-level function on a worker."""
        raise NotImplementedError

    def call_stream(self, task: str, kwargs: dict[str, Any], options: CallOptions = PLAIN_CALL) -> ItemStream:
        """Run generator task `task` (`TaskSpec.streams`), its items as they are yielded, with flow
        control (a reader that does not read stops the generator a bounded number of items ahead).
        `options.encode_json` is implied (items are JSON); the timeout covers the whole stream.
        Neutral default: StreamingUnsupported (a backend that cannot stream; `call` still returns
        a generator task's items as one list)."""
        raise StreamingUnsupported(task, f"{type(self).__name__} executor")

    async def _open(self) -> None:
        """Get ready to take calls (start the workers, connect to the cluster)."""

    async def _stop(self) -> None:
        """Stop: fail what is queued or running with PoolClosed, let go of workers or the cluster."""

    def _is_quiet(self) -> bool:
        """Nothing queued or running (what a drain waits for)."""
        return True

    def _tick(self) -> None:
        """One periodic step (supervision, deadlines); runs every `tick_interval` seconds."""

    # -- capabilities with neutral defaults --------------------------------------------------------

    @property
    def closing(self) -> bool:
        """True once draining or closed: new calls get PoolClosed."""
        return self._closing

    @property
    def replacing(self) -> int:
        """Workers being replaced right now (a recycle, a timeout kill): while one is, calls still
        wait for it, so the service is still ready."""
        return 0

    @property
    def shm_threshold(self) -> int | None:
        """Binary payloads above this many bytes are worth a `payload_buffer()`; None: never."""
        return None

    async def payload_buffer(self, size: int) -> PayloadBuffer | None:
        """A buffer to read a payload of `size` bytes into and pass as an argument; None: use bytes."""
        return None

    def payload_stats(self) -> dict[str, Any] | None:
        """Counts of the shared-memory payload pool for /metrics (segments, bytes, budget, and
        `payloads` by (direction, path)); None when the executor has none."""
        return None

    def output_stats(self) -> dict[str, Any] | None:
        """Lines of task output relayed to the log and dropped over the rate, by stream
        (`{"logged": {"stdout": n, ...}, "dropped": {...}}`); None when tasks' output is not relayed."""
        return None

    def rows(self) -> list[WorkerRow]:
        """One row per worker (slot, pid, state, task, tasks done, CPU seconds) for /metrics and
        /v1/workers."""
        return []

    async def sample_memory(self, max_age: float = 1.0) -> None:
        """Refresh what `memory()` returns, unless the last sample is younger than `max_age` seconds
        (the local pool reads /proc off the loop; others have nothing to read)."""

    def memory(self) -> dict[int, MemoryUse]:
        """The last memory sample, by pid: each worker's (and the local worker parent's)."""
        return {}

    def cpu_seconds(self) -> dict[int, float]:
        """CPU seconds each process has used (user + system), by pid, read with the last memory
        sample: live in the middle of a task too. Empty when the executor cannot read them."""
        return {}

    @property
    def parent_pid(self) -> int | None:
        """The pid of the process the workers are forked from (the local pool's worker parent)."""
        return None

    def describe_workers(self) -> list[dict[str, Any]] | None:
        """/v1/workers entries with fields of the backend's own; None: built from `rows()`."""
        return None

    def readiness(self) -> dict[str, Any]:
        """Extra fields for /readyz (the Dask executor: scheduler address, reachable, threads)."""
        return {}

    @property
    def start_error(self) -> str | None:
        """Why workers cannot start right now (a hook that raises, a start timeout), in one line;
        None when nothing is wrong. /readyz gives it while no worker is ready."""
        return None

    @property
    def started(self) -> bool:
        """`start()` has finished: every worker was ready once (or the cluster connected)."""
        return self._started.is_set()

    async def wait_started(self) -> None:
        """Return once `start()` has finished (at once if it has)."""
        await self._started.wait()

    # -- the lifecycle, the same for every backend -------------------------------------------------

    async def start(self) -> None:
        """Bind to the running loop and get ready to take calls."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._quiet = asyncio.Event()
        self._quiet.set()
        if self.tick_interval is not None:  # from the start: it also enforces the start timeout
            self._tick_handle = self._loop.call_later(self.tick_interval, self._on_tick)
        await self._open()
        self._started.set()

    async def drain(self, grace: float) -> None:
        """Take no new calls, let the admitted ones finish for up to `grace` seconds, then close
        (calls still running then are stopped and get PoolClosed)."""
        self.batcher.flush()  # calls still gathering into batches go to the workers now...
        await asyncio.sleep(0)  # ...and are admitted (one loop turn) before new calls are refused
        self._closing = True
        if self._quiet is not None and not self._is_quiet():
            self._quiet.clear()
            try:
                await asyncio.wait_for(self._quiet.wait(), grace)
            except TimeoutError:
                log.info("drain: calls still running after the %g s grace are stopped", grace)
        await self.aclose()

    async def aclose(self) -> None:
        """Stop (see `_stop`). Safe to call more than once and from several tasks: all of them wait
        for the one close, and cancelling a caller does not cut the close short."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """concurrent.futures: from the loop's thread this only starts closing; prefer `aclose()`."""
        if self._loop is None or self._closed:
            return
        if threading.get_ident() == self._loop_thread:
            self._shutdown_task = asyncio.ensure_future(self.aclose())  # held so it is not collected
            return
        done = asyncio.run_coroutine_threadsafe(self.aclose(), self._loop)
        if wait:
            done.result()

    async def _close(self) -> None:
        self._closing = self._closed = True
        self.batcher.close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        # Housekeeping first (a respawn, a remote stop), so nothing restarts while the backend stops;
        # again after, for anything `_stop` itself started.
        await self._cancel_background()
        try:
            await self._stop()
        finally:
            await self._cancel_background()
            if self._quiet is not None:
                self._quiet.set()

    async def _cancel_background(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def _on_tick(self) -> None:
        if self._closed or self._loop is None or self.tick_interval is None:
            return
        try:
            self._tick()
        except Exception:
            log.exception("%s: periodic step failed", type(self).__name__)
        if not self._closed:
            self._tick_handle = self._loop.call_later(self.tick_interval, self._on_tick)

    def _run_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run housekeeping in the background: held until done, cancelled at close, failures logged
        with their traceback (never lost)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background step failed", type(self).__name__, exc_info=task.exception())

    def _check_quiet(self) -> None:
        """While draining (the only time anyone waits for it), say so once nothing is queued or
        running. Calls are no longer admitted then, so a quiet executor stays quiet."""
        if self._closing and self._quiet is not None and not self._quiet.is_set() and self._is_quiet():
            self._quiet.set()
