"""The loop inside each worker process: receive a batch of calls, run them, send the outcomes.

Every way a task can end (a value, any exception, SystemExit, KeyboardInterrupt, a result that will
not pickle or encode) becomes one plain result tuple, so the worker lives on and the service only
ever sees data. Results are coalesced: while the next call is one that usually finishes in well
under a millisecond, finished results wait (at most ~1 ms) and go back in one frame.

Anything user-defined crosses the socket pickled on its own (an executor call's function and
arguments, a result that is not a plain scalar), so a call or a result that cannot be decoded on
the other side fails that call only, never the frame it travels in.

Large binary payloads do not cross the socket at all (workers/shm.py): an argument arrives as a
`ShmRef` to a segment the service filled, which the task gets as a read-only memoryview (parameter
annotated `memoryview`, zero copy) or as bytes (annotated `bytes`: one copy, here); a bytes result
larger than the threshold is written into a segment the service grants on request (ALLOC), and only
its name and length go back.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import signal
import socket
import time
import traceback
from collections import deque
from dataclasses import dataclass
from types import FunctionType
from typing import Any

import orjson

from workers import context, registry
from workers.framing import BlockingFrames, dumps
from workers.shm import Mappings, ShmRef
from workers.stats import RETIRE_MAX_MEMORY, RETIRE_MAX_TASKS, RowWriter, WorkerTable

# Messages, loop -> worker: a list of calls (call_id, kind, name, payload, encode_json, progress, shm).
# KIND_TASK: payload is the kwargs of the registered task `name` (plain data).
# KIND_FUNCTION: payload is pickle.dumps((pickle.dumps(fn), args, kwargs)) of an executor call (the function
# pickled on its own: the pool pickles a plain function once, and the worker unpickles it once).
# KIND_MAP: payload is a list of kwargs for task `name`, run one after the other (a map chunk).
# progress: whether the caller wants the task's progress() reports.
# shm: whether some kwargs are ShmRef(name, length) handles to segments holding the bytes.
KIND_TASK, KIND_FUNCTION, KIND_MAP = 0, 1, 2
# Messages, worker -> loop: a list of results (call_id, status, payload, elapsed_seconds).
# OK: the payload is the value (bytes or a plain scalar). OK_JSON: the value already encoded as JSON
# bytes (done here, off the loop). OK_PICKLED: the value pickled on its own. ERROR: (type, message,
# traceback) strings. RETIRE (call id 0, payload the reason): the worker exits after this frame.
# OK_MAP: the payload is a list of (status, payload, elapsed), one per item of a map chunk.
# PROGRESS: (done, total, message) reported by the running call; sent at once, in its own frame.
# ALLOC: the running call has a bytes result of `payload` bytes and asks for a segment to write it
# into; sent at once, answered by a GRANT frame. OK_SHM: the result is ShmRef(name, length) in the
# granted segment (also an item status inside OK_MAP).
OK, ERROR, OK_JSON, OK_PICKLED, RETIRE, OK_MAP, PROGRESS, ALLOC, OK_SHM = 0, 1, 2, 3, 4, 5, 6, 7, 8
# A frame holding this marker alone says the worker has finished starting.
READY = "ready"
# Control frames, loop -> worker (tuples, not lists): (GRANT, call_id, segment name | None) answers an
# ALLOC (None: no room, send the bytes inline); (FORGET, [names]): those segments are unlinked, unmap them.
GRANT, FORGET = "grant", "forget"

_FAST = 0.0005  # a task whose average run is under this is worth coalescing behind
_COALESCE_FOR = 0.001  # a finished result waits at most this long for company
_MAX_BATCH = 256
_PLAIN = frozenset({int, float, str, bool, type(None)})
_PAGE = os.sysconf("SC_PAGE_SIZE")
_CPU_EXACT = 0.0005  # a call running at least this long reads the CPU clock at its end (else its batch does)
_PROGRESS_EVERY = 0.05  # at most one progress report per call this often (the final one always goes)


@dataclass(frozen=True)
class WorkerOptions:
    slot: int
    modules: tuple[str, ...]
    table_name: str
    table_slots: int
    nice: int = 0
    max_tasks: int = 0  # 0: no limit
    max_memory: int = 0  # bytes of RSS; 0: no limit
    debug: bool = False
    shm_threshold: int | None = None  # bytes results larger than this ask for a segment; None: never


def main(sock: socket.socket, options: WorkerOptions) -> None:
    """Entry point of a worker process (started by the pool through the forkserver)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the service's to handle, not ours
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # its own process group: a kill takes whatever the task started with it
    if options.nice:
        with contextlib.suppress(OSError):
            os.nice(options.nice)
    registry.load(options.modules)
    table = WorkerTable.attach(options.table_name, options.table_slots)
    row = RowWriter(table, options.slot, os.getpid())
    link = _Link(BlockingFrames(sock, buffered=True), options.shm_threshold)
    row.idle(time.process_time())
    try:
        link.frames.send(READY)
        _serve(link, row, options)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the pool closed our socket while we wrote: it is stopping us
    finally:
        del row
        link.maps.close()
        table.close()


