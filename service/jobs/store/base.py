"""The job store interface: the durable half of jobs. SQLite (default) and Redis implement it.

Every method is a coroutine and never blocks the loop. Semantics every implementation must keep
(tests/service/test_store.py runs one suite against each):

- `create` is durable when it returns (a 202 promises the job survives a crash). With an idempotency
  key, a second `create` returns the first job and `created=False`, atomically. A job stored with
  `run_at` None gets `run_at = created_at`.
- `claim` takes, among queued jobs whose `run_at` has come, the one with the highest `priority`, then the
  oldest (`created_at`, then `id`); marks it running for `owner` with a lease, increments `attempts` and
  `runs`, sets `started_at`; two concurrent claimers never get the same job. `next_run_at` is the
  earliest `run_at` of any queued job (the runner's one timer), None when nothing is queued.
- `retry` puts the owner's running job back to queued with a new `run_at` and its `last_error` (the
  progress cleared); it does nothing (False) when the job is no longer running for that owner (a cancel
  won), so a cancelled job is never retried.
- `renew` extends the leases of the owner's running jobs; `recover` puts running jobs whose lease
  expired (or, with `owner_gone`, every running job not owned by a live runner) back to queued, their
  `run_at` now and their `attempts` one less (the interrupted attempt was the service's, not the task's).
  With `owner_gone` it also makes every pending webhook due now (a delivery lease of the dead process).
- `finish` moves a job to a final state only if it is not final already (first writer wins) and
  returns whether it did. `cancel` does the same for cancellation and returns the job as it is after.
  Both set `webhook_state = pending`, `webhook_next_at = finished_at` when the job has a webhook, in the
  same write, so a delivery is never lost between the two; `finish` with `failed` also sets `last_error`.
- `expire` deletes final jobs finished before a time (with their event logs), except those whose webhook
  is still pending.
- `list` is newest first (`created_at`, then `id`, both descending), filtered by task and status, strictly
  after a cursor (`before`: the (created_at, id) of the last job of the previous page), so pages stay
  correct while jobs are added: a new job sorts before every page already served.
- `append_events` adds events to a job's log (ids increase: only the runner that claimed a run writes its
  events); `events` returns those after an id, in id order. The log goes when the job is expired.
- `claim_webhooks` returns up to `limit` final jobs whose webhook is pending and due, and moves their
  `webhook_next_at` to `lease_until` (so no other sender takes them meanwhile); `webhook_attempted`
  records one delivery attempt: `delivered`, or failed with `error` and, when retries are left,
  `next_at` (None: given up, state failed). `next_webhook_at` is the earliest pending `webhook_next_at`.
"""

from __future__ import annotations

import abc
import builtins
import json
from collections.abc import Sequence
from typing import Any, ClassVar

import orjson

from service.jobs.model import EventId, Job, LoggedEvent


class StoreUnavailable(RuntimeError):
    """The store cannot be opened (Redis unreachable or refusing us): the service does not start,
    and says so in one line naming --store (service/server.py logs RuntimeErrors that way, exit 1)."""


class JobStore(abc.ABC):
    shared: ClassVar[bool] = False
    """Whether several replicas may share this store: the runner then looks for jobs queued, cancelled
    or orphaned by other replicas, and at start-up requeues only the running jobs whose lease ran out."""

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def create(self, job: Job) -> tuple[Job, bool]:
        """Store a new queued job; with `job.idempotency_key` already used, return (first job, False)."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    async def list(
        self,
        status: str | None = None,
        limit: int = 100,
        *,
        task: str | None = None,
        before: tuple[float, str] | None = None,
    ) -> builtins.list[Job]:
        """Newest first, optionally only one status and one task, only jobs sorting after `before`."""

    @abc.abstractmethod
    async def claim(self, owner: str, lease_seconds: float) -> Job | None:
        """The due queued job of highest priority, oldest first among equals, now running for `owner`;
        None if no queued job is due."""

    @abc.abstractmethod
    async def next_run_at(self) -> float | None:
        """The earliest `run_at` among queued jobs (it may be past: a job is due); None if none is queued."""

    @abc.abstractmethod
    async def retry(self, job_id: str, owner: str, run_at: float, error: dict[str, Any]) -> bool:
        """Queue the owner's running job again at `run_at` with `last_error = error`; False if it is not
        running for `owner` any more (cancelled, finished, recovered by another runner)."""

    @abc.abstractmethod
    async def renew(self, owner: str, job_ids: builtins.list[str], lease_seconds: float) -> None: ...

    @abc.abstractmethod
    async def set_progress(self, job_id: str, progress: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def finish(
        self,
        job_id: str,
        status: str,
        *,
        result: Any = None,
        result_bytes: bytes | None = None,
        error: dict[str, Any] | None = None,
        events: Sequence[LoggedEvent] = (),
    ) -> bool:
        """Final state (succeeded/failed/cancelled) unless already final; True if this call set it.
        `events`, the end of the run's log, are logged first (in the same write where the store can)."""

    @abc.abstractmethod
    async def cancel(self, job_id: str, error: dict[str, Any]) -> Job | None:
        """Cancel a queued or running job (None if no such job); a final job is returned unchanged."""

    @abc.abstractmethod
    async def recover(self, *, owner_gone: bool = False) -> int:
        """Running jobs whose lease expired (all running ones with owner_gone) go back to queued."""

    @abc.abstractmethod
    async def expire(self, finished_before: float) -> int:
        """Delete final jobs that finished before this time; return how many."""

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """Jobs by status (for metrics)."""

    # -- the event log (SSE ids and Last-Event-ID resume) ------------------------------------------

    @abc.abstractmethod
    async def append_events(self, job_id: str, events: builtins.list[LoggedEvent]) -> None:
        """Add events (ids increasing, each above every id already logged for the job)."""

    @abc.abstractmethod
    async def events(self, job_id: str, after: EventId | None = None) -> builtins.list[LoggedEvent]:
        """The job's logged events with ids above `after` (all with None), in id order."""

    # -- webhook deliveries ------------------------------------------------------------------------

    @abc.abstractmethod
    async def claim_webhooks(self, now: float, lease_until: float, limit: int) -> builtins.list[Job]:
        """Final jobs whose webhook is pending with `webhook_next_at <= now` (earliest first, at most
        `limit`); their `webhook_next_at` is set to `lease_until` in the same write."""

    @abc.abstractmethod
    async def webhook_attempted(
        self, job_id: str, *, delivered: bool, next_at: float | None = None, error: str | None = None
    ) -> None:
        """One delivery attempt done: `webhook_attempts` + 1; delivered, or failed with `error`: pending
        again at `next_at`, or (next_at None) given up for good."""

    @abc.abstractmethod
    async def next_webhook_at(self) -> float | None:
        """The earliest `webhook_next_at` of a pending webhook; None if none is pending."""


def dumps_json(value: Any) -> bytes:
    """JSON for a stored field: orjson, or the standard library for what orjson refuses (ints beyond 64 bits,
    non-str keys). Such text starts with a space (still valid JSON) so `loads_json` reads it back with the
    standard library too: orjson would turn big ints into floats."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return b" " + json.dumps(value, separators=(",", ":")).encode()


def loads_json(data: bytes | str) -> Any:
    if data[:1] in (b" ", " "):
        return json.loads(data)
    return orjson.loads(data)
