"""The loop inside each worker process: receive a batch of calls, run them, send the outcomes.

    service (workers/local/pool.py)        this process
    ─────────────────────────              ────────────
    frame: [call, call, ...]      ──▶      _Link.receive ─▶ pending
                                                              │ one at a time
                                                              ▼
                                           _run: own row in the worker table (start, CPU seconds)
                                                 execution.Execution.run (the task, its encoding)
                                                              │
    frame: [result, result, ...]  ◀──      coalesced while the next call is a tiny one (≤ ~1 ms)
    [PROGRESS_REPORT] / [SEGMENT_REQUEST]  sent at once, from inside the running call
    GRANT_SEGMENT / FORGET_SEGMENTS  ──▶   read between calls (and while a call waits for a grant)

This module keeps only the transport: frames over the socket pair (workers/framing.py, constants in
workers/protocol.py), the shared-memory mappings and grants, the worker table row, result
coalescing and retirement. What a call does, how its result is encoded and how its failure is told
is workers/execution.py, shared with the Dask runner.

Every way a task can end (a value, any exception, SystemExit, KeyboardInterrupt, a result that will
not pickle or encode) becomes one plain result row, so the worker lives on and the service only
ever sees data. Results are coalesced: while the next call is one that usually finishes in well
under a millisecond, finished results wait (at most ~1 ms) and go back in one frame.

Anything user-defined crosses the socket pickled on its own (an executor call's function and
arguments, a result that is not a plain scalar), so a call or a result that cannot be decoded on
the other side fails that call only, never the frame it travels in.

Large binary payloads do not cross the socket at all (workers/shm.py): an argument arrives as a
`ShmRef` to a segment the service filled, which the task gets as a read-only memoryview (parameter
annotated `memoryview`, zero copy) or as bytes (annotated `bytes`: one copy); a bytes result larger
than the threshold is written into a segment the service grants on request (SEGMENT_REQUEST), and
only its name and length go back.

The same loop is the runner child of a Dask worker (`?isolate=process`, workers/dask/remote.py):
started with `table_name=""`, it keeps no row (nobody reads one: the Dask worker thread watches the
call's deadline itself), and with no threshold and no limits it never asks for a segment or retires.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers import hooks, registry
from workers.execution import Execution, Progress, Report, describe_exception
from workers.framing import BlockingFrames, dumps
from workers.protocol import (
    CALL_STREAM,
    FORGET_SEGMENTS,
    GRANT_SEGMENT,
    PROGRESS_REPORT,
    RESULT_ERROR,
    RESULT_JSON,
    RETIRE_NOTICE,
    SEGMENT_REQUEST,
    STREAM_ACK,
    STREAM_CLOSE,
    STREAM_ITEM,
    WORKER_READY,
    WORKER_START_FAILED,
)
from workers.shm import Mappings
from workers.stats import RETIRE_MAX_MEMORY, RETIRE_MAX_TASKS, RowWriter, WorkerTable
from workers.streaming import WINDOW, run_stream

_FAST = 0.0005  # a task whose average run is under this is worth coalescing behind
_COALESCE_FOR = 0.001  # a finished result waits at most this long for company
_MAX_BATCH = 256
_PAGE = os.sysconf("SC_PAGE_SIZE")
_CPU_EXACT = 0.0005  # a call running at least this long reads the CPU clock at its end (else its batch does)

_Run = Callable[[int, str, Any, bool, bool, int, "Progress | None"], "tuple[int, Any]"]


@dataclass(frozen=True)
class WorkerOptions:
    slot: int
    modules: tuple[str, ...]
    table_name: str  # the pool's worker table; "": none (a Dask runner child)
    table_slots: int
    nice: int = 0
    max_tasks: int = 0  # 0: no limit
    max_memory: int = 0  # bytes of RSS; 0: no limit
    debug: bool = False
    shm_threshold: int | None = None  # bytes results larger than this ask for a segment; None: never


START_FAILED_EXIT = 3  # the exit code of a worker whose on_worker_start hook (or preload) raised


def main(sock: socket.socket, options: WorkerOptions) -> int:
    """Entry point of a worker process (forked by the pool's worker parent, workers/local/parent.py,
    or a Dask runner child started by workers/dask/remote.py); returns the exit code.

    The task modules are imported and the preloads have run (in the parent, where this process was
    forked from; a Dask runner child runs them here), then the on_worker_start hooks run, before
    WORKER_READY. A hook that raises is a start failure: WORKER_START_FAILED with its traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the service's to handle, not ours
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # its own process group: a kill takes whatever the task started with it
    if options.nice:
        with contextlib.suppress(OSError):
            os.nice(options.nice)
    frames = BlockingFrames(sock, buffered=True)
    try:
        registry.load(options.modules)
        hooks.run_preloads(options.modules)  # built in the parent already: nothing runs again
        hooks.run_worker_start(options.modules)
    except BaseException as exc:  # noqa: BLE001 - any failure to start is told, then this process ends
        line = str(exc) if isinstance(exc, hooks.HookFailed) else f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            frames.send((WORKER_START_FAILED, line, hooks.hook_traceback(exc)))
        return START_FAILED_EXIT
    table = WorkerTable.attach(options.table_name, options.table_slots) if options.table_name else None
    row: RowWriter | _NoRow = _NoRow() if table is None else RowWriter(table, options.slot, os.getpid())
    link = _Link(frames)
    execution = link.execution = Execution(
        maps=link.maps, threshold=options.shm_threshold, segment_for=link.segment_for
    )
    row.idle(time.process_time())
    try:
        link.frames.send(WORKER_READY)
        _serve(link, row, options, execution.run)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the pool closed our socket while we wrote: it is stopping us
    finally:
        del row
        link.maps.close()
        if table is not None:
            table.close()
    return 0


