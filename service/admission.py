"""Admission: whether the service takes a new piece of work now, decided before its body is read, so
a refused request costs no buffering and no validation."""

from __future__ import annotations

from service.problems import draining, overloaded
from service.state import Service


def admit_or_refuse(service: Service) -> None:
    """A call or a map: 503 `draining` while the service shuts down (or before its executor runs),
    503 `overloaded` when the admission queue is already full: the executor's queue and the calls
    waiting for their task's concurrency limit (service/concurrency.py) together."""
    executor = service.executor
    if service.draining or executor is None or executor.closing:
        raise draining()
    queued = executor.pending + service.gates.waiting
    if queued >= executor.max_pending:
        raise overloaded(queued)


def admit_job(service: Service) -> None:
    """A job: 503 `draining` while the service shuts down. The queue's length is no reason to refuse
    one: a stored job waits in the store, not in the executor."""
    if service.draining:
        raise draining()
