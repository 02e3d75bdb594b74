"""The job store interface: the durable half of jobs. SQLite (default) and Redis implement it.

Every method is a coroutine and never blocks the loop. Semantics every implementation must keep
(tests/service/test_store.py runs one suite against each):

- `create` is durable when it returns (a 202 promises the job survives a crash). With an idempotency
  key, a second `create` returns the first job and `created=False`, atomically.
- `claim` takes the oldest queued job (arrival order), marks it running for `owner` with a lease,
  increments `attempts`, sets `started_at`; two concurrent claimers never get the same job.
- `renew` extends the leases of the owner's running jobs; `recover` puts running jobs whose lease
  expired (or, with `owner_gone`, every running job not owned by a live runner) back to queued.
- `finish` moves a job to a final state only if it is not final already (first writer wins) and
  returns whether it did. `cancel` does the same for cancellation and returns the job as it is after.
- `expire` deletes final jobs finished before a time; `list` is newest first.
"""

from __future__ import annotations

import abc
import builtins
import json
from typing import Any, ClassVar

import orjson

from service.jobs.model import Job


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
    async def list(self, status: str | None = None, limit: int = 100) -> builtins.list[Job]:
        """Newest first, optionally only one status."""

    @abc.abstractmethod
    async def claim(self, owner: str, lease_seconds: float) -> Job | None:
        """The oldest queued job, now running for `owner`; None if nothing is queued."""

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
    ) -> bool:
        """Final state (succeeded/failed/cancelled) unless already final; True if this call set it."""

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
