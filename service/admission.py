"""Admission: whether the service takes a new piece of work now, decided before its body is read, so
a refused request costs no buffering and no validation."""

from __future__ import annotations

from service.problems import draining, overloaded
from service.state import Service
from workers.errors import Overloaded, PoolClosed


def admit_or_refuse(service: Service) -> None:
    """A call or a map: 503 `draining` while the service shuts down (or before its executor runs),
    503 `overloaded` when the admission queue is already full: the executor's queue and the calls
    waiting for their task's concurrency limit (service/concurrency.py) together."""
    refused = refusal(service)
    if refused is not None:
        raise draining() if isinstance(refused, PoolClosed) else overloaded(refused.pending)


def refusal(service: Service) -> PoolClosed | Overloaded | None:
    """Why a new call may not be admitted now, as the pool error it stands for (None: admit it). The
    core of a service with serving processes answers their calls with it (service/relay_calls.py)."""
    executor = service.executor
    if service.draining or executor is None or executor.closing:
        return PoolClosed()
    queued = executor.pending + service.gates.waiting
    if queued >= executor.max_pending:
        return Overloaded(queued)
    return None


def admit_job(service: Service) -> None:
    """A job: 503 `draining` while the service shuts down. The queue's length is no reason to refuse
    one: a stored job waits in the store, not in the executor."""
    if service.draining:
        raise draining()
