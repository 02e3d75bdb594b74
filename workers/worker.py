"""The loop inside each worker process: receive a batch of calls, run them, send the outcomes.

Every way a task can end (a value, any exception, SystemExit, KeyboardInterrupt, a result that will
not pickle or encode) becomes one plain result tuple, so the worker lives on and the service only
ever sees data. Results are coalesced: while the next call is one that usually finishes in well
under a millisecond, finished results wait (at most ~1 ms) and go back in one frame.

Anything user-defined crosses the socket pickled on its own (an executor call's function and
arguments, a result that is not a plain scalar), so a call or a result that cannot be decoded on
the other side fails that call only, never the frame it travels in.
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
from typing import Any

import orjson

from workers import context, registry
from workers.framing import BlockingFrames, dumps
from workers.stats import RETIRE_MAX_MEMORY, RETIRE_MAX_TASKS, RowWriter, WorkerTable

# Messages, loop -> worker: a list of calls (call_id, kind, name, payload, encode_json, progress).
# KIND_TASK: payload is the kwargs of the registered task `name` (plain data).
# KIND_FUNCTION: payload is pickle.dumps((fn, args, kwargs)) of an executor call.
# KIND_MAP: payload is a list of kwargs for task `name`, run one after the other (a map chunk).
# progress: whether the caller wants the task's progress() reports.
KIND_TASK, KIND_FUNCTION, KIND_MAP = 0, 1, 2
# Messages, worker -> loop: a list of results (call_id, status, payload, elapsed_seconds).
# OK: the payload is the value (bytes or a plain scalar). OK_JSON: the value already encoded as JSON
# bytes (done here, off the loop). OK_PICKLED: the value pickled on its own. ERROR: (type, message,
# traceback) strings. RETIRE (call id 0, payload the reason): the worker exits after this frame.
# OK_MAP: the payload is a list of (status, payload, elapsed), one per item of a map chunk.
# PROGRESS: (done, total, message) reported by the running call; sent at once, in its own frame.
OK, ERROR, OK_JSON, OK_PICKLED, RETIRE, OK_MAP, PROGRESS = 0, 1, 2, 3, 4, 5, 6
# A frame holding this marker alone says the worker has finished starting.
READY = "ready"

_FAST = 0.0005  # a task whose average run is under this is worth coalescing behind
_COALESCE_FOR = 0.001  # a finished result waits at most this long for company
_MAX_BATCH = 256
_PLAIN = frozenset({int, float, str, bool, type(None)})
_PAGE = os.sysconf("SC_PAGE_SIZE")
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
    frames = BlockingFrames(sock)
    row.idle(time.process_time())
    try:
        frames.send(READY)
        _serve(frames, row, options)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the pool closed our socket while we wrote: it is stopping us
    finally:
        del row
        table.close()


def _serve(frames: BlockingFrames, row: RowWriter, options: WorkerOptions) -> None:
    pending: deque[tuple[Any, ...]] = deque()
    out: list[tuple[Any, ...]] = []
    first_unsent = 0.0
    averages: dict[str, float] = {}
    while True:
        if not pending:
            if out:
                _send(frames, out)
                out = []
            batch = frames.recv()
            if batch is None:
                return  # the service closed our socket: stop
            pending.extend(batch)
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
        result = _run(call, row, frames)
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


def _run(call: tuple[Any, ...], row: RowWriter, frames: BlockingFrames) -> tuple[Any, ...]:
    call_id, kind, name, payload, encode, report = call
    row.begin(call_id, name, time.monotonic(), time.process_time())
    if report:
        context.set_sink(_ProgressSender(frames, call_id))
    start = time.perf_counter()
    try:
        if kind == KIND_TASK:
            value = _lookup(name)(**payload)
        elif kind == KIND_MAP:
            value = _run_chunk(_lookup(name), payload)
        else:
            fn, args, kwargs = pickle.loads(payload)
            value = fn(*args, **kwargs)
        status, value = (OK_MAP, value) if kind == KIND_MAP else _encode(value, encode)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are task outcomes too
        status, value = ERROR, describe_exception(exc)
    finally:
        context.set_sink(None)
    elapsed = time.perf_counter() - start
    row.end(time.process_time())
    return (call_id, status, value, elapsed)


def _run_chunk(fn: Any, items: list[dict[str, Any]]) -> list[tuple[int, Any, float]]:
    """A map chunk: each item runs and fails on its own; results are JSON-encoded here."""
    out = []
    for kwargs in items:
        start = time.perf_counter()
        try:
            status, value = _encode(fn(**kwargs), True)
        except BaseException as exc:  # noqa: BLE001 - one item's failure is that item's result
            status, value = ERROR, describe_exception(exc)
        out.append((status, value, time.perf_counter() - start))
    return out


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


def _encode(value: Any, encode: bool) -> tuple[int, Any]:
    """Bytes stay bytes; anything else becomes JSON here, off the loop, when the caller asks; any
    other value that is not a plain scalar is pickled on its own (one that will not pickle fails
    this call only)."""
    if type(value) is bytes:
        return OK, value
    if isinstance(value, bytes | bytearray | memoryview):
        return OK, bytes(value)
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
def _lookup(name: str) -> Any:
    spec = registry.get(name)
    if spec is None:
        raise LookupError(f"task {name!r} is not registered in this worker")
    return spec.fn


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
