"""The job runner: takes due queued jobs from the store (highest priority first, then arrival order) and
runs them on the executor; retries failed attempts with back-off; logs each run's events.

Delays cost no polling per job: the claim loop sleeps until the earliest `run_at` of any queued job
(`store.next_run_at`, one timer), or until a job is submitted here. A failed attempt (the task raised,
its worker crashed, it timed out, the executor was unreachable) with retries left is queued again at
now + back-off (`--retry-backoff` doubled per retry, at most 5 minutes, each drawn between half and
all of that: jitter spreads a burst of failures); a cancel written first wins, so a cancelled job is
never retried. Arguments the task no longer accepts are not retried (no attempt would differ).

At most `--job-concurrency` jobs run at once, so synchronous calls keep their share of the pool.
Each running job holds a lease in the store (`--job-lease`) that this runner renews; a job whose
runner died (crash, SIGKILL, lost replica) is queued again: on a single-replica SQLite store at once
at the next start, on a shared (Redis) store by whichever replica next looks after its lease ran out
(each looks every few seconds, and at start-up): execution is at-least-once; the interrupted attempt
does not count in `attempts`. Each run's events (status, progress, a generator's items) go into its
log (events.py): to SSE listeners at once, to the store every RENEW_EVERY seconds and before the job
ends; the job's progress field is stored at the same pace (the latest value). A cancelled job's call
is cancelled, which kills the worker running it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from typing import Any, Protocol

import orjson

from service.concurrency import TaskGates
from service.jobs.events import JobEvents
from service.jobs.model import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job
from service.jobs.store.base import JobStore
from service.jobs.webhooks import retry_delay  # one back-off rule for job retries and deliveries
from service.problems import Problem, from_pool_error
from service.validation import TaskCatalog
from workers.errors import ExecutorUnavailable, PoolClosed, PoolError, TaskFailed, TaskTimeout, WorkerCrashed
from workers.executor import CallOptions, Executor, Outcome

log = logging.getLogger("procbridge.jobs")

LEASE_SECONDS = 30.0  # the default of --job-lease
RENEW_EVERY = 0.5  # also how often a runner notices a cancel made on another replica
POLL_EVERY = 1.0  # look for jobs queued by other replicas
RECOVER_EVERY = 5.0  # shared store: look for running jobs whose lease ran out (at most a quarter lease)
EXPIRE_EVERY = 60.0
RETRY_BACKOFF = 1.0  # the default of --retry-backoff
RETRIED = (TaskFailed, WorkerCrashed, TaskTimeout, ExecutorUnavailable)  # a failed attempt; the rest end the job


class Notified(Protocol):
    """What hears that a job with a webhook ended (the webhook sender)."""

    def notify(self) -> None: ...



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
        retry_backoff: float = RETRY_BACKOFF,
        webhooks: Notified | None = None,
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
        self.retry_backoff = retry_backoff
        self.webhooks = webhooks
        self.owner = f"{uuid.uuid4().hex[:12]}"
        self.running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._closed = False  # the loops end on it too: a redis-py call can swallow a task's cancel
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
        self._stopping = self._closed = True
        for task in self._background:
            task.cancel()
        for task in list(self.running.values()):
            task.cancel()
        await asyncio.gather(*self._background, *self.running.values(), return_exceptions=True)
        await self._flush_progress()
        for job_id in list(self.events.logs):  # runs a failed store write left behind
            with contextlib.suppress(Exception):
                await self.events.flush(job_id)

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel in the store (first writer wins), then stop the local call if it runs here."""
        error = Problem(409, "job-cancelled", "the job was cancelled").body()
        job = await self.store.cancel(job_id, error)
        if job is not None and job.status == CANCELLED and job.finished_at is not None:
            task = self.running.get(job_id)
            if task is not None:
                task.cancel()  # its run's log is written and closed as the task ends
            else:
                self.events.wake(job_id)
            self._webhook(job)
        return job

    def _webhook(self, job: Job) -> None:
        if job.webhook is not None and self.webhooks is not None:
            self.webhooks.notify()

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
            sleep = await self._sleep_for()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep)

    async def _sleep_for(self) -> float:
        """Until the earliest queued job is due (one timer for every delayed job), at most a poll period
        (jobs queued by other replicas); while every job slot is taken, a job ending wakes the loop."""
        longest = POLL_EVERY if self.shared_store else 5.0
        if len(self.running) >= self.concurrency or self._stopping:
            return longest
        try:
            due = await self.store.next_run_at()
        except Exception:
            log.exception("could not read when the next job is due")
            return longest
        return longest if due is None else min(longest, max(0.0, due - time.time()))

    def _done(self, job_id: str, _task: object = None) -> None:
        self.running.pop(job_id, None)
        self._wake.set()

    async def _renew_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(RENEW_EVERY)
            await self._flush_progress()
            for job_id in list(self.events.logs):
                try:
                    await self.events.flush(job_id)
                except Exception:  # written at the next flush; live listeners have them meanwhile
                    log.warning("could not store the events of job %s", job_id, exc_info=True)
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
        while not self._closed:
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
        while not self._closed:
            try:
                removed = await self.store.expire(time.time() - self.ttl)
                if removed:
                    log.info("expired %d finished jobs older than %g s", removed, self.ttl)
            except Exception:
                log.exception("could not expire old jobs")
            await asyncio.sleep(min(EXPIRE_EVERY, max(0.5, self.ttl / 4)))

    # -- one job --------------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        """One run of one job, its events logged under run number `job.runs`."""
        self.events.start_run(job.id, job.runs)
        try:
            await self._attempt(job)
        finally:
            with contextlib.suppress(Exception):  # a store error here is logged by the next flush's retry
                await asyncio.shield(self.events.flush(job.id))
            self.events.end_run(job.id)

    async def _attempt(self, job: Job) -> None:
        self.events.emit(job.id, "status", {"status": RUNNING, "attempt": job.attempts})
        try:
            entry = self.catalog.get(job.task)
            kwargs = self.catalog.validate_json(entry, job.args, "args")
        except Problem as problem:
            await self._finish(job, FAILED, error=problem.body())
            return

        def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress = {"done": done, "total": total, "message": message}
            self._progress_pending[job.id] = progress
            self.events.emit(job.id, "progress", progress)

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
            failure = from_pool_error(exc, debug=self.debug).body()
            if isinstance(exc, RETRIED) and job.attempts <= job.retries:
                await self._retry(job, failure)
            else:
                await self._finish(job, FAILED, error=failure)
            return
        if outcome.json:
            await self._finish(job, SUCCEEDED, result=orjson.loads(outcome.value))
        else:
            await self._finish(job, SUCCEEDED, result_bytes=bytes(outcome.value))

    async def _retry(self, job: Job, problem: dict[str, Any]) -> None:
        """Queue the job again after a back-off, unless a cancel came first."""
        run_at = time.time() + retry_delay(job.attempts, self.retry_backoff)
        self._progress_pending.pop(job.id, None)
        self.events.emit(job.id, "status", {"status": QUEUED, "attempt": job.attempts, "retry_at": run_at,
                                             "error": problem})
        await self.events.flush(job.id)
        if await self.store.retry(job.id, self.owner, run_at, problem):
            log.info("job %s: attempt %d of %d failed (%s); retrying in %.2f s", job.id, job.attempts,
                     job.retries + 1, problem.get("title"), run_at - time.time())
            self._wake.set()  # the timer may have to fire sooner

    async def _stream(self, job: Job, kwargs: dict[str, Any], options: CallOptions) -> Outcome:
        """Run a generator task's job: log each item as an `item` event as it comes; the outcome's value
        is the JSON list of them all. A failure mid-stream raises (the attempt fails)."""
        items: list[bytes] = []
        async with contextlib.aclosing(self.executor.call_stream(job.task, kwargs, options)) as stream:
            async for item in stream:
                items.append(item)
                self.events.emit(job.id, "item", {"item": orjson.loads(item)})
            done = stream.outcome
        pid, elapsed = (done.pid, done.elapsed) if done is not None else (0, 0.0)
        return Outcome(b"[" + b",".join(items) + b"]", pid, elapsed, True)

    async def _finish(
        self, job: Job, status: str, *, result: Any = None, result_bytes: bytes | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        """The final state, after the run's events are written (a listener that sees the job final in the
        store finds every event of it there)."""
        last = self._progress_pending.pop(job.id, None)
        if last is not None:  # the final report (often "100%") is stored, not just the last flushed one
            await self.store.set_progress(job.id, last)
        with self.events.writing(job.id) as unwritten:
            ended = await self.store.finish(job.id, status, result=result, result_bytes=result_bytes, error=error,
                                            events=unwritten)
        if ended:
            self._webhook(job)  # else cancelled meanwhile: that state stands

    async def _flush_progress(self) -> None:
        pending, self._progress_pending = self._progress_pending, {}
        for job_id, progress in pending.items():
            try:
                await self.store.set_progress(job_id, progress)
            except Exception:  # progress is advisory: the job goes on, and the next report is stored
                log.warning("could not store the progress of job %s", job_id, exc_info=True)
