"""The job record: what is stored, what GET /v1/jobs/{id} shows, and the rules of its life cycle.

queued -> running -> succeeded | failed | cancelled; queued -> cancelled; running -> queued again only
when its runner is gone (crash recovery: at-least-once execution).
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})


def new_job_id() -> str:
    """Sortable by creation time (a millisecond prefix) and unguessable (random suffix)."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:20]}"


@dataclass
class Job:
    id: str
    task: str
    args: dict[str, Any]
    timeout: float | None = None
    status: str = QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict[str, Any] | None = None  # {"done", "total", "message"}
    result: Any = None  # JSON-able value of a succeeded job (None when the result is binary)
    result_bytes: bytes | None = None  # a binary result, served raw by GET /v1/jobs/{id}/result
    error: dict[str, Any] | None = None  # a problem object for failed (and cancelled) jobs
    idempotency_key: str | None = None
    attempts: int = 0  # how many times a runner claimed it (> 1 after crash recovery)
    owner: str | None = None  # the runner that claimed it while running
    lease_until: float | None = None  # a running job whose lease ran out is queued again

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def public(self) -> dict[str, Any]:
        """The job as the API shows it (API.md): no internal bookkeeping, no raw bytes."""
        out: dict[str, Any] = {
            "id": self.id,
            "task": self.task,
            "status": self.status,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": self.progress,
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
