"""Running one call: the one body behind every way procbridge runs a task.

A transport only moves calls and results; what a call *does* is decided here, once, so a task
returns the same result, fails with the same error and reports progress the same way whether a
local worker, a Dask worker thread or a Dask runner child ran it:

    workers/worker.py                          workers/dask/remote.py
    (a local pool worker, and the runner       (isolate=thread: the Dask
     child of a Dask worker, isolate=process)   worker thread itself)
                    │                                    │
                    └──────────► Execution.run ◄─────────┘
                                      │  progress sink installed (context.py), throttled (Progress)
                                      │  lookup: registry -> (fn, its `memoryview` parameter), cached
                                      │  arguments: ShmRef -> read-only view or bytes; bytes -> view
                                      ▼
                 CALL_TASK: fn(**kwargs)   CALL_MAP: each item on its own   CALL_FUNCTION: fn(*args)
                 CALL_BATCH: fn(**{param: [each call's value]}) once -> one result per call
                                      │
                                      ▼  encode
                 bytes stay bytes (past the threshold: into a segment the transport obtains)
                 with encode_json: JSON bytes (orjson, here, off the service's loop)
                 a plain scalar as is; anything else pickled on its own (or as is, on Dask)
                                      │
                                      ▼
                 (tag, value): a RESULT_* of workers/protocol.py; any exception, SystemExit and
                 KeyboardInterrupt included, becomes RESULT_ERROR with plain strings (type, message,
                 traceback), which always pickle; the service shows the traceback only with --debug

What differs between transports is configuration of one `Execution`, not code: where shared-memory
arguments are mapped, how a large bytes result gets a segment (the local worker asks the service
over its socket; Dask has no segments), and whether other values are pickled here (locally, so a
value that will not pickle fails its own call, not the frame it travels in) or left to Dask.

The worker loop calls `run` once per call, so its fast path is flat: the task table and the
executor functions already seen are dict reads inline, and a call without progress, shared memory
or a `memoryview` parameter costs one call of `run` and one of `encode` beyond the task itself (as
many as the worker made before this module existed: lookup and encode).
"""

from __future__ import annotations

import contextlib
import pickle
import time
import traceback
from collections.abc import Callable
from types import FunctionType
from typing import Any

import orjson

from workers import aio, arguments, context, registry
from workers.protocol import (
    CALL_BATCH,
    CALL_MAP,
    CALL_TASK,
    RESULT_CHUNK,
    RESULT_ERROR,
    RESULT_JSON,
    RESULT_PICKLED,
    RESULT_SHM,
    RESULT_VALUE,
)
from workers.shm import Mappings, ShmRef

PROGRESS_EVERY = 0.05  # at most one progress report per call this often (the final one always goes)

_PLAIN = frozenset({int, float, str, bool, type(None)})
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_FUNCTIONS_KEPT = 256

Report = tuple[float, float | None, str | None]
# (call id, size) -> (segment name, its writable mapping), or None when the service has no room
SegmentFor = Callable[[int, int], "tuple[str, memoryview] | None"]


