"""The worker state table: one fixed-size row per worker slot in a shared-memory segment.

Each worker writes only its own row (state, current call, start time, counters); the service reads
every row for /v1/workers, /metrics and timeout supervision without asking anyone over a pipe.
A row is a handful of aligned machine words written with struct.pack_into. A reader may see a row
mid-update, with fields from before and after the write (say the new call's id with the previous
start time): fine for a snapshot, never enough for a decision. The pool acts on a start time only
when two reads a supervision tick apart agree, and reads a dead worker's row only once it is gone.
"""

from __future__ import annotations

import contextlib
import struct
import time
from dataclasses import dataclass
from multiprocessing import shared_memory

from workers.shm_files import Attached

# pid, state, call id, started_at (monotonic), cpu seconds, tasks done, exit reason, task name
_ROW = struct.Struct("<qqqddqq48s")
ROW_SIZE = 128
assert _ROW.size <= ROW_SIZE

STARTING, IDLE, BUSY, RETIRING, EMPTY = 0, 1, 2, 3, 4
STATE_NAMES = {STARTING: "starting", IDLE: "idle", BUSY: "busy", RETIRING: "retiring", EMPTY: "empty"}

# Why a worker retired itself (written before it exits between tasks).
RETIRE_NONE, RETIRE_MAX_TASKS, RETIRE_MAX_MEMORY = 0, 1, 2
RETIRE_REASONS = {RETIRE_MAX_TASKS: "max_tasks", RETIRE_MAX_MEMORY: "max_memory"}


@dataclass(frozen=True)
class WorkerRow:
    slot: int
    pid: int
    state: int
    call_id: int
    started_at: float
    cpu_seconds: float
    tasks_done: int
    retire_reason: int
    task: str | None  # the task it runs now (busy rows only)
    last_task: str | None = None  # the task it runs or last ran (what its output belongs to)

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, "starting")

    def task_started_at(self) -> float | None:
        """Unix time the running task started, None unless busy. The row holds a CLOCK_MONOTONIC
        stamp (system-wide, so the worker's stamp means the same here); this converts it."""
        if self.state != BUSY or self.started_at <= 0:
            return None
        return time.time() - (time.monotonic() - self.started_at)


class WorkerTable:
    """A view of the table; the pool creates (and unlinks) it, workers attach by name."""

    def __init__(self, shm: shared_memory.SharedMemory | Attached, slots: int, owner: bool) -> None:
        self._shm = shm
        self.buf: memoryview = shm.buf  # type: ignore[assignment]  # never None while open
        self.slots = slots
        self._owner = owner
        self.name = shm.name

    @classmethod
    def create(cls, slots: int, name: str | None = None) -> WorkerTable:
        shm = shared_memory.SharedMemory(name=name, create=True, size=max(1, slots) * ROW_SIZE)
        table = cls(shm, slots, owner=True)
        for slot in range(slots):
            table.clear(slot)
        return table

    @classmethod
    def attach(cls, name: str, slots: int) -> WorkerTable:
        return cls(Attached(name), slots, owner=False)  # no resource tracker in a worker (shm_files.py)

    def clear(self, slot: int) -> None:
        _ROW.pack_into(self.buf, slot * ROW_SIZE, 0, EMPTY, 0, 0.0, 0.0, 0, 0, b"")

    def read(self, slot: int) -> WorkerRow:
        pid, state, call_id, started, cpu, done, reason, name = _ROW.unpack_from(self.buf, slot * ROW_SIZE)
        last = name.rstrip(b"\0").decode("utf-8", "replace") or None
        return WorkerRow(slot, pid, state, call_id, started, cpu, done, reason, last if state == BUSY else None, last)

    def rows(self) -> list[WorkerRow]:
        return [self.read(slot) for slot in range(self.slots)]

    def close(self) -> None:
        """Detach; the owner also removes the segment from /dev/shm."""
        del self.buf
        with contextlib.suppress(BufferError):  # a view still alive somewhere; unlink still frees the name
            self._shm.close()
        if self._owner and isinstance(self._shm, shared_memory.SharedMemory):
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()


class RowWriter:
    """A worker's handle on its own row: cheap writes on every task start and end."""

    def __init__(self, table: WorkerTable, slot: int, pid: int) -> None:
        self._buf = table.buf
        self._off = slot * ROW_SIZE
        self._pid = pid
        self._done = 0
        self._names: dict[str, bytes] = {}
        self._last = b""
        _ROW.pack_into(self._buf, self._off, pid, STARTING, 0, 0.0, 0.0, 0, 0, b"")

    def idle(self, cpu_seconds: float) -> None:
        # The last task's name stays: output the relay reads just after a task ends is still its.
        _ROW.pack_into(self._buf, self._off, self._pid, IDLE, 0, 0.0, cpu_seconds, self._done, 0, self._last)

    def begin(self, call_id: int, task: str, started_at: float, cpu_seconds: float) -> None:
        name = self._names.get(task)
        if name is None:
            name = self._names[task] = task.encode()[:48]
        self._last = name
        _ROW.pack_into(
            self._buf, self._off, self._pid, BUSY, call_id, started_at, cpu_seconds, self._done, 0, name
        )

    def end(self, cpu_seconds: float) -> None:
        self._done += 1
        self.idle(cpu_seconds)

    def retire(self, reason: int, cpu_seconds: float) -> None:
        _ROW.pack_into(self._buf, self._off, self._pid, RETIRING, 0, 0.0, cpu_seconds, self._done, reason, b"")

    @property
    def tasks_done(self) -> int:
        return self._done