class _Link:
    """The worker's end of the wire: frames, the calls received and not yet run, and the segments
    it has mapped. Control frames (grants, forgets) can arrive between call batches at any time."""

    __slots__ = ("cpu", "frames", "maps", "pending", "stale", "threshold")

    def __init__(self, frames: BlockingFrames, threshold: int | None) -> None:
        self.frames = frames
        self.threshold = threshold
        self.maps = Mappings()
        self.pending: deque[tuple[Any, ...]] = deque()
        self.cpu = time.process_time()  # CPU seconds at the end of the last call (or of the last batch)
        self.stale = False  # calls ran since `cpu` was read (tiny ones: it is read at the end of their batch)

    def receive(self) -> bool:
        """Wait for the next batch of calls (into `pending`); False once the service closed the socket."""
        while True:
            frame = self.frames.recv()
            if frame is None:
                return False
            if type(frame) is list:
                self.pending.extend(frame)
                return True
            self._control(frame)

    def segment_for(self, call_id: int, size: int) -> tuple[str, memoryview] | None:
        """Ask the service for a segment of at least `size` bytes for this call's result; None: no room."""
        self.frames.send([(call_id, ALLOC, size, 0.0)])
        while True:
            frame = self.frames.recv()
            if frame is None:
                raise ConnectionResetError("the service closed the socket")
            if type(frame) is list:
                self.pending.extend(frame)  # calls pipelined behind this one: run after it
            elif frame[0] == GRANT and frame[1] == call_id:
                return None if frame[2] is None else (frame[2], self.maps.get(frame[2]))
            else:
                self._control(frame)

    def _control(self, frame: tuple[Any, ...]) -> None:
        if frame[0] == FORGET:
            self.maps.forget(frame[1])


def _serve(link: _Link, row: RowWriter, options: WorkerOptions) -> None:
    pending = link.pending
    frames = link.frames
    out: list[tuple[Any, ...]] = []
    first_unsent = 0.0
    averages: dict[str, float] = {}
    while True:
        if not pending:
            if out:
                if link.stale:  # the CPU seconds of the batch's tiny calls: one clock read for all of them
                    link.stale = False
                    link.cpu = time.process_time()
                    row.idle(link.cpu)
                _send(frames, out)
                out = []
            if not link.receive():
                return  # the service closed our socket: stop
            continue
        call = pending.popleft()
        name = call[2]
        if out and (
            averages.get(name, 1.0) > _FAST
            or time.perf_counter() - first_unsent > _COALESCE_FOR
            or len(out) >= _MAX_BATCH
        ):
            _send(frames, out)
            out = []
        result = _run(call, row, link)
        averages[name] = 0.8 * averages.get(name, result[3]) + 0.2 * result[3]
        if not out:
            first_unsent = time.perf_counter()
        out.append(result)
        reason = _retire_reason(row, options)
        if reason:
            out.append((0, RETIRE, reason, 0.0))
            _send(frames, out)
            row.retire(reason, time.process_time())
            return  # calls still in `pending` were not started: the pool hands them to another worker