class Execution:
    """How this process runs calls.

    `maps`: the shared-memory segments it has attached (arguments arrive as ShmRef handles to them).
    `threshold` and `segment_for`: a bytes result larger than `threshold` is written into the segment
    `segment_for(call_id, size)` obtains (None: no room, the bytes go inline); None: always inline.
    `pickle_values`: a result that is neither bytes, JSON nor a plain scalar is pickled here (True,
    the local wire: a value that will not pickle fails its own call only) or returned as is (False,
    Dask, which serialises it itself).
    `threads`: calls run side by side in threads of this process (a Dask worker with isolate=thread),
    so each call's progress sink is the thread's own, not the process's (workers/context.py).
    """

    __slots__ = ("_set_sink", "maps", "pickle_values", "segment_for", "threshold")

    def __init__(
        self,
        *,
        maps: Mappings | None = None,
        threshold: int | None = None,
        segment_for: SegmentFor | None = None,
        pickle_values: bool = True,
        threads: bool = False,
    ) -> None:
        self.maps = Mappings() if maps is None else maps
        self.threshold = threshold if segment_for is not None else None
        self.segment_for = segment_for
        self.pickle_values = pickle_values
        self._set_sink = context.set_thread_sink if threads else context.set_sink

    def run(
        self,
        kind: int,
        name: str,
        payload: Any,
        encode: bool,
        shared: bool,
        call_id: int,
        progress: Progress | None,
    ) -> tuple[int, Any]:
        """Run one call (a CALL_* of workers/protocol.py): (RESULT_* tag, value); never raises.
        `shared`: some arguments are ShmRef handles. `progress`: the sink of the task's progress()
        reports while it runs (None: the caller does not want them)."""
        if progress is not None:
            self._set_sink(progress)
        views: list[memoryview] | None = None
        try:
            if kind == CALL_TASK:
                fn, view_param = _TASKS.get(name) or lookup(name)
                if shared or view_param is not None:
                    views = []
                    payload = self.arguments(payload, view_param, views)
                return self.encode(fn(**payload), encode, call_id)
            if kind == CALL_MAP:
                return RESULT_CHUNK, self.run_chunk(name, payload, shared, call_id)
            if kind == CALL_BATCH:
                return RESULT_CHUNK, self.run_batch(name, payload, shared, call_id)
            fn_blob, args, kwargs = pickle.loads(payload)
            fn = _FUNCTIONS.get(fn_blob) or function(fn_blob)
            return self.encode(fn(*args, **kwargs), encode, call_id)
        except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are task outcomes too
            return RESULT_ERROR, describe_exception(exc)
        finally:
            if progress is not None:
                self._set_sink(None)
            if views:
                release(views)

    def run_chunk(
        self, name: str, items: list[dict[str, Any]], shared: bool, call_id: int
    ) -> list[tuple[int, Any, float]]:
        """A map chunk: each item runs and fails on its own, its result JSON-encoded (bytes stay
        bytes): [(tag, value, elapsed), ...]. A task that is not registered fails the whole chunk."""
        fn, view_param = _TASKS.get(name) or lookup(name)
        convert = shared or view_param is not None
        out = []
        for kwargs in items:
            start = time.perf_counter()
            views: list[memoryview] = []
            try:
                if convert:
                    kwargs = self.arguments(kwargs, view_param, views)
                tag, value = self.encode(fn(**kwargs), True, call_id)
            except BaseException as exc:  # noqa: BLE001 - one item's failure is that item's result
                tag, value = RESULT_ERROR, describe_exception(exc)
            finally:
                if views:
                    release(views)
            out.append((tag, value, time.perf_counter() - start))
        return out

    def run_batch(
        self, name: str, items: list[dict[str, Any]], shared: bool, call_id: int
    ) -> list[tuple[int, Any, float]]:
        """A batch of calls of a `batch=` task (workers/batching.py gathered them): ONE invocation, each
        parameter given the list of the calls' values (a value a call left out: the parameter's default), which
        must return a list (a tuple, an array) with one result per call, each JSON-encoded (bytes stay bytes) like
        a map item: [(tag, value, elapsed), ...]. A raise, or a result that is not such a list, is every call's
        failure; a result that will not encode is its own call's."""
        fn, view_param = _TASKS.get(name) or lookup(name)
        start = time.perf_counter()
        views: list[memoryview] = []
        try:
            if shared or view_param is not None:
                items = [self.arguments(kwargs, view_param, views) for kwargs in items]
            spec = registry.get(name)
            assert spec is not None  # lookup() found it
            params = spec.signature.parameters
            columns = {
                key: [kwargs[key] if key in kwargs else params[key].default for kwargs in items]
                for key in dict.fromkeys(key for kwargs in items for key in kwargs)
            }
            values = fn(**columns)
            if isinstance(values, str | bytes | bytearray | dict) or not hasattr(values, "__len__"):
                raise TypeError(f"batch task {name!r} must return a list with one result per call, "
                                f"got {type(values).__name__}")
            if len(values) != len(items):
                raise TypeError(f"batch task {name!r} returned {len(values)} results for a batch of {len(items)} "
                                "calls: it must return one result per call, in order")
            elapsed = time.perf_counter() - start
            return [(*self.encode(value, True, call_id), elapsed) for value in values]
        except BaseException as exc:  # noqa: BLE001 - the one invocation failed: so did each of its calls
            failure = describe_exception(exc)
            return [(RESULT_ERROR, failure, time.perf_counter() - start)] * len(items)
        finally:
            if views:
                release(views)

    def arguments(self, kwargs: dict[str, Any], view_param: str | None, views: list[memoryview]) -> dict[str, Any]:
        """The kwargs as the task wants them: a ShmRef becomes a read-only memoryview of the segment
        for the parameter annotated `memoryview` (zero copy, valid during the call only: appended to
        `views`, released after) and bytes for any other (one copy); inline bytes for a `memoryview`
        parameter are wrapped in a read-only view (no copy)."""
        out = dict(kwargs)
        for key, value in kwargs.items():
            if type(value) is ShmRef:
                segment = self.maps.get(value.name)
                if key == view_param:
                    view = segment[: value.length].toreadonly()
                    views.append(view)
                    out[key] = view
                else:
                    out[key] = bytes(segment[: value.length])
            elif key == view_param and isinstance(value, bytes | bytearray):
                out[key] = memoryview(value) if type(value) is bytes else memoryview(value).toreadonly()
        return out

    def encode(self, value: Any, encode: bool, call_id: int) -> tuple[int, Any]:
        """A task's return value as (tag, value) for the wire. Bytes stay bytes; with `encode`
        anything else becomes JSON; a plain scalar goes as is; anything else is pickled on its own
        (with `pickle_values`). A value that cannot be encoded fails this call only."""
        if isinstance(value, bytes | bytearray | memoryview):
            return self._binary(value, call_id)
        if encode:
            try:
                return RESULT_JSON, orjson.dumps(value, option=_JSON_OPTIONS)
            except orjson.JSONEncodeError as exc:
                return RESULT_ERROR, ("TypeError", f"the task's result is not JSON-serialisable: {exc}", "")
        if type(value) in _PLAIN or not self.pickle_values:
            return RESULT_VALUE, value
        try:
            return RESULT_PICKLED, pickle.dumps(value, protocol=5)
        except BaseException as exc:  # noqa: BLE001 - even a __reduce__ that raises SystemExit
            kind, message, tb = describe_exception(exc)
            return RESULT_ERROR, (kind, f"the task's result cannot be sent back: {message}", tb)

    def _binary(self, value: bytes | bytearray | memoryview, call_id: int) -> tuple[int, Any]:
        size = len(value) if type(value) is bytes else memoryview(value).nbytes
        threshold = self.threshold
        if threshold is None or size <= threshold or self.segment_for is None:
            return RESULT_VALUE, value if type(value) is bytes else bytes(value)
        data = memoryview(value)
        if not data.c_contiguous:
            data = memoryview(data.tobytes())
        granted = self.segment_for(call_id, size)
        if granted is None:  # no room in shared memory: inline, as a small result would go
            return RESULT_VALUE, data.tobytes()
        name, segment = granted
        segment[:size] = data.cast("B")
        return RESULT_SHM, ShmRef(name, size)


