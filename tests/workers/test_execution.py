"""workers/execution.py: a call has the same outcome whichever transport runs it.

Four transports run the same calls and must agree on every outcome (a JSON result, a value, bytes
that stay bytes, a `memoryview` parameter, an exception, SystemExit, a result that is not JSON, an
unknown task, a map chunk whose items fail on their own) and on progress (throttled, the final
report always sent):

- "worker-config": the Execution a local worker configures, called in this process;
- "dask-thread": the one a Dask worker thread uses with isolate=thread (results left to Dask);
- "runner-child": a Dask runner child (isolate=process: the local worker loop in a subprocess,
  driven by workers/dask/remote.py's `_Runner`, no Dask needed);
- "local-pool": `WorkerPool` and its worker processes, seen through what the service gets.
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import uvloop

from tests.support import execution_tasks
from workers import context, registry
from workers.dask import remote as dask_remote
from workers.errors import TaskFailed
from workers.execution import PROGRESS_EVERY, Execution, Progress, describe_exception
from workers.executor import CallOptions, Outcome
from workers.local.pool import PoolOptions, WorkerPool
from workers.protocol import (
    CALL_MAP,
    CALL_TASK,
    RESULT_CHUNK,
    RESULT_ERROR,
    RESULT_JSON,
    RESULT_PICKLED,
    RESULT_SHM,
    RESULT_VALUE,
)

MODULES = ("tests.support.execution_tasks",)
Report = tuple[float, float | None, str | None]


class Prefix(str):
    """An expected message of which only the start is fixed (the rest comes from a library)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.startswith(self)

    __hash__ = str.__hash__


def _plain(value: Any) -> tuple[Any, ...]:
    return ("bytes", value) if type(value) is bytes else ("value", value)


def decoded(tag: int, value: Any) -> tuple[Any, ...]:
    """A (tag, value) off the wire as what it says: comparable across transports."""
    if tag == RESULT_JSON:
        return ("json", orjson.loads(value))
    if tag == RESULT_PICKLED:
        return _plain(pickle.loads(value))
    if tag == RESULT_VALUE:
        return _plain(value)
    if tag == RESULT_ERROR:
        return ("error", value[0], value[1])
    assert tag == RESULT_CHUNK, tag
    return ("chunk", [decoded(item_tag, item) for item_tag, item, _elapsed in value])


class _Collect:
    """Stands in for the Dask emitter / the pool's progress callback: keeps the reports."""

    def __init__(self) -> None:
        self.reports: list[Report] = []
        self.sent = 0

    def report(self, call_id: int, report: Report) -> None:
        self.reports.append(report)


class InProcess:
    def __init__(self, execution: Execution) -> None:
        registry.load(MODULES)
        self.execution = execution

    def run(self, kind: int, name: str, payload: Any, encode: bool, want_progress: bool) -> tuple[Any, list[Report]]:
        sink = _Collect()
        progress = Progress(sink.report, 1) if want_progress else None
        tag, value = self.execution.run(kind, name, payload, encode, False, 1, progress)
        assert context._sink is None and getattr(context._threads, "sink", None) is None, "a sink outlived its call"
        return decoded(tag, value), sink.reports

    def close(self) -> None:
        pass


class RunnerChild:
    def __init__(self) -> None:
        self.runner = dask_remote._Runner(MODULES)
        self.ids = itertools.count(1)

    def run(self, kind: int, name: str, payload: Any, encode: bool, want_progress: bool) -> tuple[Any, list[Report]]:
        sink = _Collect()
        message = (next(self.ids), kind, name, payload, encode, want_progress, False)
        tag, value, pid, _elapsed = self.runner.call(message, 30.0, sink, lambda: False)  # type: ignore[arg-type]
        assert pid == self.runner.pid and self.runner.usable()
        return decoded(tag, value), sink.reports

    def close(self) -> None:
        self.runner.stop()