def _run(call: tuple[Any, ...], row: RowWriter, link: _Link) -> tuple[Any, ...]:
    call_id, kind, name, payload, encode, report, shared = call
    # The row's CPU seconds at the start are those at the end of the previous call: one clock read
    # (a real system call for CPU time) per call instead of two, and for tiny calls one per batch.
    row.begin(call_id, name, time.monotonic(), link.cpu)
    if report:
        context.set_sink(_ProgressSender(link.frames, call_id))
    views: list[memoryview] | None = None
    start = time.perf_counter()
    try:
        if kind == KIND_TASK:
            fn, view_param = _lookup(name)
            if shared or view_param is not None:
                views = []
                payload = _materialize(payload, view_param, link.maps, views)
            value = fn(**payload)
        elif kind == KIND_MAP:
            value = _run_chunk(name, payload, shared, link, call_id)
        else:
            fn_blob, args, kwargs = pickle.loads(payload)
            value = _function(fn_blob)(*args, **kwargs)
        status, value = (OK_MAP, value) if kind == KIND_MAP else _encode(value, encode, link, call_id)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are task outcomes too
        status, value = ERROR, describe_exception(exc)
    finally:
        if report:
            context.set_sink(None)
        if views:
            _release(views)
    elapsed = time.perf_counter() - start
    if elapsed >= _CPU_EXACT:
        link.cpu = time.process_time()
    else:  # a tiny call: its CPU time is read once its batch is done (see _serve), not per call
        link.stale = True
    row.end(link.cpu)
    return (call_id, status, value, elapsed)


def _run_chunk(
    name: str, items: list[dict[str, Any]], shared: bool, link: _Link, call_id: int
) -> list[tuple[int, Any, float]]:
    """A map chunk: each item runs and fails on its own; results are JSON-encoded here."""
    fn, view_param = _lookup(name)
    out = []
    for kwargs in items:
        start = time.perf_counter()
        views: list[memoryview] = []
        try:
            if shared or view_param is not None:
                kwargs = _materialize(kwargs, view_param, link.maps, views)
            status, value = _encode(fn(**kwargs), True, link, call_id)
        except BaseException as exc:  # noqa: BLE001 - one item's failure is that item's result
            status, value = ERROR, describe_exception(exc)
        finally:
            if views:
                _release(views)
        out.append((status, value, time.perf_counter() - start))
    return out


def _materialize(
    kwargs: dict[str, Any], view_param: str | None, maps: Mappings, views: list[memoryview]
) -> dict[str, Any]:
    """Turn ShmRef handles into what the task asked for: a read-only memoryview of the segment for
    the parameter annotated `memoryview` (zero copy; valid during the call only), bytes for any other
    (one copy). Inline bytes for a `memoryview` parameter are wrapped in one (read-only, no copy)."""
    out = dict(kwargs)
    for key, value in kwargs.items():
        if type(value) is ShmRef:
            segment = maps.get(value.name)
            if key == view_param:
                view = segment[: value.length].toreadonly()
                views.append(view)
                out[key] = view
            else:
                out[key] = bytes(segment[: value.length])
        elif key == view_param and isinstance(value, bytes):
            out[key] = memoryview(value)
    return out


def _release(views: list[memoryview]) -> None:
    for view in views:
        with contextlib.suppress(BufferError):  # the task kept something built on it; it goes with that
            view.release()


class _ProgressSender:
    """The progress sink of one call: sends (done, total, message) to the service at once, at
    most every _PROGRESS_EVERY seconds, and always the report that says the work is complete."""

    def __init__(self, frames: BlockingFrames, call_id: int) -> None:
        self._frames = frames
        self._call_id = call_id
        self._last = 0.0

    def __call__(self, done: float, total: float | None, message: str | None) -> None:
        now = time.monotonic()
        complete = total is not None and done >= total
        if now - self._last < _PROGRESS_EVERY and not complete:
            return
        self._last = now
        report = (
            float(done),
            None if total is None else float(total),
            None if message is None else str(message)[:1000],
        )
        self._frames.send([(self._call_id, PROGRESS, report, 0.0)])


