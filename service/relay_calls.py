"""`CoreRelay`: what the core does with what its serving processes send over the relay
(`--http-processes N`, N ≥ 2; workers/relay/). Each call meets the same admission as one made in
this process (draining, then `--max-pending` over the one queue and the task gates' waiting calls),
the task's concurrency gate, and the one executor; a refusal goes back as the PoolError it stands
for, which the serving process answers as it would its own (503 `draining` or `overloaded`).
Rate-limit tokens and the metrics' counts live here too, so they are the whole service's."""

from __future__ import annotations

from typing import Any

from service.admission import refusal
from service.metrics import RejectedRequests
from service.rate_limit import TokenBuckets
from service.state import Service
from workers.executor import CallOptions, Outcome

# Relayed results travel over the relay's socket: no shared-memory lease may leave this process.
RELAYED_CALL = CallOptions(encode_json=True)


class CoreRelay:
    """The relay server's handler (workers/relay/server.py's RelayHandler) for one service."""

    def __init__(self, service: Service, rejected: RejectedRequests) -> None:
        self.service = service
        self.rejected = rejected
        limit = service.config.rate_limit
        self.buckets = TokenBuckets(limit) if limit is not None else None

    async def call(self, task: str, kwargs: dict[str, Any], timeout: float | None) -> Outcome:
        service = self.service
        refused = refusal(service)
        if refused is not None:
            raise refused
        executor = service.executor
        assert executor is not None  # refusal() said draining otherwise
        options = RELAYED_CALL if timeout is None else RELAYED_CALL._replace(timeout=timeout)
        if task in service.gates:
            return await service.gates.run(task, lambda: executor.call(task, kwargs, options))
        return await executor.call(task, kwargs, options)

    def take(self, bucket: str) -> float:
        return self.buckets.take(bucket) if self.buckets is not None else 0.0

    def note(self, what: str, args: tuple[Any, ...]) -> None:
        if what == "observe":
            self.service.metrics.observe(*args)
        elif what == "unauthorized":
            self.rejected.unauthorized()
        elif what == "rate-limited":
            self.rejected.rate_limited()

    def welcome(self) -> tuple[int, int]:
        executor = self.service.executor
        return (executor.size, executor.max_pending) if executor is not None else (0, 0)