class LocalPool:
    """A pool on its own uvloop thread, for the whole module (starting one per case costs seconds)."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pool-loop", daemon=True)
        self.thread.start()
        self.pool = WorkerPool(PoolOptions(workers=1, modules=MODULES))
        asyncio.run_coroutine_threadsafe(self.pool.start(), self.loop).result(60)

    def run(self, kind: int, name: str, payload: Any, encode: bool, want_progress: bool) -> tuple[Any, list[Report]]:
        reports: list[Report] = []

        def seen(outcome: Outcome | TaskFailed) -> tuple[Any, ...]:
            if isinstance(outcome, TaskFailed):
                return ("error", outcome.exc_type, outcome.message)
            return ("json", orjson.loads(outcome.value)) if outcome.json else _plain(outcome.value)

        async def call() -> tuple[Any, ...]:
            try:
                if kind == CALL_MAP:
                    return ("chunk", [seen(item) for item in await self.pool.call_chunk(name, payload)])
                on_progress = (lambda *report: reports.append(report)) if want_progress else None
                options = CallOptions(encode_json=encode, on_progress=on_progress)
                return seen(await self.pool.call(name, payload, options))
            except TaskFailed as exc:
                return seen(exc)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(30), reports

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.pool.aclose(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


TRANSPORTS = {
    "worker-config": lambda: InProcess(Execution()),
    "dask-thread": lambda: InProcess(dask_remote._IN_THREAD),
    "runner-child": RunnerChild,
    "local-pool": LocalPool,
}


@pytest.fixture(scope="module", params=list(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> Iterator[Any]:
    opened = TRANSPORTS[request.param]()
    try:
        yield opened
    finally:
        opened.close()


BLOB = bytes(range(256)) + bytes(44)
CASES: dict[str, tuple[int, str, Any, bool, tuple[Any, ...]]] = {
    "json": (CALL_TASK, "ex_document", {"n": 3}, True, ("json", {"n": 3, "squares": [0, 1, 4]})),
    "value": (CALL_TASK, "ex_document", {"n": 2}, False, ("value", {"n": 2, "squares": [0, 1]})),
    "bytes-stay-bytes": (CALL_TASK, "ex_blob", {"size": 300}, True, ("bytes", BLOB)),
    "bytes-without-encoding": (CALL_TASK, "ex_blob", {"size": 300}, False, ("bytes", BLOB)),
    "memoryview-parameter": (
        CALL_TASK, "ex_view_info", {"data": b"abcd"}, True,
        ("json", {"type": "memoryview", "readonly": True, "nbytes": 4}),
    ),
    "raises": (CALL_TASK, "ex_fail", {"message": "boom"}, True, ("error", "ValueError", "boom")),
    "system-exit": (CALL_TASK, "ex_leave", {"code": 3}, True, ("error", "SystemExit", "3")),
    "not-json": (
        CALL_TASK, "ex_unencodable", {}, True,
        ("error", "TypeError", Prefix("the task's result is not JSON-serialisable: ")),
    ),
    "not-registered": (
        CALL_TASK, "no_such_task", {}, True,
        ("error", "LookupError", "task 'no_such_task' is not registered in this worker"),
    ),
    "map-chunk": (
        CALL_MAP, "ex_maybe", [{"n": 1}, {"n": -2}, {"data": 3}, {"n": 4}], True,
        ("chunk", [
            ("json", 10),
            ("error", "ValueError", "negative: -2"),
            ("error", "TypeError", Prefix("ex_maybe() got an unexpected keyword argument")),
            ("json", 40),
        ]),
    ),
    "map-chunk-of-bytes": (CALL_MAP, "ex_blob", [{"size": 300}], True, ("chunk", [("bytes", BLOB)])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_same_outcome_whichever_transport_runs_the_call(transport: Any, case: str) -> None:
    kind, name, payload, encode, expected = CASES[case]
    outcome, reports = transport.run(kind, name, payload, encode, False)
    assert outcome == expected
    assert reports == []


def test_progress_is_throttled_and_the_final_report_always_goes(transport: Any) -> None:
    steps = 400  # reported back to back: far faster than one per PROGRESS_EVERY
    outcome, reports = transport.run(CALL_TASK, "ex_count", {"steps": steps}, True, True)
    assert outcome == ("json", steps)
    assert reports[0] == (1.0, float(steps), f"1/{steps}")
    assert reports[-1] == (float(steps), float(steps), f"{steps}/{steps}")
    assert len(reports) < steps / 4


def test_progress_nobody_asked_for_goes_nowhere(transport: Any) -> None:
    assert transport.run(CALL_TASK, "ex_count", {"steps": 5}, True, False) == (("json", 5), [])


def test_progress_reports_are_normalised_and_rate_limited() -> None:
    sent: list[tuple[int, Report]] = []
    progress = Progress(lambda call_id, report: sent.append((call_id, report)), 7)
    progress(1, 10, "x" * 5000)
    progress(2, 10, "dropped: too soon")
    progress(10, 10, None)  # complete: always sent
    time.sleep(PROGRESS_EVERY * 1.2)
    progress(True, None, 42)  # type: ignore[arg-type]  # whatever a task passes becomes plain data
    assert sent == [(7, (1.0, 10.0, "x" * 1000)), (7, (10.0, 10.0, None)), (7, (1.0, None, "42"))]


def test_calls_side_by_side_in_threads_report_to_their_own_callers() -> None:
    """A Dask worker with isolate=thread runs one call per thread at once: each call's reports must
    reach its own caller, the last one (complete) included, however the calls interleave."""
    registry.load(MODULES)
    execution_tasks.GATE = threading.Barrier(2, timeout=10)  # both have reported once before either goes on
    got: dict[str, list[tuple[int, Report]]] = {"a": [], "b": []}
    outcomes: dict[str, tuple[int, Any]] = {}

    def call(label: str, call_id: int) -> None:
        progress = Progress(lambda i, report: got[label].append((i, report)), call_id)
        outcomes[label] = dask_remote._IN_THREAD.run(CALL_TASK, "ex_side_by_side", {"label": label}, True, False,
                                                     call_id, progress)

    threads = [threading.Thread(target=call, args=(label, i)) for i, label in enumerate("ab", 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert outcomes == {"a": (RESULT_JSON, b'"a"'), "b": (RESULT_JSON, b'"b"')}
    assert got == {
        "a": [(1, (1.0, 2.0, "a")), (1, (2.0, 2.0, "a"))],
        "b": [(2, (1.0, 2.0, "b")), (2, (2.0, 2.0, "b"))],
    }


def test_an_error_carries_its_traceback_for_debug_mode() -> None:
    registry.load(MODULES)
    tag, (exc_type, message, tb) = Execution().run(CALL_TASK, "ex_fail", {"message": "boom"}, True, False, 1, None)
    assert (tag, exc_type, message) == (RESULT_ERROR, "ValueError", "boom")
    assert "Traceback" in tb and "execution_tasks.py" in tb and tb.rstrip().endswith("ValueError: boom")


def test_describe_exception_survives_an_exception_that_cannot_describe_itself() -> None:
    class Odd(Exception):
        def __str__(self) -> str:
            raise SystemExit("no")

    exc_type, message, _tb = describe_exception(Odd())
    assert exc_type.endswith("Odd") and message == "<unprintable Odd>"


def test_a_large_bytes_result_goes_into_the_segment_the_transport_obtains() -> None:
    """The local worker's one difference: past the threshold, bytes are written into a granted
    segment and only its name and length travel; no grant (no room): inline, as small ones go."""
    registry.load(MODULES)
    segment = bytearray(4096)
    asked: list[tuple[int, int]] = []

    def grant(call_id: int, size: int) -> tuple[str, memoryview] | None:
        asked.append((call_id, size))
        return ("seg", memoryview(segment)) if call_id == 1 else None

    execution = Execution(threshold=100, segment_for=grant)
    tag, ref = execution.run(CALL_TASK, "ex_blob", {"size": 300}, True, False, 1, None)
    assert tag == RESULT_SHM and tuple(ref) == ("seg", 300) and bytes(segment[:300]) == BLOB
    assert execution.run(CALL_TASK, "ex_blob", {"size": 300}, True, False, 2, None) == (RESULT_VALUE, BLOB)
    assert execution.run(CALL_TASK, "ex_blob", {"size": 50}, True, False, 3, None) == (RESULT_VALUE, bytes(50))
    assert asked == [(1, 300), (2, 300)]
