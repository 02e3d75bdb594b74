"""The loop's end of one worker: the process, its socket pair, the window of calls handed to it and
not answered yet, and the frames waiting for the socket to take them.

The window holds calls in the order the worker runs them. `fits` says whether one more may be
pipelined behind them: only when all are known to be short, and then up to the pool's window (3),
or up to DEEP_WINDOW while the work they are expected to take stays under DEEP_BUDGET, so tiny tasks
travel many to a frame each way and a long task never holds a short one back.
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
import socket
from collections import deque
from typing import Any

from workers import framing
from workers.errors import TaskFailed
from workers.local.calls import Call, drop, settle
from workers.local.forks import ForkedProcess

DEEP_WINDOW = 16  # a worker's window may grow to this many calls when they are all tiny...
DEEP_BUDGET = 0.001  # ...as long as the work they are expected to take stays under this (seconds)
_IOV_MAX = 512


class WorkerHandle:
    """The loop's end of one worker process: its socket, its window of calls, its write buffer."""

    __slots__ = (
        "done", "dying", "eof", "idle", "inflight", "load", "longs", "outbox", "overdue", "pid", "proc", "reader",
        "ready", "slot", "sock", "started_at", "wbuf",
    )

    def __init__(self, slot: int, proc: ForkedProcess, sock: socket.socket) -> None:
        self.slot = slot
        self.proc = proc
        self.pid: int = proc.pid
        self.started_at = 0.0  # monotonic time it was forked (the start timeout counts from it)
        self.sock = sock
        self.reader = framing.FrameReader()
        self.inflight: deque[Call] = deque()  # in the order the worker runs them
        self.load = 0.0  # the expected seconds of the calls in `inflight` (sum of their est)
        self.longs = 0  # calls in `inflight` not known to be short
        self.outbox: list[tuple[Any, ...]] = []
        self.wbuf: deque[memoryview] = deque()
        self.done = 0  # results received: with the table's tasks_done, tells which results a death lost
        self.overdue: tuple[int, float] | None = None  # (call id, start) a tick found past its deadline
        self.ready = False
        self.idle = False
        self.eof = False
        self.dying: str | None = None  # the restart reason once we decided (or saw) it must go

    def add(self, call: Call) -> None:
        """Put a call at the end of the window."""
        self.inflight.append(call)
        self.load += call.est
        if not call.short:
            self.longs += 1

    def fits(self, call: Call, window: int) -> bool:
        """Whether `call` may be pipelined behind the calls already in this (non-empty) window: only
        when they and it are all known to be short, and then up to `window` calls, or up to
        DEEP_WINDOW while the work they are expected to take stays under DEEP_BUDGET (tiny tasks:
        one frame then carries many calls each way)."""
        n = len(self.inflight)
        if self.longs or not call.short or n >= DEEP_WINDOW:
            return False
        return n < window or (window > 1 and self.load + call.est <= DEEP_BUDGET)

    def take(self, call_id: int) -> Call | None:
        """Take the call answered with `call_id` out of the window (None if it is not there)."""
        inflight = self.inflight
        if inflight and inflight[0].id == call_id:
            call = inflight.popleft()
        else:
            for call in inflight:
                if call.id == call_id:
                    inflight.remove(call)
                    break
            else:
                return None
        if inflight:
            self.load -= call.est
            if not call.short:
                self.longs -= 1
        else:
            self.load = 0.0
            self.longs = 0
        return call

    def unassign(self, call: Call) -> None:
        """Take a call out of the window (not on its result: `take` does that)."""
        self.inflight.remove(call)
        self.load -= call.est
        if not call.short:
            self.longs -= 1
        if not self.inflight:
            self.load = 0.0
            self.longs = 0

    def dumps_sendable(self, messages: list[tuple[Any, ...]]) -> tuple[bytes, bytes]:
        """The frame of `messages` without those that will not pickle (an argument that cannot be
        sent): each of those fails its own call, which leaves the window."""
        good = []
        for message in messages:
            try:
                pickle.dumps(message, protocol=5)
                good.append(message)
            except Exception as exc:  # noqa: BLE001
                for call in [c for c in self.inflight if c.id == message[0]]:
                    self.unassign(call)
                    settle(call.waiter, error=TaskFailed(type(exc).__name__, f"arguments cannot be sent: {exc}"))
                    drop(call)
        return framing.dumps(good)

    def write(self, loop: asyncio.AbstractEventLoop, header: bytes, payload: bytes) -> None:
        """Send one frame: at once if the socket takes it, else the rest when it becomes writable."""
        if not self.wbuf:
            try:
                sent = self.sock.sendmsg([header, payload])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return  # the worker is gone; its sentinel will tell
            if sent == len(header) + len(payload):
                return
            loop.add_writer(self.sock.fileno(), self.on_writable, loop)
        else:
            sent = 0
        for part in (memoryview(header), memoryview(payload)):
            if sent >= len(part):
                sent -= len(part)
                continue
            self.wbuf.append(part[sent:])
            sent = 0

    def on_writable(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            sent = self.sock.sendmsg(list(itertools.islice(self.wbuf, _IOV_MAX)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = -1
        while self.wbuf and sent >= len(self.wbuf[0]):
            sent -= len(self.wbuf.popleft())
        if self.wbuf and sent > 0:
            self.wbuf[0] = self.wbuf[0][sent:]
        if not self.wbuf or sent < 0:
            self.wbuf.clear()
            loop.remove_writer(self.sock.fileno())