class Progress:
    """The progress sink of one call: passes (done, total, message) on to `send(call_id, report)`
    at most every PROGRESS_EVERY seconds, and always the report that says the work is complete; a
    report is normalised to plain floats and a message of at most 1000 characters."""

    __slots__ = ("_call_id", "_last", "_send")

    def __init__(self, send: Callable[[int, Report], None], call_id: int) -> None:
        self._send = send
        self._call_id = call_id
        self._last = 0.0

    def __call__(self, done: float, total: float | None, message: str | None) -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_EVERY and not (total is not None and done >= total):
            return
        self._last = now
        self._send(
            self._call_id,
            (float(done), None if total is None else float(total), None if message is None else str(message)[:1000]),
        )


_TASKS: dict[str, tuple[Callable[..., Any], str | None]] = {}
_FUNCTIONS: dict[bytes, Any] = {}  # executor calls' plain functions, by their pickle


def lookup(name: str) -> tuple[Callable[..., Any], str | None]:
    """The task's function as a plain call (an `async def` runs on this thread's loop, a generator
    is collected into a list: workers/aio.py) and the name of its parameter annotated `memoryview`
    (if any), kept after the first call."""
    found = _TASKS.get(name)
    if found is None:
        spec = registry.get(name)
        if spec is None:
            raise LookupError(f"task {name!r} is not registered in this worker")
        # rich arguments rebuilt from their JSON data (workers/arguments.py), then made a plain call
        found = _TASKS[name] = (aio.plain(arguments.bound(spec), spec.kind), spec.view_param)
    return found


def function(blob: bytes) -> Any:
    """An executor call's function: a plain function (pickled as its name) is unpickled once and
    kept; anything else (a partial, a callable object) is unpickled afresh for every call."""
    fn = _FUNCTIONS.get(blob)
    if fn is None:
        fn = pickle.loads(blob)
        if type(fn) is FunctionType and len(_FUNCTIONS) < _FUNCTIONS_KEPT:
            _FUNCTIONS[blob] = fn
    return fn


def release(views: list[memoryview]) -> None:
    for view in views:
        with contextlib.suppress(BufferError):  # the task kept something built on it; it goes with that
            view.release()


def describe_exception(exc: BaseException) -> tuple[str, str, str]:
    """(type name, message, traceback) as plain strings: they always pickle, whatever `exc` is."""
    cls = type(exc)
    module = getattr(cls, "__module__", "")
    exc_type = cls.__qualname__ if module in ("builtins", "__main__", "") else f"{module}.{cls.__qualname__}"
    try:
        message = str(exc)
    except BaseException:  # noqa: BLE001 - a __str__ that raises must not kill the worker
        message = f"<unprintable {cls.__name__}>"
    try:
        tb = "".join(traceback.format_exception(exc))
    except BaseException:  # noqa: BLE001
        tb = ""
    return exc_type, message, tb
