"""Supervision of the local pool's worker processes: start, watch, kill, replace.

- **Start.** Workers are forked by the worker parent (workers/local/parent.py; the service process,
  with its loop and threads, is never forked), which imported the task modules and ran the
  `@preload` hooks once, so a replacement is live in milliseconds and shares the preloads' memory.
  Starting the parent and each fork request block, so they run on one helper thread, as does the
  final stop. Each worker gets one socket pair, which the loop reads itself (the pool's read
  callback, registered here with `add_reader`), and two pipes for its stdout and stderr, which the
  output relay reads (workers/local/output.py). A worker that is not ready within the start
  timeout, or whose `@on_worker_start` hook raises (WORKER_START_FAILED), is stopped and restarted
  with the crash back-off; `start_error` says why for /readyz. If the parent itself dies, every
  worker dies with it, and the next start runs a new parent (the preloads run again).
- **Watch.** A worker's death is seen through its process sentinel (`add_reader` on it), so it is
  handled in one callback (`on_exit`): the results it sent before dying are read first, the call it
  was running (and any it finished without sending the result: at-most-once) gets WorkerCrashed,
  the calls it never started go back to the front of the queue, and a replacement starts.
- **Kill.** The pool's tick (`tick`) compares each running call's start time, which the worker
  writes in the shared-memory table, with its timeout, and kills the worker past it (the only way
  to stop arbitrary Python code); with a memory limit, a worker whose RSS passes twice the limit in
  the middle of a task goes the same way. A cancelled call (`kill_on_cancel`) and a worker sending
  undecodable frames are killed through `kill` too. A kill takes the worker's whole process group.
- **Replace.** A planned stop (recycle, timeout, cancel) is replaced at once and counts in
  `replacing`, so the service stays ready meanwhile; more crashes (start failures included) than
  workers within 10 s meet an exponential back-off (logged) instead of a restart spin.
- **Scale.** Only the slots in `PoolState.active` hold workers: `start` forks those (MIN of an
  elastic pool), `grow` forks one more in a slot the scaler (scaling.py) activated, and a worker
  whose slot the scaler deactivated (it stopped an idle one) is not replaced when it exits, nor
  counted as a restart.

Interface: the supervisor writes `PoolState.table`, `.workers` and `.replacing` and unparks workers
it kills or loses; from the pool it is given, at construction, the executor's `restarts` counters
(by reason, and by slot), `read(w)` (the pool's socket read callback), `requeue(calls)` (calls a dead
worker never started: back to the front of the queue, then handed out), `background(coro)` (the
executor's background runner) and the output relay. The pool calls `start`, `on_ready`, `on_start_failed`, `retiring`,
`kill`, `running_call`, `tick` and `stop`; the scaler calls `grow`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from typing import Any

from workers.errors import PoolClosed, TaskTimeout, WorkerCrashed, describe_exit
from workers.local.calls import Call, drop, drop_leases, settle
from workers.local.forks import ForkedProcess, StartFailed, WorkerParent
from workers.local.handle import WorkerHandle
from workers.local.output import OutputRelay
from workers.local.processes import kill_group, kill_tree, stop_processes
from workers.local.state import PoolState
from workers.stats import BUSY, RETIRE_REASONS, RETIRING, WorkerTable
from workers.worker import WorkerOptions, rss_of

log = logging.getLogger("procbridge.pool")

_CRASH_WINDOW = 10.0
_MEMORY_CEILING = 2  # a running task is killed once its worker's RSS passes this × max_worker_memory
_DRAIN_READS = 1024  # bound on reads of a dead worker's socket (it holds at most its buffer)
_UNPLANNED = frozenset({"crashed", "start_failed", "start_timeout"})  # restarts that meet the back-off
PARENT_SLOT = -1  # the output relay's slot for the worker parent's own output (what a preload prints)


class Supervisor:
    """Starts, watches, kills and replaces the worker processes of one pool."""

    def __init__(
        self,
        state: PoolState,
        *,
        restarts: Counter[str],
        slot_restarts: Counter[int],
        read: Callable[[WorkerHandle], None],
        requeue: Callable[[list[Call]], None],
        background: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self._state = state
        self._restarts = restarts
        self._slot_restarts = slot_restarts
        self._read = read
        self._requeue = requeue
        self._background = background
        # The helper thread that starts processes. It lives as long as the pool: the worker parent
        # asks for SIGKILL when the thread that started it ends (PR_SET_PDEATHSIG).
        self._spawner = cf.ThreadPoolExecutor(1, thread_name_prefix="procbridge-spawn")
        self._parent = WorkerParent(state.options.modules)
        self._parent_lock: asyncio.Lock | None = None
        self._parents = 0  # parents started so far (the first one's failure stops the start)
        self._crashes: deque[float] = deque()
        self._started: asyncio.Event | None = None
        self._shm_threshold: int | None = None
        self.output = OutputRelay(task_of=self._task_of)
        self.start_error: str | None = None  # why the last worker could not start (cleared by a ready one)
        self.preload_seconds: float | None = None
        self.closed = False

    async def start(self, prefix: str, shm_threshold: int | None) -> None:
        """Create the worker table (a row per slot), start the worker parent (the task modules and
        preloads load there), fork a worker into every active slot and return once all are ready to take
        calls. Raises StartFailed if the parent cannot get ready (a preload or a module raised, or the
        start timeout passed): the pool then closes. A worker that fails to start is retried with the
        back-off meanwhile."""
        state = self._state
        self._parent_lock = asyncio.Lock()
        state.table = WorkerTable.create(len(state.workers), name=f"{prefix}table")
        self._shm_threshold = shm_threshold
        self._started = asyncio.Event()
        self.output.start()
        await self._ensure_parent()
        await asyncio.gather(*(self._spawn(slot) for slot in sorted(state.active)))
        await self._started.wait()

    def grow(self, slot: int) -> None:
        """Fork a worker into `slot`, which the scaler has just made active (in the background)."""
        self._background(self._spawn(slot))

    # -- what the workers say ---------------------------------------------------------------------

    def on_ready(self, w: WorkerHandle) -> None:
        """The worker finished starting (its WORKER_READY frame): it may take calls."""
        w.ready = True
        self.start_error = None
        state = self._state
        state.replacing.discard(w.slot)
        if self._started is not None and all(
            (x := state.workers[slot]) is not None and x.ready for slot in state.active
        ):
            self._started.set()

    def on_start_failed(self, w: WorkerHandle, line: str, details: str) -> None:
        """The worker's on_worker_start hook raised (WORKER_START_FAILED): it exits; it is restarted
        with the crash back-off, and /readyz says why meanwhile."""
        log.error("worker %d could not start: %s\n%s", w.pid, line, details.rstrip())
        self.start_error = line
        w.dying = w.dying or "start_failed"
        self._state.unpark(w)

    def retiring(self, w: WorkerHandle, reason: int) -> None:
        """The worker will exit once its last frame is out (RETIRE_NOTICE): send it nothing more."""
        w.dying = w.dying or RETIRE_REASONS.get(reason, "retired")
        self._state.replacing.add(w.slot)
        self._state.unpark(w)

    @property
    def parent_pid(self) -> int | None:
        return self._parent.pid if self._parent.alive else None

    def running_call(self, w: WorkerHandle) -> int | None:
        """The id of the call `w` is running now, as its row in the table says (None: idle)."""
        table = self._state.table
        if table is None:
            return None
        row = table.read(w.slot)
        return row.call_id if row.state == BUSY and row.pid == w.pid else None

    # -- killing ----------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Enforce timeouts from the start times the workers wrote, and the memory ceiling of
        running tasks (the pool's periodic step)."""
        state = self._state
        table = state.table
        if table is None:
            return
        ceiling = _MEMORY_CEILING * state.options.max_worker_memory
        start_timeout = state.options.start_timeout
        for w in state.workers:
            if w is not None and not w.ready and not w.dying and now - w.started_at > start_timeout:
                self.start_error = f"a worker did not start within {start_timeout:g} s (--worker-start-timeout)"
                log.error("worker %d: %s; stopping it", w.pid, self.start_error)
                self.kill(w, "start_timeout")
            if w is None or w.dying or not w.inflight:
                continue
            row = table.read(w.slot)
            if row.state != BUSY or row.pid != w.pid:
                continue
            for call in w.inflight:
                if call.id == row.call_id:
                    if call.timeout is not None and row.started_at > 0 and now - row.started_at > call.timeout:
                        # A row read while its worker rewrites it can mix fields of two states (the
                        # next call's id, the previous start): act only when two ticks agree.
                        seen = (row.call_id, row.started_at)
                        if w.overdue == seen:
                            settle(call.waiter, error=TaskTimeout(call.timeout))
                            self.kill(w, "timeout")
                        w.overdue = seen
                    break
            if ceiling and not w.dying and rss_of(w.pid) > ceiling:
                self.kill(w, "max_memory")  # its call gets WorkerCrashed when the death is seen

    def kill(self, w: WorkerHandle, reason: str) -> None:
        """Stop a worker (SIGKILL to its process group); what follows is `on_exit`'s."""
        if w.dying:
            return
        w.dying = reason
        if reason in ("timeout", "cancelled"):  # planned: its replacement starts at once
            self._state.replacing.add(w.slot)
        self._state.unpark(w)
        log.warning("stopping worker %d (%s)", w.pid, reason)
        if w.proc.gone:
            return  # already gone (and reaped): its pid may not be ours any more
        kill_tree(w.pid)

    # -- a death ----------------------------------------------------------------------------------

    def on_exit(self, w: WorkerHandle) -> None:
        """The worker's process sentinel fired: it is gone. Settle its calls, re-queue the ones it
        never started, and start its replacement: all in this one callback, no waiting. A worker of a
        slot no longer active (the scaler stopped it) has no replacement and is no restart."""
        state = self._state
        loop, table = state.loop, state.table
        assert loop is not None and table is not None
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(w.proc.sentinel)
        reason = w.dying or "crashed"
        w.dying = reason
        for _ in range(_DRAIN_READS):  # results it sent before dying still count
            if w.eof:
                break
            self._read(w)
        row = table.read(w.slot)
        mine = row.pid == w.pid
        if reason == "crashed" and mine and row.state == RETIRING:
            reason = w.dying = RETIRE_REASONS.get(row.retire_reason, "retired")
        self._detach(w)
        table.clear(w.slot)
        if state.workers[w.slot] is w:
            state.workers[w.slot] = None
        state.unpark(w)
        exitcode = w.proc.exitcode
        kill_group(w.pid)  # whatever the task started in the worker's process group goes with it
        self.output.remove(w.pid)  # its output streams, even if something it started still holds them
        running = row.call_id if mine and row.state == BUSY else None
        lost = max(0, row.tasks_done - w.done) if mine else 0  # finished, results never sent
        requeue = []
        for i, call in enumerate(w.inflight):
            if call.results is not None:  # it may have half-written them: never handed on
                drop_leases(call.results)
                call.results = None
            if i < lost or call.id == running:
                if settle(call.waiter, error=WorkerCrashed(w.pid, exitcode)):
                    log.error("worker %d died running %s (%s)", w.pid, call.name, describe_exit(exitcode))
                drop(call)
            elif not call.waiter.done():
                call.worker = None
                requeue.append(call)  # with its argument segments, for the next worker
            else:
                drop(call)
        w.inflight.clear()
        if reason == "crashed" and running is None and not lost:
            if w.ready:
                log.error("worker %d exited unexpectedly (%s)", w.pid, describe_exit(exitcode))
            else:
                reason = w.dying = "start_failed"
                self.start_error = f"a worker died while starting ({describe_exit(exitcode)})"
                log.error("worker %d died while starting (%s)", w.pid, describe_exit(exitcode))
        w.proc.close()
        if w.slot not in state.active:  # scaled down: gone as planned, and not to be replaced
            log.info("worker %d stopped (%s: the pool shrank to %d)", w.pid, reason, len(state.active))
            self._requeue(requeue)
            return
        self._restarts[reason] += 1
        self._slot_restarts[w.slot] += 1
        self._requeue(requeue)
        if not self.closed:
            unplanned = reason in _UNPLANNED or (reason == "max_memory" and running is not None)
            delay = self._backoff() if unplanned else 0.0
            if not delay and w.ready:  # one that never started is not a replacement the service waits for
                state.replacing.add(w.slot)
            self._background(self._respawn(w.slot, delay))

    def _backoff(self) -> float:
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > _CRASH_WINDOW:
            self._crashes.popleft()
        excess = len(self._crashes) - max(3, len(self._state.active))
        if excess <= 0:
            return 0.0
        delay = min(10.0, 0.1 * 2**excess)
        log.warning(
            "workers keep crashing (%d in %g s): waiting %.1f s before the next restart",
            len(self._crashes), _CRASH_WINDOW, delay,
        )
        return delay

    # -- starting ---------------------------------------------------------------------------------

    async def _ensure_parent(self) -> None:
        """Make sure a worker parent is running and ready, starting one if needed (the preloads run
        in it). The first one's failure raises StartFailed; a later one is logged and re-raised for
        the caller's retry."""
        assert self._parent_lock is not None
        async with self._parent_lock:
            if self._parent.alive or self.closed:
                return
            loop, options = self._state.loop, self._state.options
            assert loop is not None
            first = self._parents == 0
            if not first:
                log.warning("starting a new worker parent (its preloads run again)")
            self._parents += 1
            parent = self._parent = WorkerParent(options.modules)
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            try:
                await loop.run_in_executor(self._spawner, parent.start, out_w, err_w)
            finally:
                os.close(out_w)
                os.close(err_w)
            assert parent.pid is not None
            self.output.add(out_r, parent.pid, PARENT_SLOT, "stdout")
            self.output.add(err_r, parent.pid, PARENT_SLOT, "stderr")
            try:
                seconds, ran = await parent.wait_ready(options.start_timeout)
            except BaseException as exc:
                await loop.run_in_executor(self._spawner, parent.stop, 1.0)
                if isinstance(exc, StartFailed):
                    self.start_error = exc.line
                    if not first:
                        log.error("the worker parent could not start: %s\n%s", exc.line, exc.details.rstrip())
                raise
            self.preload_seconds = seconds
            if ran:
                log.info("%d preload(s) ran in %.2f s in the worker parent (pid %d)", ran, seconds, parent.pid)
            loop.add_reader(parent.control_fd, self._on_parent_exit, parent)

    def _on_parent_exit(self, parent: WorkerParent) -> None:
        """The parent's control socket turned readable: it only ever does when the parent is gone."""
        loop = self._state.loop
        assert loop is not None
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(parent.control_fd)
        if self.closed or parent is not self._parent:
            return
        code = parent.stop(0.5)
        log.error(
            "the worker parent (pid %s) died (%s): its workers die with it and are started again",
            parent.pid,
            describe_exit(code),
        )

    async def _respawn(self, slot: int, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        await self._spawn(slot)

    async def _spawn(self, slot: int) -> None:
        if self.closed or slot not in self._state.active:
            return
        state = self._state
        loop, table, options = state.loop, state.table, state.options
        assert loop is not None and table is not None
        try:
            await self._ensure_parent()
        except Exception:
            if self._parents <= 1 and (self._started is None or not self._started.is_set()):
                raise  # the first parent: start() reports it
            self._retry_later(slot)
            return
        if self.closed:
            return
        worker_options = WorkerOptions(
            slot=slot,
            modules=options.modules,
            table_name=table.name,
            table_slots=len(state.workers),
            nice=options.nice,
            max_tasks=options.max_tasks_per_worker,
            max_memory=options.max_worker_memory,
            debug=options.debug,
            shm_threshold=self._shm_threshold,
        )
        ours, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        parent = self._parent
        try:
            proc = await loop.run_in_executor(self._spawner, parent.fork, worker_options, theirs, out_w, err_w)
        except BaseException as exc:
            ours.close()
            for fd in (out_r, err_r):
                os.close(fd)
            if not isinstance(exc, Exception):
                raise  # cancelled: the pool is closing
            if not self.closed:
                log.exception("could not start a worker; retrying")
                self._retry_later(slot)
            else:
                state.replacing.discard(slot)
            return
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)
        self.output.add(out_r, proc.pid, slot, "stdout")
        self.output.add(err_r, proc.pid, slot, "stderr")
        if self.closed:  # the pool closed while it forked: stop() has finished or is finishing
            ours.close()
            await loop.run_in_executor(self._spawner, stop_processes, [proc], 0.0)
            return
        w = WorkerHandle(slot, proc, ours)
        w.started_at = time.monotonic()
        ours.setblocking(False)
        state.workers[slot] = w
        loop.add_reader(ours.fileno(), self._read, w)
        loop.add_reader(proc.sentinel, self.on_exit, w)

    def _retry_later(self, slot: int) -> None:
        """A start failed (the parent could not be started, or would not fork): try the slot again
        after the crash back-off, at least 1 s; meanwhile it is no replacement the service waits for."""
        self._state.replacing.discard(slot)
        self._background(self._respawn(slot, self._backoff() or 1.0))

    def _task_of(self, slot: int, pid: int) -> str | None:
        """For the output relay (its own thread): what the worker in `slot` runs now."""
        if slot == PARENT_SLOT:
            return "preload"
        table = self._state.table
        if table is None or not 0 <= slot < table.slots:
            return None
        row = table.read(slot)
        return row.last_task if row.pid == pid else None

    # -- stopping ---------------------------------------------------------------------------------

    def _detach(self, w: WorkerHandle) -> None:
        loop = self._state.loop
        assert loop is not None
        fd = w.sock.fileno()
        if fd >= 0:
            if not w.eof:
                loop.remove_reader(fd)
            if w.wbuf:
                loop.remove_writer(fd)
                w.wbuf.clear()
            w.eof = True
            w.sock.close()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(w.proc.sentinel)

    async def stop(self) -> None:
        """Fail every call in a window with PoolClosed, stop every worker (killing those still busy;
        closing our end tells an idle one to exit), wait for them all, stop the worker parent, free
        the table."""
        self.closed = True
        state = self._state
        procs: list[ForkedProcess] = []
        for w in state.workers:
            if w is None:
                continue
            for call in w.inflight:
                settle(call.waiter, error=PoolClosed())
                drop(call)  # the segments are unlinked once the workers are gone
            w.dying = w.dying or "shutdown"
            busy = bool(w.inflight)
            w.inflight.clear()
            self._detach(w)
            if busy:
                kill_tree(w.pid)
            procs.append(w.proc)
        state.workers[:] = [None] * len(state.workers)
        state.idle.clear()
        loop = state.loop
        if loop is not None:
            with contextlib.suppress(ValueError, OSError):
                if self._parent.alive:
                    loop.remove_reader(self._parent.control_fd)
            # The spawner runs one thing at a time, so a fork in progress finishes first.
            await loop.run_in_executor(self._spawner, stop_processes, procs, 2.0)
            await loop.run_in_executor(self._spawner, self._parent.stop, 5.0)
            await loop.run_in_executor(None, self.output.close, 2.0)
        self._spawner.shutdown(wait=False)
        if state.table is not None:
            state.table.close()
            state.table = None
