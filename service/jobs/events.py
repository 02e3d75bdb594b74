"""Job events: each run's log, kept in memory while the run is here and written to the store behind it,
and the wake-ups of server-sent-event listeners.

Every event a job's stream shows has an id (model.EventId, `run-seq`): the runner that claimed run R
numbers that run's events R-1, R-2, … (`status: running` first), so ids only grow, even across a crash:
the next claim is run R+1. The two events that end a stream come from the final job itself, not from a
log: `end-1` (the final status) and `end-2` (the result or error). A listener that reconnects with
`Last-Event-ID` gets exactly the events after that id (`read`): no repeat, no gap, for as long as the
job is kept.

Where the events are: a run in progress on this replica has all of its events in its `RunLog` (the
items of a generator are held for its result anyway); the runner writes them to the store every
RENEW_EVERY seconds and before the job's final state, so the store has every earlier run and every
finished job's. A progress event not yet written is replaced by the next one (progress says where the
job is now, so only the latest is kept), which bounds the log of a task that reports progress in a
tight loop; items and status events are never dropped.

Listeners do not get events pushed into queues (a slow one could only be cut or fall behind): they
are woken, and read from their last id, so a slow listener simply reads more at once.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from service.jobs.model import SUCCEEDED, EventId, Job, LoggedEvent
from service.jobs.store.base import JobStore

END_STATUS, END_RESULT = "end-1", "end-2"  # the ids of the two events that end a stream
QUEUED_ID = EventId(0, 0)  # `status: queued` of a job no runner has claimed yet (run 0 logs nothing)


@dataclass
class RunLog:
    """One run's events, in id order, while it runs on this replica; `flushed` of them are in the store."""

    job_id: str
    run: int
    events: list[LoggedEvent] = field(default_factory=list)
    flushed: int = 0  # events[:flushed] are in the store, or being written to it now

    def add(self, event: str, data: dict[str, Any]) -> None:
        last = self.events[-1] if self.events else None
        seq = last.id.seq + 1 if last is not None else 1
        entry = LoggedEvent(EventId(self.run, seq), event, orjson.dumps(data))
        if event == "progress" and last is not None and last.event == "progress" and len(self.events) > self.flushed:
            self.events[-1] = entry  # the unwritten progress it supersedes goes
        else:
            self.events.append(entry)

    def after(self, after: EventId | None) -> list[LoggedEvent]:
        if after is None:
            return list(self.events)
        start = bisect.bisect_right([e.id for e in self.events], after)
        return self.events[start:]

    def unflushed(self) -> list[LoggedEvent]:
        return self.events[self.flushed :]


def final_events(job: Job) -> list[tuple[str, str, bytes]]:
    """The two events that end a finished job's stream, from the job as stored."""
    status = orjson.dumps({"status": job.status})
    if job.status == SUCCEEDED:
        data: dict[str, Any] = {"id": job.id, "status": job.status}
        if job.result_bytes is not None:
            data.update(result=None, result_url=f"/v1/jobs/{job.id}/result", result_size=len(job.result_bytes))
        else:
            data["result"] = job.result
        return [(END_STATUS, "status", status), (END_RESULT, "result", orjson.dumps(data))]
    return [(END_STATUS, "status", status), (END_RESULT, "error", orjson.dumps(job.error or {"status": job.status}))]


@dataclass
class Batch:
    """What a listener reads at once: logged events after its id, then, once the job has ended, the
    final events (`final`); `gone`: the job is not in the store (expired)."""

    events: list[LoggedEvent]
    final: list[tuple[str, str, bytes]] | None = None
    gone: bool = False


class JobEvents:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.logs: dict[str, RunLog] = {}
        self._listeners: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    # -- the runner's side --------------------------------------------------------------------------

    def start_run(self, job_id: str, run: int) -> RunLog:
        log = self.logs[job_id] = RunLog(job_id, run)
        return log

    def emit(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        log = self.logs.get(job_id)
        if log is not None:
            log.add(event, data)
            self.wake(job_id)

    async def flush(self, job_id: str) -> None:
        """Write the run's events not yet in the store (the runner calls it every RENEW_EVERY and before a
        job leaves the run: final, queued for a retry, or stopped by a shutdown)."""
        with self.writing(job_id) as pending:
            if pending:
                await self.store.append_events(job_id, pending)

    @contextlib.contextmanager
    def writing(self, job_id: str) -> Iterator[list[LoggedEvent]]:
        """The run's events not yet in the store, for the store call that writes them (alone, or with the
        final state in one write): counted as written from the block's start (a progress event added
        meanwhile is then appended, not put in place of one being written), and not if the block raises."""
        log = self.logs.get(job_id)
        if log is None:
            yield []
            return
        start, pending = log.flushed, log.unflushed()
        log.flushed = len(log.events)
        try:
            yield pending
        except BaseException:
            log.flushed = min(log.flushed, start)
            raise

    def end_run(self, job_id: str) -> None:
        """The run left this replica (ended, queued again, or stopped by a shutdown), its log written:
        listeners read the store from now on."""
        self.logs.pop(job_id, None)
        self.wake(job_id)

    # -- listeners ----------------------------------------------------------------------------------

    def wake(self, job_id: str) -> None:
        for event in self._listeners.get(job_id, ()):
            event.set()

    @contextlib.contextmanager
    def listen(self, job_id: str) -> Iterator[asyncio.Event]:
        woken = asyncio.Event()
        self._listeners[job_id].add(woken)
        try:
            yield woken
        finally:
            listeners = self._listeners.get(job_id)
            if listeners is not None:
                listeners.discard(woken)
                if not listeners:
                    del self._listeners[job_id]

    def listening(self, job_id: str) -> bool:
        return bool(self._listeners.get(job_id))

    async def read(self, job_id: str, after: EventId | None) -> Batch:
        """The events after `after`: from the run's log when it runs here and `after` is within it (no
        store read), else from the store (the job first, then its log: a job the store shows final had
        every event written before it ended) and the local run's log."""
        log = self.logs.get(job_id)
        if log is not None and after is not None and after.run >= log.run:
            return Batch(log.after(after))
        job = await self.store.get(job_id)
        if job is None:
            return Batch([], gone=True)
        stored = await self.store.events(job_id, after)
        log = self.logs.get(job_id)
        if log is not None:  # the run here has all of its events; the store may have only some
            return Batch([e for e in stored if e.id.run < log.run] + log.after(after))
        return Batch(stored, final_events(job) if job.final else None)
