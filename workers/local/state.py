"""What the parts of the local pool share: the options it was built from and its workers' state.

The pool (pool.py), the supervisor (supervisor.py), the broker (broker.py) and the message handlers
(frames.py) each get this one object when they are made, instead of reaching into each other's
attributes. Who writes what:

    options    PoolOptions                     read by every part
    loop       the running loop                set by the pool when it starts
    table      the shared-memory worker table  created and freed by the supervisor; read by the pool
                                               (`rows()`, a cancelled call's running state)
    workers    slot -> WorkerHandle | None     written by the supervisor (a worker started, a death
                                               seen); read by the pool (dispatch) and the broker
    idle       workers parked with nothing     parked by the pool; `unpark` by whoever finds a parked
               to do                           worker must not take calls (dying, retiring, gone)
    replacing  slots whose replacement is      written by the supervisor (also on a worker's
               starting with no back-off       WORKER_READY and RETIRE_NOTICE messages)
    active     slots the pool keeps a worker   written by the scaler (scaling.py: grows, shrinks);
               in (MIN to MAX of them)         read by the supervisor, which starts and restarts
                                               workers in active slots only

`workers` has one slot per worker the pool may have (MAX); a fixed pool's slots are all active.
`workers`, `idle` and `active` are never rebound, only changed in place: the pool's dispatch path
binds them to its own attributes once, so reading them costs no attribute chain per call.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from workers import framing
from workers.executor import ExecutorSettings
from workers.local.handle import WorkerHandle
from workers.stats import WorkerRow, WorkerTable


@dataclass(frozen=True)
class PoolOptions:
    """What a `WorkerPool` is built from (`from_settings`: the service's Config)."""

    workers: int  # the most workers (MAX), one slot each
    modules: tuple[str, ...] = ()
    min_workers: int | None = None  # the fewest (MIN), below `workers`: an elastic pool; None: fixed
    worker_idle: float = 60.0  # seconds a worker goes without work before it stops, while more than MIN run
    max_pending: int = 0  # 0: four per worker
    task_timeout: float = 60.0
    max_tasks_per_worker: int = 0
    max_worker_memory: int = 0  # bytes of RSS: recycle between tasks past it, kill mid-task past twice it
    nice: int = 10
    window: int = 3
    start_timeout: float = 60.0  # the worker parent's preloads, then each worker's start
    cancel_running: bool = False  # stop a running call when its caller goes away
    debug: bool = False
    shm_threshold: int = 256 * 1024  # binary payloads larger than this go through shared memory
    shm_budget: int | None = None  # bytes of /dev/shm for payloads; None: 3/4 of its free space; 0: off
    shm_need: int = 0  # bytes the largest payload in and out takes: less budget than this is warned about

    @property
    def fewest(self) -> int:
        """The workers the pool starts with and never shrinks below (MIN; a fixed pool: `workers`)."""
        return self.workers if self.min_workers is None else self.min_workers

    @classmethod
    def from_settings(cls, settings: ExecutorSettings) -> PoolOptions:
        return cls(
            workers=int(settings.workers),
            modules=settings.tasks,
            min_workers=settings.min_workers,
            worker_idle=settings.worker_idle,
            max_pending=settings.max_pending,
            task_timeout=settings.task_timeout,
            max_tasks_per_worker=settings.max_tasks_per_worker,
            start_timeout=settings.worker_start_timeout,
            max_worker_memory=settings.max_worker_memory,
            nice=settings.worker_nice,
            cancel_running=settings.cancel_running_on_disconnect,
            debug=settings.debug,
            shm_threshold=settings.shm_threshold,
            shm_budget=settings.shm_budget,
            shm_need=2 * settings.max_body,  # one body of the largest size in, one result out
        )


class PoolState:
    """The state the parts of one pool share (see the module's docstring for who writes what)."""

    __slots__ = ("active", "idle", "loop", "options", "replacing", "table", "workers")

    def __init__(self, options: PoolOptions) -> None:
        self.options = options
        self.loop: asyncio.AbstractEventLoop | None = None
        self.table: WorkerTable | None = None
        self.workers: list[WorkerHandle | None] = [None] * options.workers
        self.idle: list[WorkerHandle] = []
        self.replacing: set[int] = set()
        self.active: set[int] = set(range(options.fewest))

    def rows(self) -> list[WorkerRow]:
        """The table's rows of the slots in use: active ones, and any whose worker is still exiting."""
        table = self.table
        if table is None:
            return []
        return [row for row in table.rows() if row.slot in self.active or self.workers[row.slot] is not None]

    def unpark(self, w: WorkerHandle) -> None:
        """Take `w` off the idle list (if it is there): it must not be handed calls any more."""
        if w.idle:
            w.idle = False
            with contextlib.suppress(ValueError):
                self.idle.remove(w)

    def send(self, w: WorkerHandle, message: tuple[Any, ...]) -> None:
        """Send a control frame (GRANT_SEGMENT, FORGET_SEGMENTS) to a worker; calls go out in the pool's
        batched frames."""
        assert self.loop is not None
        w.write(self.loop, *framing.dumps(message))
