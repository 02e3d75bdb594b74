"""The executor interface: the one seam between the service (`service/`) and whatever runs tasks.

The service never touches a process, a pipe or a cluster; it only uses what is written down here.
Two implementations exist: `workers.pool.WorkerPool` (the local supervised pool, the default) and
`workers.dask_executor.DaskExecutor` (`--executor dask://HOST:PORT`). Both are also
`concurrent.futures.Executor`s, so `loop.run_in_executor(executor, fn, *args)` works with either.

Errors a call can raise (all from `workers.errors`, all mapped to one HTTP answer by
`service.problems.from_pool_error`): TaskFailed (500), WorkerCrashed (502), Overloaded (503),
PoolClosed (503 draining), TaskTimeout (504).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from workers.errors import TaskFailed

if TYPE_CHECKING:
    from workers.calls import Outcome
    from workers.stats import WorkerRow

ProgressCallback = Callable[[float, float | None, str | None], None]


@runtime_checkable
class Executor(Protocol):
    """What `service/` needs from an executor (duck-typed: neither implementation inherits it)."""

    @property
    def size(self) -> int:
        """Parallel lanes: worker processes (local) or worker threads of the Dask cluster."""
        ...

    @property
    def max_pending(self) -> int:
        """Calls admitted and waiting beyond which the HTTP layer answers 503 `overloaded`."""
        ...

    @property
    def restarts(self) -> Counter[str]:
        """Restarts of workers, by reason (crashed, timeout, cancelled, max_tasks, max_memory, ...)."""
        ...

    async def start(self) -> None:
        """Get ready to take calls (start the workers, or connect to the cluster)."""

    async def aclose(self) -> None:
        """Stop: calls still running are stopped and get PoolClosed. Idempotent."""

    async def drain(self, grace: float) -> None:
        """Refuse new calls, let admitted ones finish for up to `grace` seconds, then `aclose()`."""

    async def call(
        self,
        task: str,
        kwargs: dict[str, Any],
        *,
        timeout: float | None = None,
        encode_json: bool = False,
        on_progress: ProgressCallback | None = None,
        kill_on_cancel: bool = False,
    ) -> Outcome:
        """Run registered task `task` with `kwargs`; with `encode_json` the Outcome's value is the
        result already encoded as JSON bytes (bytes results stay bytes). `on_progress` is called on
        the loop with the task's `progress()` reports. Cancelling the awaiting coroutine drops a call
        not started yet, and stops a running one when `kill_on_cancel` is set."""
        ...

    async def call_chunk(
        self, task: str, items: list[dict[str, Any]], *, timeout: float | None = None
    ) -> list[Outcome | TaskFailed]:
        """Run a task over several argument sets in one worker call (a map chunk); each item
        succeeds (JSON-encoded Outcome) or fails (TaskFailed) on its own."""
        ...

    @property
    def pending(self) -> int:
        """Calls admitted and not yet running."""
        ...

    @property
    def alive(self) -> int:
        """Workers able to take a call now (0 makes /readyz answer 503)."""
        ...

    @property
    def closing(self) -> bool:
        """True once draining or closed: new calls get PoolClosed."""
        ...

    def rows(self) -> list[WorkerRow]:
        """One row per worker (slot, pid, state, task, tasks done, CPU seconds) for /v1/workers
        and /metrics."""
        ...

    # concurrent.futures.Executor
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]: ...

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...


class LoopBoundExecutor(cf.Executor):
    """The Executor API's `shutdown` for executors bound to one event loop (both implementations).

    Subclasses set `_loop`, `_loop_thread` and `_closed` and implement `aclose()`.
    """

    _loop: asyncio.AbstractEventLoop | None
    _loop_thread: int
    _closed: bool
    _shutdown_task: asyncio.Future[None] | None = None

    async def aclose(self) -> None:
        raise NotImplementedError

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """From the loop's thread this only starts closing; prefer `await aclose()`."""
        if self._loop is None or self._closed:
            return
        if threading.get_ident() == self._loop_thread:
            self._shutdown_task = asyncio.ensure_future(self.aclose())  # held so it is not collected
            return
        done = asyncio.run_coroutine_threadsafe(self.aclose(), self._loop)
        if wait:
            done.result()
