"""Task output to the service's log (issue 16): what a task prints never reaches the access log.

Each worker gets one pipe (or stream socket) per stream. In the worker, `redirect_output` dup2's fds 1
and 2 onto the write ends, so `print`, C-level writes and the subprocesses a task starts are all
captured; the service keeps the read ends and hands each to `OutputRelay.add` with the worker's pid
and slot. Every complete line becomes one record on the `procbridge.task` logger:

    worker 1234 (count_words) stdout: hello

with `pid`, `slot`, `task` and `stream` as record attributes (`extra=`), for a structured formatter.
The task is `task_of(slot, pid)` when the line is read ("-" when the worker is idle), so a line printed
at the very end of a task and read after the worker took its next call can carry the next task's name.

**Why a thread, not the event loop.** `logging` handlers format, lock and write on the caller's
thread: a slow stderr (a full disk, a pipe nobody reads) would stall the loop, and every request with
it. A task that prints 100 MB is 1,600 reads and a million lines to split: work the network side must
never wait for. So ONE daemon thread relays for all workers, with `selectors` over every read end and
a wake-up pipe, through which `add`, `remove` and `close` (from any thread) reach it promptly. If the
log stream itself blocks, only this thread waits; the workers then block on a full pipe, as they did
when they wrote to the service's stderr directly.

**Limits** (constructor arguments), so that memory stays bounded whatever a task prints:
- Reads are 64 KiB chunks. A partial line is held until its newline or EOF, but never more than
  `max_line` bytes (16 KiB) of it: the rest is discarded and the line logged with "[…N bytes cut]".
  So the relay holds at most `max_line` bytes per stream, plus the chunk in hand.
- Rate: a token bucket per worker (`rate` lines/s sustained, `burst` at once; 1000 and 2000) and one
  over all workers (`total_rate`, `total_burst`; 10,000 and 20,000; None: none), so one thread keeps
  up with its log stream. Lines over the rate are dropped, the pipe still drained (read and discarded:
  a task never blocks on the relay), and counted per stream (`stats()`); a warning says how many, at
  most once per `warn_interval` (1 s) per worker, and once more when the worker's streams end.
- At `close` and `remove` what is readable is drained, at most 4 MiB a stream, so a writer that never
  stops cannot hold them up.

**Levels.** stdout and stderr lines are both INFO by default (`levels=` to change): stderr is where
Python's logging, warnings and progress bars go, so it is no error signal; the stream is in the
message and in `record.stream`. A line's trailing "\\n" (and a "\\r" before it) is stripped; bytes are
decoded as UTF-8 with errors replaced. Drop warnings are WARNING records with `pid`, `slot`, `task`,
`stream` None and `dropped` (the lines they report).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import selectors
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("procbridge.output")  # the relay's own trouble; task lines go to `logger`

STREAMS = ("stdout", "stderr")
CHUNK = 64 * 1024
DRAIN_CHUNKS = 64  # at close/remove: at most 4 MiB more a stream

TaskOf = Callable[[int, int], "str | None"]


def redirect_output(stdout_fd: int, stderr_fd: int) -> None:
    """In a worker, before any task runs: point fds 1 and 2 at the relay's write ends.

    The given fds are closed afterwards (unless they are 1 or 2); fds 1 and 2 stay inheritable, so
    subprocesses write to the relay too. `sys.stdout` and `sys.stderr` become line-buffered: each
    `print` reaches the relay when it is made, not when 8 KiB have gathered (or never, on SIGKILL).
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    for fd in {stdout_fd, stderr_fd} - {1, 2}:
        os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; starts full. One thread uses it."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def available(self, now: float) -> int:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        return int(self.tokens)

    def take(self, n: int) -> None:
        self.tokens -= n


@dataclass(eq=False)
class _Worker:
    pid: int
    slot: int
    bucket: TokenBucket
    streams: list[_Stream] = field(default_factory=list)
    pending: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))  # dropped, unreported
    warned_at: float = -math.inf