def _encode(value: Any, encode: bool, link: _Link | None = None, call_id: int = 0) -> tuple[int, Any]:
    """Bytes stay bytes (written into a granted segment when larger than the threshold); anything
    else becomes JSON here, off the loop, when the caller asks; any other value that is not a plain
    scalar is pickled on its own (one that will not pickle fails this call only)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return _binary(value, link, call_id)
    if encode:
        try:
            return OK_JSON, orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
        except orjson.JSONEncodeError as exc:
            return ERROR, ("TypeError", f"the task's result is not JSON-serialisable: {exc}", "")
    if type(value) in _PLAIN:
        return OK, value
    try:
        return OK_PICKLED, pickle.dumps(value, protocol=5)
    except BaseException as exc:  # noqa: BLE001 - even a __reduce__ that raises SystemExit
        kind, message, tb = describe_exception(exc)
        return ERROR, (kind, f"the task's result cannot be sent back: {message}", tb)


def _binary(value: bytes | bytearray | memoryview, link: _Link | None, call_id: int) -> tuple[int, Any]:
    size = len(value) if type(value) is bytes else memoryview(value).nbytes
    if link is None or link.threshold is None or size <= link.threshold:
        return OK, value if type(value) is bytes else bytes(value)
    data = memoryview(value)
    if not data.c_contiguous:
        data = memoryview(data.tobytes())
    granted = link.segment_for(call_id, size)
    if granted is None:  # no room in shared memory: inline, as a small result would go
        return OK, data.tobytes()
    name, segment = granted
    segment[:size] = data.cast("B")
    return OK_SHM, ShmRef(name, size)


_TASKS: dict[str, tuple[Any, str | None]] = {}
_FUNCTIONS: dict[bytes, Any] = {}  # executor calls' plain functions, by their pickle


def _function(blob: bytes) -> Any:
    """An executor call's function: a plain function (pickled as its name) is unpickled once and
    kept; anything else (a partial, a callable object) is unpickled afresh for every call."""
    fn = _FUNCTIONS.get(blob)
    if fn is None:
        fn = pickle.loads(blob)
        if type(fn) is FunctionType and len(_FUNCTIONS) < 256:
            _FUNCTIONS[blob] = fn
    return fn


def _lookup(name: str) -> tuple[Any, str | None]:
    """The task's function, and the name of its parameter annotated `memoryview` (if any)."""
    found = _TASKS.get(name)
    if found is None:
        spec = registry.get(name)
        if spec is None:
            raise LookupError(f"task {name!r} is not registered in this worker")
        found = _TASKS[name] = (spec.fn, spec.view_param)
    return found


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


def _send(frames: BlockingFrames, out: list[tuple[Any, ...]]) -> None:
    try:
        header, payload = dumps(out)
    except BaseException:  # noqa: BLE001 - cannot happen for plain data; keep the worker alive anyway
        safe = []
        for result in out:
            try:
                pickle.dumps(result, protocol=5)
                safe.append(result)
            except BaseException as exc:  # noqa: BLE001
                kind, message, tb = describe_exception(exc)
                safe.append((result[0], ERROR, (kind, f"the result could not be sent back: {message}", tb), result[3]))
        header, payload = dumps(safe)
    frames.send_raw(header, payload)


def _retire_reason(row: RowWriter, options: WorkerOptions) -> int:
    """Checked after every task: the task count, and the RSS once the peak RSS passed the limit
    (getrusage is a cheap syscall; /proc is read only when the peak says it might be over)."""
    if options.max_tasks and row.tasks_done >= options.max_tasks:
        return RETIRE_MAX_TASKS
    if (
        options.max_memory
        and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > options.max_memory
        and rss_bytes() > options.max_memory
    ):
        return RETIRE_MAX_MEMORY
    return 0


def rss_bytes() -> int:
    """This process's resident set size, from /proc (one small read; 0 where there is no /proc)."""
    return _statm_rss("/proc/self/statm")


def rss_of(pid: int) -> int:
    """Another process's resident set size (0 if it is gone or there is no /proc)."""
    return _statm_rss(f"/proc/{pid}/statm")


def _statm_rss(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0
