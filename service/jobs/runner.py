"""The job runner: takes queued jobs from the store in arrival order and runs them on the executor.

At most `--job-concurrency` jobs run at once, so synchronous calls keep their share of the pool.
Each running job holds a lease in the store (`--job-lease`) that this runner renews; a job whose
runner died (crash, SIGKILL, lost replica) is queued again: on a single-replica SQLite store at once
at the next start, on a shared (Redis) store by whichever replica next looks after its lease ran out
(each looks every few seconds, and at start-up): execution is at-least-once. Progress goes to SSE
listeners at once and to the store at most every RENEW_EVERY seconds (the latest value). A
cancelled job's call is cancelled, which kills the worker running it. A generator task's job
publishes each item as an `item` event as it is yielded (to listeners only: the items are in the
result, the list of them all, once the job succeeds).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from typing import Any

import orjson

from service.concurrency import TaskGates
from service.jobs.events import JobEvents
from service.jobs.model import CANCELLED, FAILED, RUNNING, SUCCEEDED, Job
from service.jobs.store.base import JobStore
from service.problems import Problem, from_pool_error
from service.validation import TaskCatalog
from workers.errors import PoolClosed, PoolError
from workers.executor import CallOptions, Executor, Outcome

log = logging.getLogger("procbridge.jobs")

LEASE_SECONDS = 30.0  # the default of --job-lease
RENEW_EVERY = 0.5  # also how often a runner notices a cancel made on another replica
POLL_EVERY = 1.0  # look for jobs queued by other replicas
RECOVER_EVERY = 5.0  # shared store: look for running jobs whose lease ran out (at most a quarter lease)
EXPIRE_EVERY = 60.0


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        executor: Executor,
        catalog: TaskCatalog,
        events: JobEvents,
        *,
        concurrency: int,
        ttl: float,
        shared_store: bool,
        lease: float = LEASE_SECONDS,
        debug: bool = False,
        gates: TaskGates | None = None,
    ) -> None:
        self.store = store
        self.executor = executor
        self.catalog = catalog
        self.events = events
        self.concurrency = max(1, concurrency)
        self.ttl = ttl
        self.shared_store = shared_store
        self.lease = lease
        self.debug = debug
        self.gates = gates if gates is not None else TaskGates((), lambda: executor)  # @task(concurrency=N)
        self.owner = f"{uuid.uuid4().hex[:12]}"
        self.running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._background: list[asyncio.Task[None]] = []
        self._progress_pending: dict[str, dict[str, Any]] = {}

    async def start(self) -> None:
        recovered = await self.store.recover(owner_gone=not self.shared_store)
        if recovered:
            log.warning("%d jobs were running when the service last stopped; they are queued again", recovered)
        self._background = [
            asyncio.ensure_future(self._claim_loop()),
            asyncio.ensure_future(self._renew_loop()),
            asyncio.ensure_future(self._expire_loop()),
        ]
        if self.shared_store:
            self._background.append(asyncio.ensure_future(self._recover_loop()))

    def notify(self) -> None:
        """A job was queued here: look for work now instead of at the next poll."""
        self._wake.set()

    def stop_claiming(self) -> None:
        """Draining: take no more jobs; queued ones stay in the store for the next start."""
        self._stopping = True
        self._wake.set()

    async def close(self) -> None:
        self._stopping = True
        for task in self._background:
            task.cancel()
        for task in list(self.running.values()):
            task.cancel()
        await asyncio.gather(*self._background, *self.running.values(), return_exceptions=True)
        await self._flush_progress()

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel in the store (first writer wins), then stop the local call if it runs here."""
        error = Problem(409, "job-cancelled", "the job was cancelled").body()
        job = await self.store.cancel(job_id, error)
        task = self.running.get(job_id)
        if task is not None and job is not None and job.status == CANCELLED:
            task.cancel()
        if job is not None and job.status == CANCELLED:
            self.events.publish(job_id, "status", {"status": CANCELLED})
            self.events.publish(job_id, "error", job.error or error)
        return job

    # -- loops ----------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        await self.executor.wait_started()  # jobs wait in the store while the workers start
        while not self._stopping:
            while len(self.running) < self.concurrency and not self._stopping:
                try:
                    job = await self.store.claim(self.owner, self.lease)
                except Exception:
                    log.exception("could not claim a job; retrying")
                    break
                if job is None:
                    break
                self.running[job.id] = asyncio.ensure_future(self._run(job))
                self.running[job.id].add_done_callback(functools.partial(self._done, job.id))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_EVERY if self.shared_store else 5.0)

    def _done(self, job_id: str, _task: object = None) -> None:
        self.running.pop(job_id, None)
        self._wake.set()

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            await self._flush_progress()
            ids = list(self.running)
            if not ids:
                continue
            try:
                await self.store.renew(self.owner, ids, self.lease)
                if self.shared_store:  # a cancel made on another replica: stop the call here
                    for job_id in ids:
                        job = await self.store.get(job_id)
                        if job is not None and job.status == CANCELLED and job_id in self.running:
                            self.running[job_id].cancel()
            except Exception:
                log.exception("could not renew job leases")

    async def _recover_loop(self) -> None:
        """Shared store: the jobs of a replica that died (or of this one before a restart, whose
        leases had not run out at start-up) are queued again once their leases run out."""
        while True:
            await asyncio.sleep(min(RECOVER_EVERY, self.lease / 4))
            try:
                recovered = await self.store.recover()
            except Exception:
                log.exception("could not look for jobs whose lease ran out")
                continue
            if recovered:
                log.warning("%d running jobs lost their runner (lease ran out); they are queued again", recovered)
                self._wake.set()

    async def _expire_loop(self) -> None:
        while True:
            try:
                removed = await self.store.expire(time.time() - self.ttl)
                if removed:
                    log.info("expired %d finished jobs older than %g s", removed, self.ttl)
            except Exception:
                log.exception("could not expire old jobs")
            await asyncio.sleep(min(EXPIRE_EVERY, max(0.5, self.ttl / 4)))

    # -- one job --------------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        self.events.publish(job.id, "status", {"status": RUNNING})
        try:
            entry = self.catalog.get(job.task)
            kwargs = self.catalog.validate_json(entry, job.args, "args")
        except Problem as problem:
            await self._finish(job, FAILED, error=problem.body())
            return

        def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress = {"done": done, "total": total, "message": message}
            self._progress_pending[job.id] = progress
            self.events.publish(job.id, "progress", progress)

        timeout = job.timeout  # the task's own timeout holds even for a job stored without it
        if entry.spec.timeout is not None and (timeout is None or timeout > entry.spec.timeout):
            timeout = entry.spec.timeout
        options = CallOptions(timeout=timeout, encode_json=True, on_progress=on_progress, kill_on_cancel=True)
        try:  # a job is never refused at its task's gate: it waits in its --job-concurrency place
            if entry.spec.streams:  # a generator: each item an `item` event, the result their list
                outcome = await self.gates.run(job.task, lambda: self._stream(job, kwargs, options), bounded=False)
            else:
                outcome = await self.gates.run(
                    job.task, lambda: self.executor.call(job.task, kwargs, options), bounded=False
                )
        except asyncio.CancelledError:
            if not self._stopping:
                return  # cancelled through the API: the store already says so
            raise
        except PoolClosed:
            log.info("job %s interrupted by shutdown; it will run again at the next start", job.id)
            return
        except PoolError as exc:
            await self._finish(job, FAILED, error=from_pool_error(exc, debug=self.debug).body())
            return
        if outcome.json:
            await self._finish(job, SUCCEEDED, result=orjson.loads(outcome.value))
        else:
            await self._finish(job, SUCCEEDED, result_bytes=bytes(outcome.value))

    async def _stream(self, job: Job, kwargs: dict[str, Any], options: CallOptions) -> Outcome:
        """Run a generator task's job: publish each item as an `item` event as it comes; the
        outcome's value is the JSON list of them all. A failure mid-stream raises (the job fails)."""
        items: list[bytes] = []
        async with contextlib.aclosing(self.executor.call_stream(job.task, kwargs, options)) as stream:
            async for item in stream:
                items.append(item)
                if self.events.listening(job.id):
                    self.events.publish(job.id, "item", {"item": orjson.loads(item)})
            done = stream.outcome
        pid, elapsed = (done.pid, done.elapsed) if done is not None else (0, 0.0)
        return Outcome(b"[" + b",".join(items) + b"]", pid, elapsed, True)

    async def _finish(
        self, job: Job, status: str, *, result: Any = None, result_bytes: bytes | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        last = self._progress_pending.pop(job.id, None)
        if last is not None:  # the final report (often "100%") is stored, not just the last flushed one
            await self.store.set_progress(job.id, last)
        if not await self.store.finish(job.id, status, result=result, result_bytes=result_bytes, error=error):
            return  # cancelled meanwhile: that state stands
        self.events.publish(job.id, "status", {"status": status})
        if status == SUCCEEDED:
            data: dict[str, Any] = {"id": job.id, "status": status}
            if result_bytes is not None:
                data.update(result=None, result_url=f"/v1/jobs/{job.id}/result", result_size=len(result_bytes))
            else:
                data["result"] = result
            self.events.publish(job.id, "result", data)
        else:
            self.events.publish(job.id, "error", error or {})

    async def _flush_progress(self) -> None:
        pending, self._progress_pending = self._progress_pending, {}
        for job_id, progress in pending.items():
            try:
                await self.store.set_progress(job_id, progress)
            except Exception:  # progress is advisory: the job goes on, and the next report is stored
                log.warning("could not store the progress of job %s", job_id, exc_info=True)