@dataclass(eq=False)
class _Stream:
    fd: int
    name: str
    worker: _Worker
    held: bytearray = field(default_factory=bytearray)  # the start of a partial line, at most max_line bytes
    cut: int = 0  # bytes of that line past max_line, discarded


_Add = tuple[int, int, int, str]  # fd, pid, slot, stream; a bare int in the queue is a pid to remove


class OutputRelay:
    """Relays the output of worker processes, line by line, to `logger`, on one daemon thread."""

    def __init__(
        self,
        task_of: TaskOf | None = None,
        logger: logging.Logger | None = None,
        *,
        rate: float = 1000.0,
        burst: int = 2000,
        total_rate: float | None = 10_000.0,
        total_burst: int = 20_000,
        max_line: int = 16 * 1024,
        levels: Mapping[str, int] | None = None,
        warn_interval: float = 1.0,
    ) -> None:
        if rate <= 0 or burst < 1 or max_line < 1 or (total_rate is not None and (total_rate <= 0 or total_burst < 1)):
            raise ValueError("rates must be > 0, bursts and max_line >= 1")
        self.logger = logger if logger is not None else logging.getLogger("procbridge.task")
        self.rate, self.burst, self.max_line, self.warn_interval = rate, burst, max_line, warn_interval
        self.total_rate = total_rate
        self.levels = {"stdout": logging.INFO, "stderr": logging.INFO, **(levels or {})}
        self._task_of = task_of
        self._task_of_failed = False
        self._total = TokenBucket(total_rate, total_burst) if total_rate is not None else None
        # Shared with other threads, under _lock: the queue of adds/removes, the state, the counters.
        self._lock = threading.Lock()
        self._requests: list[_Add | int] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._logged = dict.fromkeys(STREAMS, 0)
        self._dropped = dict.fromkeys(STREAMS, 0)
        self._cut = 0
        self._open = 0  # fds owned: queued or registered
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # The relay thread's alone (or close()'s, when it never started).
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._workers: dict[int, _Worker] = {}

    # ---- any thread -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the relay thread (once; streams added before are relayed from now on)."""
        with self._lock:
            if self._closing:
                raise RuntimeError("the output relay is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="procbridge-output", daemon=True)
                self._thread.start()

    def add(self, fd: int, pid: int, slot: int, stream: str) -> None:
        """Relay what comes out of `fd` (a read end) as worker `pid`'s `stream` ("stdout"/"stderr").

        The relay owns `fd` from now on: it is made non-blocking and closed at EOF, on `remove(pid)` or
        on `close`; after `close` it is closed at once. A wrong stream name raises ValueError (the fd is
        then not taken).
        """
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, not {stream!r}")
        os.set_blocking(fd, False)
        with self._lock:
            if not self._closing:
                self._requests.append((fd, pid, slot, stream))
                self._open += 1
                self._wake_locked()
                return
        with contextlib.suppress(OSError):
            os.close(fd)

    def remove(self, pid: int) -> None:
        """Stop relaying worker `pid` (call it once the worker is reaped): what its streams hold now is
        relayed, then they are closed. Returns at once; a no-op for a pid the relay does not hold
        (its streams ended already). Streams end by themselves at EOF, i.e. once the worker and all
        it started have exited; this is for what outlives it (a daemon that escaped its group)."""
        with self._lock:
            if not self._closing:
                self._requests.append(pid)
                self._wake_locked()

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the thread: what is readable now is relayed (partial lines too), then every fd is closed.

        Idempotent, from any thread but the relay's own. True when all is closed within `timeout`;
        False when the relay thread is still busy (a log handler that blocks): it closes the fds when
        it is done, and being a daemon thread it never holds the process up.
        """
        with self._lock:
            first = not self._closing
            self._closing = True
            thread = self._thread
            if first and thread is not None:
                self._wake_locked()
        if thread is None:
            if first:
                self._finish()
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """Lines `logged` and `dropped` per stream, lines `cut`, and `streams` (fds the relay holds)."""
        with self._lock:
            logged, dropped = dict(self._logged), dict(self._dropped)
            return {"logged": logged, "dropped": dropped, "cut": self._cut, "streams": self._open}

    def _wake_locked(self) -> None:
        # Under _lock, so that it never writes to a wake-up fd that _finish closed (and the OS reused).
        with contextlib.suppress(BlockingIOError):  # full: the thread has a wake-up to read already
            os.write(self._wake_w, b"\0")

    # ---- the relay thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing:
                        break
                try:
                    self._turn()
                except Exception:
                    log.exception("output relay: unexpected error; relaying on")
                    time.sleep(0.05)  # not synchronisation: keeps a repeating fault from spinning
        finally:
            self._finish()

    def _turn(self) -> None:
        for key, _ in self._selector.select(self._next_warning_in(time.monotonic())):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
                self._take_requests()
            else:
                self._read(key.data)
        now = time.monotonic()
        for w in list(self._workers.values()):
            self._report_drops(w, now, force=False)

    def _take_requests(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, []
        for request in requests:
            if isinstance(request, int):
                w = self._workers.get(request)
                for s in list(w.streams) if w is not None else ():
                    self._drain(s)
            else:
                self._register(*request)

    def _register(self, fd: int, pid: int, slot: int, name: str) -> None:
        w = self._workers.get(pid)
        if w is None:
            w = self._workers[pid] = _Worker(pid, slot, TokenBucket(self.rate, self.burst))
        s = _Stream(fd, name, w)
        try:
            self._selector.register(fd, selectors.EVENT_READ, s)
        except (ValueError, KeyError, OSError) as exc:
            log.error("output relay: cannot watch fd %d of worker %d (%s): %r", fd, pid, name, exc)
            if not w.streams:
                del self._workers[pid]
            with self._lock:
                self._open -= 1
            if not isinstance(exc, KeyError):  # KeyError: the fd is watched already; it is not ours twice
                with contextlib.suppress(OSError):
                    os.close(fd)
            return
        w.streams.append(s)

    def _read(self, s: _Stream) -> None:
        try:
            data = os.read(s.fd, CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("output relay: reading worker %d's %s failed: %r", s.worker.pid, s.name, exc)
            data = b""
        if data:
            self._feed(s, data)
        else:
            self._end(s)

    def _drain(self, s: _Stream) -> None:
        """Relay what `s` holds now (at most DRAIN_CHUNKS reads), its partial line too, then close it."""
        for _ in range(DRAIN_CHUNKS):
            try:
                data = os.read(s.fd, CHUNK)
            except OSError:  # BlockingIOError: nothing more now
                break
            if not data:
                break
            self._feed(s, data)
        self._end(s)

    def _end(self, s: _Stream) -> None:
        if s.held or s.cut:
            self._feed(s, b"\n")  # the partial line, as a line (under the rate limit as any other)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(s.fd)
        with contextlib.suppress(OSError):
            os.close(s.fd)
        with self._lock:
            self._open -= 1
        w = s.worker
        w.streams.remove(s)
        if not w.streams:
            self._report_drops(w, time.monotonic(), force=True)
            if self._workers.get(w.pid) is w:
                del self._workers[w.pid]

    def _feed(self, s: _Stream, data: bytes) -> None:
        """Split a chunk into lines; log those the rate allows, drop (and count) the rest."""
        now = time.monotonic()
        w = s.worker
        allowance = w.bucket.available(now)
        if self._total is not None:
            allowance = min(allowance, self._total.available(now))
        logged = dropped = cut = 0
        task: str | None = None
        pos, end = 0, len(data)
        while pos < end:
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._hold(s, data, pos, end)
                break
            if logged >= allowance:  # out of tokens: every complete line left in the chunk is dropped
                dropped += data.count(b"\n", nl)
                s.held.clear()
                s.cut = 0
                pos = data.rfind(b"\n") + 1
                continue
            line, line_cut = self._line(s, data, pos, nl)
            if task is None:
                task = self._task(w)
            self._emit(s, line, line_cut, task)
            logged += 1
            cut += line_cut > 0
            pos = nl + 1
        w.bucket.take(logged)
        if self._total is not None:
            self._total.take(logged)
        with self._lock:
            self._logged[s.name] += logged
            self._dropped[s.name] += dropped
            self._cut += cut
        if dropped:
            w.pending[s.name] += dropped
            self._report_drops(w, now, force=False)

    def _hold(self, s: _Stream, data: bytes, pos: int, end: int) -> None:
        take = min(self.max_line - len(s.held), end - pos)
        if take > 0:
            s.held += memoryview(data)[pos : pos + take]
        s.cut += (end - pos) - max(take, 0)

    def _line(self, s: _Stream, data: bytes, pos: int, nl: int) -> tuple[bytes, int]:
        """The line ending at `nl` (the held start included), at most max_line bytes, and its bytes cut."""
        if not s.held and not s.cut:
            size = nl - pos
            return data[pos : pos + min(size, self.max_line)], max(0, size - self.max_line)
        self._hold(s, data, pos, nl)
        line, cut = bytes(s.held), s.cut
        s.held.clear()
        s.cut = 0
        return line, cut

    def _emit(self, s: _Stream, line: bytes, cut: int, task: str) -> None:
        text = line.decode("utf-8", "replace")
        if text.endswith("\r"):
            text = text[:-1]
        w = s.worker
        extra = {"pid": w.pid, "slot": w.slot, "task": task, "stream": s.name}
        level = self.levels[s.name]
        if cut:
            self.logger.log(level, "worker %d (%s) %s: %s […%d bytes cut]", w.pid, task, s.name, text, cut, extra=extra)
        else:
            self.logger.log(level, "worker %d (%s) %s: %s", w.pid, task, s.name, text, extra=extra)

    def _task(self, w: _Worker) -> str:
        if self._task_of is None:
            return "-"
        try:
            return self._task_of(w.slot, w.pid) or "-"
        except Exception:
            if not self._task_of_failed:  # once: it would fail for every chunk
                self._task_of_failed = True
                log.exception("output relay: task_of(%d, %d) failed; lines carry task '-'", w.slot, w.pid)
            return "-"

    def _report_drops(self, w: _Worker, now: float, force: bool) -> None:
        out, err = w.pending["stdout"], w.pending["stderr"]
        if not (out or err) or (not force and now - w.warned_at < self.warn_interval):
            return
        w.pending = dict.fromkeys(STREAMS, 0)
        w.warned_at = now
        task = self._task(w)
        limit = f"{self.rate:g} lines/s a worker" + (f", {self.total_rate:g} in all" if self.total_rate else "")
        self.logger.warning(
            "worker %d (%s): %d lines of output dropped (stdout %d, stderr %d), over the limit of %s",
            w.pid,
            task,
            out + err,
            out,
            err,
            limit,
            extra={"pid": w.pid, "slot": w.slot, "task": task, "stream": None, "dropped": out + err},
        )

    def _next_warning_in(self, now: float) -> float | None:
        """Seconds until a pending drop warning is due (the select timeout), None when none is pending."""
        due = [w.warned_at + self.warn_interval for w in self._workers.values() if any(w.pending.values())]
        return max(0.0, min(due) - now) if due else None

    def _finish(self) -> None:
        """At the end (relay thread, or close() when it never started): relay what is readable, close all."""
        try:
            self._take_requests()
            for w in list(self._workers.values()):
                for s in list(w.streams):
                    self._drain(s)
        finally:
            for w in list(self._workers.values()):  # left by an error above: closed unread
                for s in w.streams:
                    with contextlib.suppress(OSError):
                        os.close(s.fd)
                    with self._lock:
                        self._open -= 1
            self._workers.clear()
            with self._lock:
                self._selector.close()
                for fd in (self._wake_r, self._wake_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)
                for request in self._requests:  # none: adds after _closing close their fd themselves
                    if not isinstance(request, int):
                        with contextlib.suppress(OSError):
                            os.close(request[0])
                self._requests.clear()
