"""What the pool does with each kind of message a worker sends: one small function per kind.

A worker's frame is a list of `(call_id, status, payload, elapsed)` messages (workers/worker.py).
`WorkerPool._on_frame` reads them; a plain value (RESULT_VALUE, RESULT_JSON) answering a call that
holds no granted segment is settled right there, since that is the hot path (a few hundred nanoseconds per
tiny call, no call added to it). Every other kind comes here, through two tables the pool builds
once (`FrameHandlers.controls()`, `.results()`):

    control messages, answering no call: handler(w, call_id, payload)
        PROGRESS_REPORT  `progress`  the running call's progress() report, to its caller's callback
        SEGMENT_REQUEST  `alloc`     the running call wants a segment for its bytes result: the broker
                                     grants one
        RETIRE_NOTICE    `retire`    the worker exits after this frame: the supervisor marks it
        STREAM_ITEM      `on_item`   an item of a running stream, to its consumer (streams.py)
    results, after the pool took the call out of the window, timed it and released its argument
    segments: handler(w, call, status, payload, elapsed)
        RESULT_ERROR     `error`     TaskFailed for the caller
        RESULT_PICKLED   `pickled`   unpickled here (a result that will not unpickle fails its call only)
        RESULT_CHUNK     `chunk`     a map chunk: one Outcome or TaskFailed per item
        RESULT_SHM       `shared`    the bytes are in a granted segment: the broker hands it over
        RESULT_VALUE,    `value`     a plain value, for a call that holds granted segments it did not use
        RESULT_JSON

Interface: the handlers get the `PoolState`, the `Supervisor` and the `Broker` (None when shared
memory is off) when they are made, and complete calls with `calls.settle`.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from typing import Any

from workers.errors import TaskFailed
from workers.executor import Outcome
from workers.local.broker import Broker
from workers.local.calls import Call, drop, settle
from workers.local.handle import WorkerHandle
from workers.local.state import PoolState
from workers.local.streams import on_item
from workers.local.supervisor import Supervisor
from workers.protocol import (
    CALL_FUNCTION,
    GRANT_SEGMENT,
    PROGRESS_REPORT,
    RESULT_CHUNK,
    RESULT_ERROR,
    RESULT_JSON,
    RESULT_PICKLED,
    RESULT_SHM,
    RESULT_VALUE,
    RETIRE_NOTICE,
    SEGMENT_REQUEST,
    STREAM_ITEM,
)
from workers.shm import Lease

log = logging.getLogger("procbridge.pool")

ControlHandler = Callable[[WorkerHandle, int, Any], None]
ResultHandler = Callable[[WorkerHandle, Call, int, Any, float], None]


def deliver(w: WorkerHandle, call: Call, value: Any, elapsed: float, json: bool) -> None:
    """Complete a call with its value: the value itself for `submit`, an Outcome for a task. A
    lease nobody waits for any more (the caller gave up) is released."""
    if call.kind == CALL_FUNCTION:
        settle(call.waiter, value)
    elif not settle(call.waiter, Outcome(value, w.pid, elapsed, json)) and type(value) is Lease:
        value.release()


class FrameHandlers:
    """The handlers of one pool's messages, besides the plain values the pool settles itself."""

    def __init__(self, state: PoolState, supervisor: Supervisor, broker: Broker | None) -> None:
        self._state = state
        self._supervisor = supervisor
        self._broker = broker

    def controls(self) -> dict[int, ControlHandler]:
        return {PROGRESS_REPORT: self.progress, SEGMENT_REQUEST: self.alloc, RETIRE_NOTICE: self.retire,
                STREAM_ITEM: on_item}

    def results(self) -> dict[int, ResultHandler]:
        return {
            RESULT_VALUE: self.value, RESULT_JSON: self.value, RESULT_ERROR: self.error, RESULT_PICKLED: self.pickled,
            RESULT_CHUNK: self.chunk, RESULT_SHM: self.shared,
        }

    # -- control messages -------------------------------------------------------------------------

    @staticmethod
    def progress(w: WorkerHandle, call_id: int, report: tuple[float, float | None, str | None]) -> None:
        for call in w.inflight:
            if call.id == call_id:
                if call.progress is not None and not call.waiter.done():
                    try:
                        call.progress(*report)
                    except Exception:
                        log.exception("a progress callback failed")
                return

    def alloc(self, w: WorkerHandle, call_id: int, size: int) -> None:
        if self._broker is not None:
            self._broker.grant(w, call_id, size)
        elif not w.eof:  # no shared memory (a worker never asks then): it sends the bytes inline
            self._state.send(w, (GRANT_SEGMENT, call_id, None))

    def retire(self, w: WorkerHandle, call_id: int, reason: int) -> None:
        self._supervisor.retiring(w, reason)

    # -- results ----------------------------------------------------------------------------------

    @staticmethod
    def value(w: WorkerHandle, call: Call, status: int, value: Any, elapsed: float) -> None:
        if call.results is not None:
            drop(call)  # granted but not used (the result was small after all)
        deliver(w, call, value, elapsed, status == RESULT_JSON)

    @staticmethod
    def error(w: WorkerHandle, call: Call, status: int, error: tuple[str, ...], elapsed: float) -> None:
        settle(call.waiter, error=TaskFailed(*error))
        if call.results is not None:
            drop(call)

    @staticmethod
    def pickled(w: WorkerHandle, call: Call, status: int, blob: bytes, elapsed: float) -> None:
        if call.results is not None:
            drop(call)
        try:
            value = pickle.loads(blob)
        except BaseException as exc:  # noqa: BLE001 - not even SystemExit may escape into the loop
            settle(call.waiter, error=TaskFailed(
                type(exc).__name__, f"the task's result cannot be decoded by the service: {exc}"
            ))
            return
        deliver(w, call, value, elapsed, False)

    def shared(self, w: WorkerHandle, call: Call, status: int, ref: Any, elapsed: float) -> None:
        assert self._broker is not None  # a worker answers RESULT_SHM only in a segment it was granted
        value = self._broker.result(call, ref, call.shared)
        if call.results is not None:
            drop(call)
        deliver(w, call, value, elapsed, False)

    def chunk(
        self, w: WorkerHandle, call: Call, status: int, items: list[tuple[int, Any, float]], elapsed: float
    ) -> None:
        if call.results is not None:
            broker = self._broker
            assert broker is not None
            items = [
                (RESULT_VALUE, broker.result(call, value, False), item_elapsed) if item_status == RESULT_SHM
                else (item_status, value, item_elapsed)
                for item_status, value, item_elapsed in items
            ]
            drop(call)
        settle(call.waiter, [
            TaskFailed(*value) if item_status == RESULT_ERROR
            else Outcome(value, w.pid, item_elapsed, item_status == RESULT_JSON)
            for item_status, value, item_elapsed in items
        ])
