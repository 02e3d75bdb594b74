"""The job record: what is stored, what GET /v1/jobs/{id} shows, and the rules of its life cycle.

queued -> running -> succeeded | failed | cancelled; queued -> cancelled; running -> queued again when
an attempt failed and retries are left (`run_at` = now + back-off), or when its runner is gone (crash
recovery: at-least-once execution; that attempt does not count in `attempts`).

Order of claiming: among queued jobs whose `run_at` has come, the highest `priority` first, then arrival
order (`created_at`, then `id`). `created_at` is strictly increasing within one process (`new_job_times`),
so two jobs submitted one after the other keep their order even within one clock tick.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

# webhook_state: None (no webhook), or one of these once the job is final
WEBHOOK_PENDING, WEBHOOK_DELIVERED, WEBHOOK_FAILED = "pending", "delivered", "failed"

PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1  # exact as a Redis score (a double) and a SQLite INTEGER

_clock_lock = threading.Lock()
_last_created = 0.0


def new_created_at() -> float:
    """time.time(), but strictly greater than the last value this process handed out (one microsecond
    at least), so arrival order is total among the jobs one replica creates."""
    global _last_created
    with _clock_lock:
        now = max(time.time(), _last_created + 1e-6)
        _last_created = now
        return now


def new_job_id(created_at: float | None = None) -> str:
    """Sortable by creation time (a millisecond prefix) and unguessable (random suffix)."""
    at = time.time() if created_at is None else created_at
    return f"{int(at * 1000):012x}{uuid.uuid4().hex[:20]}"


@dataclass
class Job:
    id: str
    task: str
    args: dict[str, Any]
    timeout: float | None = None
    status: str = QUEUED
    created_at: float = field(default_factory=new_created_at)
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict[str, Any] | None = None  # {"done", "total", "message"}
    result: Any = None  # JSON-able value of a succeeded job (None when the result is binary)
    result_bytes: bytes | None = None  # a binary result, served raw by GET /v1/jobs/{id}/result
    error: dict[str, Any] | None = None  # a problem object for failed (and cancelled) jobs
    idempotency_key: str | None = None
    attempts: int = 0  # attempts the task made (claims, less those a crash of the service interrupted)
    owner: str | None = None  # the runner that claimed it while running
    lease_until: float | None = None  # a running job whose lease ran out is queued again
    priority: int = 0  # higher runs first
    run_at: float | None = None  # not claimed before this time (a delay, or a retry's back-off); None: at once
    retries: int = 0  # failed attempts that are run again (the job's `retries`, else the task's)
    last_error: dict[str, Any] | None = None  # the problem of the latest failed attempt
    runs: int = 0  # every claim, crash-interrupted ones too: the first part of its SSE event ids
    webhook: str | None = None  # POSTed the job document when it ends
    webhook_state: str | None = None  # None until final; then pending -> delivered | failed
    webhook_attempts: int = 0
    webhook_next_at: float | None = None  # when the next delivery attempt is due (or its lease ends)
    webhook_error: str | None = None  # why the latest delivery attempt failed

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def public(self) -> dict[str, Any]:
        """The job as the API shows it (docs/api.md): no internal bookkeeping, no raw bytes."""
        out: dict[str, Any] = {
            "id": self.id,
            "task": self.task,
            "status": self.status,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": self.progress,
            "priority": self.priority,
            "run_at": self.run_at if self.run_at is not None else self.created_at,
            "attempts": self.attempts,
            "retries": self.retries,
        }
        if self.status == SUCCEEDED:
            if self.result_bytes is not None:
                out["result"] = None
                out["result_url"] = f"/v1/jobs/{self.id}/result"
                out["result_size"] = len(self.result_bytes)
            else:
                out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        if self.last_error is not None:
            out["last_error"] = self.last_error
        if self.webhook is not None:
            out["webhook"] = self.webhook
            out["webhook_delivery"] = {
                "state": self.webhook_state,
                "attempts": self.webhook_attempts,
                "error": self.webhook_error,
            }
        return out

    def to_record(self) -> dict[str, Any]:
        """Every field, JSON-able (bytes as base64), for stores that keep JSON documents."""
        record = asdict(self)
        if self.result_bytes is not None:
            record["result_bytes"] = base64.b64encode(self.result_bytes).decode()
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        data = dict(record)
        if data.get("result_bytes") is not None:
            data["result_bytes"] = base64.b64decode(data["result_bytes"])
        return cls(**data)


@dataclass(frozen=True, order=True)
class EventId:
    """The position of a logged job event: (run, seq). Run 0 is the job before its first claim; a run's
    events are numbered from 1 by the runner that claimed it. Written `run-seq` (SSE `id:`, the Redis
    stream entry id). The two events that end a stream are not logged (they come from the final job):
    their ids are `end-1` (the final status) and `end-2` (the result or error)."""

    run: int
    seq: int

    def __str__(self) -> str:
        return f"{self.run}-{self.seq}"

    @classmethod
    def parse(cls, text: str) -> EventId:
        run, sep, seq = text.partition("-")
        if not sep or not run.isdigit() or not seq.isdigit() or len(text) > 40:
            raise ValueError(f"not an event id: {text!r}")
        return cls(int(run), int(seq))


@dataclass(frozen=True)
class LoggedEvent:
    """One event of a job's log: `data` is its JSON text, as sent."""

    id: EventId
    event: str
    data: bytes