class _NoRow:
    """The row of a worker without a table (a Dask runner child): counts tasks, writes nothing."""

    __slots__ = ("tasks_done",)

    def __init__(self) -> None:
        self.tasks_done = 0

    def idle(self, cpu_seconds: float) -> None:
        pass

    def begin(self, call_id: int, task: str, started_at: float, cpu_seconds: float) -> None:
        pass

    def end(self, cpu_seconds: float) -> None:
        self.tasks_done += 1

    def retire(self, reason: int, cpu_seconds: float) -> None:
        pass


class _Link:
    """The worker's end of the wire: frames, the calls received and not yet run, and the segments
    it has mapped. Control frames (grants, forgets) can arrive between call batches at any time."""

    __slots__ = ("closed", "cpu", "execution", "frames", "maps", "pending", "stale", "stream")

    def __init__(self, frames: BlockingFrames) -> None:
        self.frames = frames
        self.maps = Mappings()
        self.pending: deque[tuple[Any, ...]] = deque()
        self.cpu = time.process_time()  # CPU seconds at the end of the last call (or of the last batch)
        self.stale = False  # calls ran since `cpu` was read (tiny ones: it is read at the end of their batch)
        self.execution: Execution | None = None
        self.stream = [0, 0, 0]  # the running CALL_STREAM: [call id, items sent, items taken (acked)]
        self.closed: deque[int] = deque(maxlen=64)  # streams whose consumer went away (STREAM_CLOSE)

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
        self.frames.send([(call_id, SEGMENT_REQUEST, size, 0.0)])
        while True:
            frame = self.frames.recv()
            if frame is None:
                raise ConnectionResetError("the service closed the socket")
            if type(frame) is list:
                self.pending.extend(frame)  # calls pipelined behind this one: run after it
            elif frame[0] == GRANT_SEGMENT and frame[1] == call_id:
                return None if frame[2] is None else (frame[2], self.maps.get(frame[2]))
            else:
                self._control(frame)

    def report(self, call_id: int, report: Report) -> None:
        """Send a progress report of the running call at once, in its own frame."""
        self.frames.send([(call_id, PROGRESS_REPORT, report, 0.0)])

    def run_stream(self, call_id: int, name: str, payload: Any, shared: bool, progress: Progress | None) -> Any:
        """A CALL_STREAM (workers/streaming.py), its items sent by `stream_item`; one closed
        before it started (its consumer went away while it waited here) ends at once with 0 items."""
        assert self.execution is not None
        if call_id in self.closed:
            return RESULT_JSON, b"0"
        self.stream = [call_id, 0, 0]
        try:
            return run_stream(self.execution, name, payload, shared, call_id, progress, self.stream_item)
        finally:
            self.stream = [0, 0, 0]

    def stream_item(self, call_id: int, item: bytes) -> bool:
        """Send one item of the running stream at once; False once its consumer is gone. Before the
        generator is asked for the next item, wait while WINDOW items are sent and not taken (the
        service's STREAM_ACK frames say how many it took), reading what else arrives meanwhile."""
        stream = self.stream
        self.frames.send([(call_id, STREAM_ITEM, item, 0.0)])
        stream[1] += 1
        while call_id not in self.closed:
            if stream[1] - stream[2] < WINDOW and not self.frames.ready():
                return True
            frame = self.frames.recv()
            if frame is None:
                raise ConnectionResetError("the service closed the socket")
            if type(frame) is list:
                self.pending.extend(frame)  # calls pipelined behind this one: run after it
            else:
                self._control(frame)
        return False

    def _control(self, frame: tuple[Any, ...]) -> None:
        if frame[0] == FORGET_SEGMENTS:
            self.maps.forget(frame[1])
        elif frame[0] == STREAM_ACK:
            if frame[1] == self.stream[0]:
                self.stream[2] = max(self.stream[2], frame[2])
        elif frame[0] == STREAM_CLOSE:
            self.closed.append(frame[1])


