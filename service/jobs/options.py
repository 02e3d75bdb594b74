"""What a client may ask of a job beyond its task and arguments, checked before the job is stored, and
the listing cursor: each a 422 naming the field when it cannot be honoured.

- `priority`: an integer from PRIORITY_MIN to PRIORITY_MAX (exact in both stores), higher first;
- `delay` (seconds from now, up to MAX_DELAY) or `run_at` (epoch seconds, at most MAX_DELAY ahead; a past
  time means now), not both;
- `retries`: 0 to MAX_RETRIES, replacing the task's `@task(retries=N)`;
- the listing cursor: opaque to clients (base64url of the last listed job's (created_at, id)); a cursor
  this service did not write is refused, never trusted.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from dataclasses import dataclass
from typing import Any

import orjson

from service.jobs.model import PRIORITY_MAX, PRIORITY_MIN
from service.problems import invalid_argument

MAX_DELAY = 366 * 86400.0  # a year (and a day): further ahead is almost surely a unit mistake
MAX_RETRIES = 100


@dataclass(frozen=True)
class Scheduling:
    priority: int
    run_at: float  # epoch seconds
    retries: int


def _integer(payload: dict[str, Any], name: str, low: int, high: int, default: int) -> int:
    raw = payload.get(name)
    if raw is None:
        return default
    if not isinstance(raw, int) or isinstance(raw, bool) or not low <= raw <= high:
        raise invalid_argument(name, f"must be a whole number from {low} to {high}", f"must be from {low} to {high}")
    return raw


def _seconds(raw: object) -> float | None:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        value = float(raw)
        if math.isfinite(value):
            return value
    return None


def scheduling(payload: dict[str, Any], created_at: float, task_retries: int) -> Scheduling:
    priority = _integer(payload, "priority", PRIORITY_MIN, PRIORITY_MAX, 0)
    retries = _integer(payload, "retries", 0, MAX_RETRIES, task_retries)
    delay, run_at = payload.get("delay"), payload.get("run_at")
    if delay is not None and run_at is not None:
        raise invalid_argument("delay", "give `delay` or `run_at`, not both", "conflicts with run_at", more=["run_at"])
    at = created_at
    if delay is not None:
        seconds = _seconds(delay)
        if seconds is None or not 0 <= seconds <= MAX_DELAY:
            raise invalid_argument("delay", f"must be a number of seconds from 0 to {MAX_DELAY:g}",
                                   "must be a number of seconds >= 0")
        at = created_at + seconds
    elif run_at is not None:
        when = _seconds(run_at)
        if when is None or when < 0 or when > time.time() + MAX_DELAY:
            raise invalid_argument("run_at", "must be a time in epoch seconds, at most a year ahead",
                                   "must be epoch seconds")
        at = max(when, created_at)
    return Scheduling(priority, at, retries)


def encode_cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([created_at, job_id])).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        created_at, job_id = orjson.loads(raw)
        number = isinstance(created_at, int | float) and not isinstance(created_at, bool)
        if number and math.isfinite(created_at) and isinstance(job_id, str) and len(job_id) <= 64:
            return float(created_at), job_id
    except (binascii.Error, ValueError, TypeError, orjson.JSONDecodeError):
        pass
    raise invalid_argument("cursor", "is not a cursor this service returned (use `next` as it came)", "bad cursor")
