"""The loop inside each worker process: receive a batch of calls, run them, send the outcomes.

Every way a task can end (a value, any exception, SystemExit, KeyboardInterrupt, a result that will
not pickle or encode) becomes one plain result tuple, so the worker lives on and the service only
ever sees data. Results are coalesced: while the next call is one that usually finishes in well
under a millisecond, finished results wait (at most ~1 ms) and go back in one frame.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson

from workers import registry
from workers.framing import BlockingFrames, dumps
from workers.stats import RETIRE_MAX_MEMORY, RETIRE_MAX_TASKS, RowWriter, WorkerTable

# Messages, loop -> worker: a list of calls (call_id, kind, target, args, kwargs, encode_json).
KIND_TASK, KIND_FUNCTION = 0, 1
# Messages, worker -> loop: a list of results (call_id, status, payload, elapsed_seconds).
# OK_JSON: the payload is the value already encoded as JSON bytes (done here, off the loop).
OK, ERROR, OK_JSON = 0, 1, 2
# A frame holding this marker alone says the worker has finished starting.
READY = "ready"

_FAST = 0.0005  # a task whose average run is under this is worth coalescing behind
_COALESCE_FOR = 0.001  # a finished result waits at most this long for company
_MAX_BATCH = 256
_MEMORY_CHECK_EVERY = 0.05


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
    if options.nice:
        with contextlib.suppress(OSError):
            os.nice(options.nice)
    registry.load(options.modules)
    table = WorkerTable.attach(options.table_name, options.table_slots)
    row = RowWriter(table, options.slot, os.getpid())
    frames = BlockingFrames(sock)
    row.idle(time.process_time())
    frames.send(READY)
    try:
        _serve(frames, row, options)
    finally:
        del row
        table.close()


def _serve(frames: BlockingFrames, row: RowWriter, options: WorkerOptions) -> None:
    pending: deque[tuple[Any, ...]] = deque()
    out: list[tuple[Any, ...]] = []
    first_unsent = 0.0
    averages: dict[str, float] = {}
    next_memory_check = 0.0
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
        name = call[2] if call[1] == KIND_TASK else getattr(call[2], "__qualname__", "function")
        if out and (
            averages.get(name, 1.0) > _FAST
            or time.perf_counter() - first_unsent > _COALESCE_FOR
            or len(out) >= _MAX_BATCH
        ):
            _send(frames, out)
            out = []
        result = _run(call, name, row)
        averages[name] = 0.8 * averages.get(name, result[3]) + 0.2 * result[3]
        if not out:
            first_unsent = time.perf_counter()
        out.append(result)
        reason = _retire_reason(row, options, next_memory_check)
        if options.max_memory and time.perf_counter() >= next_memory_check:
            next_memory_check = time.perf_counter() + _MEMORY_CHECK_EVERY
        if reason:
            _send(frames, out)
            row.retire(reason, time.process_time())
            return  # calls still in `pending` were not started: the pool hands them to another worker


def _run(call: tuple[Any, ...], name: str, row: RowWriter) -> tuple[Any, ...]:
    call_id, kind, target, args, kwargs, encode = call
    row.begin(call_id, name, time.monotonic(), time.process_time())
    start = time.perf_counter()
    try:
        fn = target if kind == KIND_FUNCTION else _lookup(target)
        value = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are task outcomes too
        status, value = ERROR, describe_exception(exc)
    else:
        status, value = _encode(value, encode)
    elapsed = time.perf_counter() - start
    row.end(time.process_time())
    return (call_id, status, value, elapsed)


def _encode(value: Any, encode: bool) -> tuple[int, Any]:
    """Bytes stay bytes; anything else becomes JSON here, off the loop, when the caller asks."""
    if isinstance(value, bytearray | memoryview):
        return OK, bytes(value)
    if not encode or isinstance(value, bytes):
        return OK, value
    try:
        return OK_JSON, orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError as exc:
        return ERROR, ("TypeError", f"the task's result is not JSON-serialisable: {exc}", "")


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
    except Exception:  # noqa: BLE001 - a result that will not pickle: send the others, fail that one
        safe = []
        for result in out:
            try:
                pickle.dumps(result, protocol=5)
                safe.append(result)
            except Exception as exc:  # noqa: BLE001
                kind, message, tb = describe_exception(exc)
                safe.append((result[0], ERROR, (kind, f"the result could not be sent back: {message}", tb), result[3]))
        header, payload = dumps(safe)
    frames.send_raw(header, payload)


def _retire_reason(row: RowWriter, options: WorkerOptions, next_memory_check: float) -> int:
    if options.max_tasks and row.tasks_done >= options.max_tasks:
        return RETIRE_MAX_TASKS
    if options.max_memory and time.perf_counter() >= next_memory_check and rss_bytes() > options.max_memory:
        return RETIRE_MAX_MEMORY
    return 0


def rss_bytes() -> int:
    """This process's resident set size, from /proc (one small read; 0 where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