def _serve(link: _Link, row: RowWriter | _NoRow, options: WorkerOptions, run: _Run) -> None:
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
        result = _run(call, row, link, run)
        averages[name] = 0.8 * averages.get(name, result[3]) + 0.2 * result[3]
        if not out:
            first_unsent = time.perf_counter()
        out.append(result)
        reason = _retire_reason(row, options)
        if reason:
            out.append((0, RETIRE_NOTICE, reason, 0.0))
            _send(frames, out)
            row.retire(reason, time.process_time())
            return  # calls still in `pending` were not started: the pool hands them to another worker


def _run(call: tuple[Any, ...], row: RowWriter | _NoRow, link: _Link, run: _Run) -> tuple[Any, ...]:
    call_id, kind, name, payload, encode, report, shared = call
    # The row's CPU seconds at the start are those at the end of the previous call: one clock read
    # (a real system call for CPU time) per call instead of two, and for tiny calls one per batch.
    row.begin(call_id, name, time.monotonic(), link.cpu)
    start = time.perf_counter()
    progress = Progress(link.report, call_id) if report else None
    if kind == CALL_STREAM:
        status, value = link.run_stream(call_id, name, payload, shared, progress)
    else:
        status, value = run(kind, name, payload, encode, shared, call_id, progress)
    elapsed = time.perf_counter() - start
    if elapsed >= _CPU_EXACT:
        link.cpu = time.process_time()
    else:  # a tiny call: its CPU time is read once its batch is done (see _serve), not per call
        link.stale = True
    row.end(link.cpu)
    return (call_id, status, value, elapsed)


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
                safe.append(
                    (result[0], RESULT_ERROR, (kind, f"the result could not be sent back: {message}", tb), result[3])
                )
        header, payload = dumps(safe)
    frames.send_raw(header, payload)


def _retire_reason(row: RowWriter | _NoRow, options: WorkerOptions) -> int:
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
