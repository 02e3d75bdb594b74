"""`DaskExecutor`: the executor interface (`workers/executor.py`) on a Dask cluster.

This module owns the calls: admission (refused at once while the cluster is unusable, 503 beyond
`max_pending`), submitting each as one Dask task, collecting its answer, the client-side deadlines,
and stopping remote work when a caller goes away or the service closes. The connection and the
scheduler's view of the workers are `cluster.py`'s; what runs on the workers is
`workers/dask/remote.py`. The package docstring (`workers/dask/__init__.py`) draws a call's path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import itertools
import logging
import pickle
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from workers import registry
from workers.dask import remote as dask_remote
from workers.dask.calls import DaskCall, DaskUnavailable, DaskWorkerLost, DaskWorkerStartFailed, answer, as_plain
from workers.dask.cluster import Cluster
from workers.dask.options import DaskOptions
from workers.errors import Overloaded, PoolClosed, PoolError, TaskFailed, TaskTimeout, WorkerCrashed
from workers.executor import PLAIN_CALL, CallOptions, Executor, Outcome
from workers.protocol import CALL_FUNCTION, CALL_MAP, CALL_TASK, RESULT_ERROR
from workers.stats import WorkerRow

log = logging.getLogger("procbridge.dask")


class DaskExecutor(Executor):
    """Runs registered tasks on a Dask cluster. Create, `await start()`, use, `await aclose()`."""

    tick_interval = 0.1  # client-side deadlines are checked this often

    def __init__(self, options: DaskOptions) -> None:
        super().__init__()
        self.options = options
        self.modules = tuple(options.modules)
        self._topic = f"procbridge-{uuid.uuid4().hex}"  # this executor's progress and start events
        self._ids = itertools.count(1)
        self._calls: dict[int, DaskCall] = {}
        self._cluster = Cluster(options, self._topic, self._on_event, self._requeue_orphans, self._run_background)

    # -- lifecycle ------------------------------------------------------------------------------

    async def _open(self) -> None:
        await self._cluster.open()

    async def _stop(self) -> None:
        """Cancel what is still running on the cluster (its callers get PoolClosed), disconnect.
        The cluster itself is not ours: it keeps running."""
        await self._cluster.stop_watching()
        calls = list(self._calls.values())
        for st in calls:
            st.settle(error=PoolClosed())
            if st.collector is not None:
                st.collector.cancel()
        futures = [st.future for st in calls if st.future is not None]
        client = self._cluster.client
        if futures and client is not None:
            try:
                await asyncio.wait_for(client.cancel(futures, reason="procbridge-shutdown"), 5.0)
            except Exception:
                log.warning("could not cancel %d call(s) on the Dask cluster at close", len(futures), exc_info=True)
        await self._cluster.disconnect()

    # -- calling --------------------------------------------------------------------------------

    async def call(self, task: str, kwargs: dict[str, Any], options: CallOptions = PLAIN_CALL) -> Outcome:
        """Run registered task `task` on a Dask worker; same contract as WorkerPool.call (a bytes
        result always comes back as bytes: there is no shared memory here)."""
        if (spec := registry.get(task)) is not None and spec.batch is not None:  # gathered first: batching.py
            return await self.batcher.call(spec, kwargs, options)
        timeout = options.timeout
        st = self._admit(CALL_TASK, task, timeout if timeout is not None else self.options.task_timeout)
        st.progress = options.on_progress
        st.kill_on_cancel = options.kill_on_cancel
        result: Outcome = await self._run(st, kwargs, options.encode_json, options.on_progress is not None)
        return result

    async def call_chunk(
        self, task: str, items: list[dict[str, Any]], timeout: float | None = None, kind: int = CALL_MAP
    ) -> list[Outcome | TaskFailed]:
        """Run a task over several argument sets in one Dask task (a map chunk, or with CALL_BATCH one
        batch of a `batch=` task: Executor.call_chunk)."""
        if kind == CALL_MAP and (spec := registry.get(task)) is not None and spec.batch is not None:
            return await self.batcher.call_chunk(spec, items, timeout)
        per_call = self.options.task_timeout * (max(1, len(items)) if kind == CALL_MAP else 1)
        st = self._admit(kind, task, timeout if timeout is not None else per_call)
        result: list[Outcome | TaskFailed] = await self._run(st, items, True, False)
        return result

    def _admit(self, kind: int, name: str, timeout: float) -> DaskCall:
        if self._closing or self._loop is None:
            raise PoolClosed()
        if not self._cluster.usable:
            raise DaskUnavailable(
                f"the Dask scheduler at {self.options.address} is unreachable ({self._cluster.last_error})"
            )
        if self.pending >= self.max_pending:
            raise Overloaded(self.pending)
        st = DaskCall(next(self._ids), kind, name, timeout, self._loop.create_future())
        st.key = f"procbridge-{name}-{uuid.uuid4().hex}"
        self._calls[st.id] = st
        return st

    async def _run(self, st: DaskCall, payload: Any, encode: bool, want_progress: bool) -> Any:
        client = self._cluster.client
        try:
            if st.kind == CALL_TASK:
                payload = await self._prepare(st, payload)
            spec = (st.id, st.kind, st.name, encode, want_progress, st.timeout, self._topic, self.modules,
                    self.options.isolate)
            st.future = client.submit(dask_remote.run, spec, payload, key=st.key, pure=False)
            st.collector = asyncio.ensure_future(self._collect(st))
            return await st.done
        except asyncio.CancelledError:
            self._abandon(st)
            raise
        finally:
            self._forget(st)

    async def _prepare(self, st: DaskCall, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Binary arguments go as Dask data: a handle on a shared-memory body (or any buffer) is read
        into bytes here, since Dask workers do not share this machine's /dev/shm; large ones are
        scattered to the cluster first and passed as a future."""
        out: dict[str, Any] = {}
        for name, value in kwargs.items():
            value = as_plain(value)
            if type(value) is bytes and len(value) >= self.options.scatter_threshold:
                future = await self._cluster.client.scatter(value, hash=False)
                st.scattered.append(future)
                value = future
            out[name] = value
        return out

    async def _collect(self, st: DaskCall) -> None:
        """Await the Dask future and settle the call from what `dask_remote.run` returned."""
        try:
            status, value, pid, elapsed, reports = await st.future
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we stopped collecting (the caller went away, or close)
            reason = getattr(exc, "reason", "cancelled")
            st.settle(error=DaskUnavailable(
                f"the Dask cluster dropped the task ({reason}): the connection to the scheduler at "
                f"{self.options.address} was lost"
            ))
            return
        except Exception as exc:  # noqa: BLE001 - whatever Dask raised becomes this call's answer
            if type(exc).__name__ == "KilledWorker":
                self._fail(st, DaskWorkerLost(
                    f"the Dask workers running the task died ({exc}); Dask gave up retrying it"
                ))
            else:
                st.settle(error=TaskFailed(type(exc).__name__, f"the Dask task failed: {exc}"))
            return
        st.pid = pid
        if st.worker is not None:
            self._cluster.tasks_done[st.worker] += 1
        if st.progress is not None and st.reports < reports:
            # Progress travels worker -> scheduler -> here, the result worker -> here: let the last
            # reports (often "100%") arrive before the answer, so a job stores its final progress.
            st.reports_wanted = reports
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(st.all_reports.wait(), 1.0)
        result = answer(st, status, value, pid, elapsed)
        if isinstance(result, PoolError):
            self._fail(st, result)
        else:
            st.settle(result)

    def _fail(self, st: DaskCall, error: PoolError) -> None:
        """Answer `st` with `error`, counting the restart it stands for: a runner or worker stopped
        at its deadline (timeout), one that died under the call (crashed), or one whose hook raised
        as it started (start_failed, logged here with the hook's traceback)."""
        if isinstance(error, TaskTimeout):
            self.restarts["timeout"] += 1
        elif isinstance(error, DaskWorkerStartFailed):
            self.restarts["start_failed"] += 1
            log.error("%s\n%s", error, error.traceback.rstrip())
        elif isinstance(error, WorkerCrashed):
            self.restarts["crashed"] += 1
        st.settle(error=error)

    def _abandon(self, st: DaskCall) -> None:
        """The caller stopped waiting: drop the task if it has not started; stop it if it runs and
        the caller asked for that (or the service is told to); otherwise let it finish on Dask."""
        if not st.done.done():
            st.done.cancel()
        if st.collector is not None:
            st.collector.cancel()
        if st.future is None:
            return
        if st.started_at is None or st.kill_on_cancel or self.options.cancel_running:
            self._run_background(self._stop_remote(st, "cancelled"))
        else:
            from distributed import fire_and_forget

            fire_and_forget(st.future)

    async def _stop_remote(self, st: DaskCall, reason: str) -> None:
        """Cancel the Dask task. A runner child notices within ~50 ms and is killed; in thread mode a
        started task's worker process is killed, and its nanny starts a new one (the only way to
        stop Python code running in a thread)."""
        client = self._cluster.client
        if client is None or st.future is None:
            return
        started = st.started_at is not None
        try:
            await asyncio.wait_for(client.cancel([st.future], reason=f"procbridge-{reason}"), 10.0)
            if started and self.options.isolate == "thread" and st.worker:
                log.warning("restarting Dask worker %s to stop %s (%s)", st.worker, st.name, reason)
                try:
                    await asyncio.wait_for(
                        client.run(dask_remote.kill_worker, workers=[st.worker], on_error="ignore"), 5.0
                    )
                except Exception:  # expected: the worker dies before it can answer
                    log.debug("Dask worker %s did not answer its kill", st.worker, exc_info=True)
        except Exception as exc:  # noqa: BLE001 - logged: the client-side answer was already given
            log.warning("could not stop %s on Dask worker %s: %s", st.name, st.worker, exc)
        if started and reason == "cancelled":
            self.restarts["cancelled"] += 1

    def _forget(self, st: DaskCall) -> None:
        self._calls.pop(st.id, None)
        for future in st.scattered:
            try:
                future.release()
            except Exception:  # the cluster frees it with the client at worst
                log.warning("releasing a scattered argument of %s failed", st.name, exc_info=True)
        st.scattered.clear()
        self._check_quiet()

    # -- events and deadlines -------------------------------------------------------------------

    def _on_event(self, event: tuple[float, Any]) -> None:
        """An event from a worker, forwarded by the scheduler: a call started, or reported progress."""
        msg = event[1]
        if not isinstance(msg, dict):
            return
        st = self._calls.get(msg.get("id", -1))
        if st is None or st.done.done():
            return
        kind = msg.get("kind")
        if kind == "start":
            st.started_at = time.monotonic()
            st.worker = msg.get("worker")
            st.pid = int(msg.get("pid") or 0)
        elif kind == "progress" and st.progress is not None:
            st.reports += 1
            try:
                st.progress(msg["done"], msg.get("total"), msg.get("message"))
            except Exception:
                log.exception("a progress callback failed")
            if st.reports_wanted and st.reports >= st.reports_wanted:
                st.all_reports.set()

    def _requeue_orphans(self, workers: dict[str, dict[str, Any]]) -> None:
        """After each look at the scheduler: a call whose worker left waits again, since the scheduler
        holds its task for another worker (Dask's retry); its timeout clock restarts there."""
        for st in self._calls.values():
            if st.worker is not None and st.worker not in workers:
                st.started_at = st.worker = None

    def _tick(self) -> None:
        """Client-side deadlines: a started call past timeout (+ slack in process mode, where the
        worker enforces it first), and calls waiting on a cluster that has no worker or no scheduler."""
        now = time.monotonic()
        slack = 0.0 if self.options.isolate == "thread" else self.options.timeout_slack
        no_cluster = self._cluster.unavailable_longer_than(self.options.unavailable_grace, now)
        for st in list(self._calls.values()):
            if st.done.done() or st.future is None:
                continue
            if st.started_at is not None and now - st.started_at > st.timeout + slack:
                self._fail(st, TaskTimeout(st.timeout))
                self._run_background(self._stop_remote(st, "timeout"))
            elif no_cluster and (st.started_at is None or not self._cluster.reachable):
                st.settle(error=DaskUnavailable(
                    f"the Dask cluster at {self.options.address} has had no usable worker for "
                    f"{self.options.unavailable_grace:g} s ({self._cluster.last_error})"
                ))
                self._run_background(self._stop_remote(st, "unavailable"))

    # -- introspection --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Worker threads in the cluster (parallel lanes); at least 1."""
        return self._cluster.size

    @property
    def max_pending(self) -> int:
        return max(self.options.max_pending, 4 * self.size)

    @property
    def pending(self) -> int:
        """Calls submitted to the cluster that have not started on a worker yet."""
        return sum(1 for st in self._calls.values() if st.started_at is None and not st.done.done())

    @property
    def alive(self) -> int:
        """Dask workers while the scheduler answers; 0 when it does not."""
        return self._cluster.alive

    def _is_quiet(self) -> bool:
        return not self._calls

    def readiness(self) -> dict[str, Any]:
        return self._cluster.readiness()

    def rows(self) -> list[WorkerRow]:
        return self._cluster.rows(self._calls.values())

    def describe_workers(self) -> list[dict[str, Any]]:
        return self._cluster.describe_workers(self._calls.values())

    # -- concurrent.futures.Executor ------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Run a picklable module-level function on a Dask worker (in the worker's thread: no
        timeout, no isolation). The future gets its value, or TaskFailed / PoolClosed / Overloaded."""
        future: cf.Future[Any] = cf.Future()
        if self._loop is None:
            raise RuntimeError("start() the executor before submitting work")
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        try:
            blob = pickle.dumps((fn, args, kwargs), protocol=5)
        except Exception as exc:  # noqa: BLE001 - this call fails, nothing else
            future.set_exception(TaskFailed(type(exc).__name__, f"the call cannot be sent to a worker: {exc}"))
            return future

        def begin() -> None:
            if not future.set_running_or_notify_cancel():
                return
            task = asyncio.ensure_future(self._run_function(blob))

            def done(t: asyncio.Task[Any]) -> None:
                if t.cancelled():
                    future.set_exception(PoolClosed())
                elif t.exception() is not None:
                    future.set_exception(t.exception())
                else:
                    future.set_result(t.result())

            task.add_done_callback(done)

        if threading.get_ident() == self._loop_thread:
            begin()
        else:
            self._loop.call_soon_threadsafe(begin)
        return future

    async def _run_function(self, blob: bytes) -> Any:
        st = self._admit(CALL_FUNCTION, "function", self.options.task_timeout)
        try:
            st.future = self._cluster.client.submit(dask_remote.run_function, blob, key=st.key, pure=False)
            status, value, _pid, _elapsed = await st.future
        finally:
            self._forget(st)
        if status == RESULT_ERROR:
            raise TaskFailed(*value)
        return value
