"""One call on the client side: its record while it is on the cluster (`DaskCall`), how what
`workers.dask.remote.run` returned becomes its answer (`answer`), and the errors only a Dask call
can end with.

Kept apart from the executor so that the cluster view (`cluster.py`), which lists the calls running
on each worker, and the executor, which owns them, share the record without importing each other.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from workers.errors import ExecutorUnavailable, PoolClosed, PoolError, TaskFailed, TaskTimeout, WorkerCrashed
from workers.executor import Outcome, ProgressCallback
from workers.protocol import (
    RESULT_CHUNK,
    RESULT_ERROR,
    RESULT_JSON,
    RESULT_VALUE,
    RUNNER_CANCELLED,
    RUNNER_CRASHED,
    RUNNER_START_FAILED,
    RUNNER_TIMED_OUT,
)


class DaskUnavailable(ExecutorUnavailable):
    """The cluster cannot run the call: the scheduler is unreachable, or it has had no worker for
    too long. Answered 502 (the upstream failed), never left hanging."""


class DaskWorkerLost(WorkerCrashed):
    """Dask gave up on the task: the workers running it died `allowed-failures` times (which
    processes, the scheduler does not say: no pid)."""

    def __init__(self, detail: str) -> None:
        super().__init__(None, None, detail)


class DaskWorkerStartFailed(WorkerCrashed):
    """The tasks could not start where the call was to run: a `@preload` or `@on_worker_start` hook
    raised in the runner child (isolate=process), or in the Dask worker itself (isolate=thread, a
    worker whose hooks raised in the plugin's setup). The detail names the Dask worker, the hook and
    its exception; `traceback` is the hook's. Answered 502 like a crashed worker; the next call
    tries again."""

    def __init__(self, pid: int | None, exitcode: int | None, detail: str, traceback: str = "") -> None:
        super().__init__(pid, exitcode, detail)
        self.traceback = traceback


@dataclass(eq=False)
class DaskCall:
    """A call admitted by the executor, from admission until its caller has the answer. `started_at`
    and `worker` are set by the worker's start event (None: still queued on the scheduler, or
    queued again after its worker left); `done` is what the caller awaits."""

    id: int
    kind: int  # protocol.CALL_TASK, CALL_MAP or CALL_FUNCTION
    name: str
    timeout: float
    done: asyncio.Future[Any]
    progress: ProgressCallback | None = None
    kill_on_cancel: bool = False
    key: str = ""  # the Dask task's key
    future: Any = None  # distributed.Future, once submitted
    collector: asyncio.Task[None] | None = None
    started_at: float | None = None
    worker: str | None = None  # address of the Dask worker running it
    pid: int = 0
    reports: int = 0  # progress events received
    reports_wanted: int = 0  # progress events the worker says it sent (known once the result is in)
    all_reports: asyncio.Event = field(default_factory=asyncio.Event)
    scattered: list[Any] = field(default_factory=list)  # Dask futures of its scattered arguments

    @property
    def running(self) -> bool:
        """Started on a worker and not answered yet."""
        return self.started_at is not None and not self.done.done()

    def settle(self, value: Any = None, error: BaseException | None = None) -> bool:
        """Give the caller its answer, once: False if it already has one (or stopped waiting)."""
        if self.done.done():
            return False
        if error is not None:
            self.done.set_exception(error)
        else:
            self.done.set_result(value)
        return True


def answer(
    st: DaskCall, status: int, value: Any, pid: int, elapsed: float
) -> Outcome | list[Outcome | TaskFailed] | PoolError:
    """What the caller of `st` gets for a result of `dask_remote.run`: an Outcome (a list of them
    for a map chunk), or the error to raise (the same errors as the local pool's)."""
    if status == RESULT_ERROR:
        return TaskFailed(*value)
    if status == RUNNER_TIMED_OUT:
        return TaskTimeout(st.timeout)
    if status == RUNNER_CRASHED:
        return WorkerCrashed(pid, value)
    if status == RUNNER_CANCELLED:
        return PoolClosed()
    if status == RUNNER_START_FAILED:
        detail, details, exitcode = value
        return DaskWorkerStartFailed(pid or None, exitcode, detail, details)
    if status == RESULT_CHUNK:
        return [
            TaskFailed(*item) if item_status == RESULT_ERROR
            else Outcome(item, pid, item_elapsed, item_status == RESULT_JSON)
            for item_status, item, item_elapsed in value
        ]
    assert status in (RESULT_VALUE, RESULT_JSON)
    return Outcome(value, pid, elapsed, status == RESULT_JSON)


def as_plain(value: Any) -> Any:
    """Bytes-like arguments as bytes: buffers, and handles that can read themselves out (the
    shared-memory body handle of the local path has `tobytes()` or `read()`)."""
    if type(value) is bytes or value is None or isinstance(value, str | int | float | bool | list | dict):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    for method in ("tobytes", "to_bytes", "read_bytes", "read"):
        reader = getattr(value, method, None)
        if callable(reader):
            data = reader()
            if isinstance(data, bytes | bytearray | memoryview):
                return bytes(data)
    return value
