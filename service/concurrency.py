"""Per-task concurrency: `@task(concurrency=N)` lets at most N calls of that task run at once across
the whole pool, whatever the backend (local workers or a Dask cluster), because the limit is kept
here, in the service, before a call reaches the executor.

One `TaskGate` per task that has a limit (a task without one has no gate and pays one dict lookup).
A call of a gated task takes a slot before it goes to the executor and gives it back when its call
ends (answered, failed, timed out, cancelled); the others wait in arrival order. What holds a slot:

- a synchronous call: one slot for the call;
- a map: one slot per chunk in flight (a chunk runs its items one after another in one worker, so N
  slots still mean at most N items running); a map of a gated task also keeps at most N chunks of
  its own in flight, so it does not fill the wait with its own chunks;
- a job: one slot while its call runs (it waits for its slot in its `--job-concurrency` place).

Waiting calls count toward `--max-pending` with the executor's queue: a synchronous call or a map
chunk that would have to wait while `executor.pending + waiting >= max_pending` is refused with
`Overloaded` (503 `overloaded`), so a flood of a concurrency-1 task is refused, not queued without
bound. A job is never refused here: it waits in its runner's place (jobs are admitted by the store,
not by the queue). A caller that goes away while waiting (its handler cancelled) leaves the line and
its call never runs. Other tasks never wait for a gate that is not theirs.

A drain (SIGTERM) lets the gated calls finish too: it waits for the gates to empty (`wait_idle`,
within --shutdown-grace) before the executor stops taking calls (service/server.py).

`procbridge_task_waiting{task}` (a gauge per gated task) shows the waiting calls; the gates run on
the loop's thread only, so they need no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.errors import Overloaded
from workers.executor import Executor

T = TypeVar("T")


class TaskGate:
    """At most `limit` holders at once; the others wait, first come first served."""

    def __init__(self, name: str, limit: int, gates: TaskGates) -> None:
        self.name = name
        self.limit = limit
        self.running = 0  # slots held
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._gates = gates

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def must_wait(self) -> bool:
        return self.running >= self.limit or bool(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, waiting for one if need be. Cancelled while waiting: leaves the line (a slot
        handed over at that very moment is passed on), and the caller never holds it."""
        if not self.must_wait:
            self.running += 1
            self._gates.held += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._gates.waiting += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a slot, then cancelled: pass it on
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                    self._gates.waiting -= 1
                    self._gates.settled()
            raise

    def release(self) -> None:
        """Give a slot back: to the first waiter still waiting, else to the pool of free slots."""
        while self._waiters:
            waiter = self._waiters.popleft()
            self._gates.waiting -= 1
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to it: `running` stays
                return
        self.running -= 1
        self._gates.held -= 1
        self._gates.settled()


class TaskGates:
    """The gates of one service's tasks, by task name, and how many calls wait at them in all."""

    def __init__(self, limits: Iterable[tuple[str, int]], executor: Callable[[], Executor | None]) -> None:
        self.waiting = 0  # calls waiting at any gate (kept by the gates: admission reads it per call)
        self.held = 0  # slots held at all gates
        self._idle: list[asyncio.Future[None]] = []
        self._executor = executor
        self._gates = {name: TaskGate(name, limit, self) for name, limit in limits}

    def get(self, name: str) -> TaskGate | None:
        return self._gates.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._gates

    def __iter__(self) -> Iterator[TaskGate]:
        return iter(self._gates.values())

    def settled(self) -> None:
        """A slot or a waiting place was given up: wake `wait_idle` once nothing holds or waits."""
        if not self.held and not self.waiting:
            idle, self._idle = self._idle, []
            for future in idle:
                if not future.done():
                    future.set_result(None)

    async def wait_idle(self) -> None:
        """Until no call holds or waits for a slot. A drain waits for this before it closes the
        executor: a waiting call was admitted, and must not meet a closed executor when its turn comes."""
        while self.held or self.waiting:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle.append(future)
            await future

    async def run(self, name: str, call: Callable[[], Awaitable[T]], *, bounded: bool = True) -> T:
        """`call()` once the task's gate lets it in (at once for a task without a gate).

        `bounded`: a call that would have to wait while the executor's queue and the gates' waiting
        calls already fill `--max-pending` raises `Overloaded` instead (jobs pass False)."""
        gate = self._gates.get(name)
        if gate is None:
            return await call()
        if bounded and gate.must_wait:
            executor = self._executor()
            if executor is not None:
                queued = executor.pending + self.waiting
                if queued >= executor.max_pending:
                    raise Overloaded(queued)
        await gate.acquire()
        try:
            return await call()
        finally:
            gate.release()


class GatesCollector(Collector):
    """`procbridge_task_waiting{task}`: calls waiting for their task's concurrency limit."""

    def __init__(self, gates: TaskGates) -> None:
        self._gates = gates

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily(
            "procbridge_task_waiting",
            "Calls waiting for a slot under their task's @task(concurrency=N) (they count toward --max-pending)",
            labels=["task"],
        )
        for gate in self._gates:
            family.add_metric([gate.name], gate.waiting)
        yield family
