"""Supervision of the local pool's worker processes: start, watch, kill, replace.

- **Start.** Workers come from the forkserver (the service process, with its loop and threads, is
  never forked), which preloads workers.worker and the built-in tasks, so a replacement is live in
  milliseconds. `Process.start()` can block inside multiprocessing, so it runs on one helper thread,
  as does the final stop. Each worker gets one socket pair; the loop reads the parent end itself
  (the pool's read callback, registered here with `add_reader`).
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
  `replacing`, so the service stays ready meanwhile; more crashes than workers within 10 s meet an
  exponential back-off (logged) instead of a restart spin.

Interface: the supervisor writes `PoolState.table`, `.workers` and `.replacing` and unparks workers
it kills or loses; from the pool it is given, at construction, the executor's `restarts` counter,
`read(w)` (the pool's socket read callback), `requeue(calls)` (calls a dead worker never started:
back to the front of the queue, then handed out) and `background(coro)` (the executor's background
runner). The pool calls `start`, `on_ready`, `retiring`, `kill`, `running_call`, `tick` and `stop`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import multiprocessing as mp
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from multiprocessing.process import BaseProcess
from typing import Any

from workers.errors import PoolClosed, TaskTimeout, WorkerCrashed, describe_exit
from workers.local.calls import Call, drop, drop_leases, settle
from workers.local.handle import WorkerHandle
from workers.local.processes import exit_code_of, kill_group, kill_tree, reap, stop_processes
from workers.local.state import PoolState
from workers.stats import BUSY, RETIRE_REASONS, RETIRING, WorkerTable
from workers.worker import WorkerOptions, rss_of
from workers.worker import main as worker_main

log = logging.getLogger("procbridge.pool")

_CRASH_WINDOW = 10.0
_MEMORY_CEILING = 2  # a running task is killed once its worker's RSS passes this × max_worker_memory
_DRAIN_READS = 1024  # bound on reads of a dead worker's socket (it holds at most its buffer)


class Supervisor:
    """Starts, watches, kills and replaces the worker processes of one pool."""

    def __init__(
        self,
        state: PoolState,
        *,
        restarts: Counter[str],
        read: Callable[[WorkerHandle], None],
        requeue: Callable[[list[Call]], None],
        background: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self._state = state
        self._restarts = restarts
        self._read = read
        self._requeue = requeue
        self._background = background
        self._ctx = mp.get_context("forkserver")
        self._spawner = cf.ThreadPoolExecutor(1, thread_name_prefix="procbridge-spawn")
        self._starting: dict[int, tuple[BaseProcess, socket.socket]] = {}
        self._crashes: deque[float] = deque()
        self._started: asyncio.Event | None = None
        self._shm_threshold: int | None = None
        self.closed = False

    async def start(self, prefix: str, shm_threshold: int | None) -> None:
        """Create the worker table, start every worker and return once all are ready to take calls.
        Raises if one cannot be started, dies while starting, or they are not all ready within the
        start timeout: the pool then closes."""
        state = self._state
        state.table = WorkerTable.create(len(state.workers), name=f"{prefix}table")
        self._shm_threshold = shm_threshold
        # The forkserver imports these once; every worker forked from it starts with them loaded.
        self._ctx.set_forkserver_preload(["workers.worker", "workers.builtin_tasks"])
        self._started = asyncio.Event()
        await asyncio.gather(*(self._spawn(slot) for slot in range(len(state.workers))))
        timeout = state.options.start_timeout
        try:
            await asyncio.wait_for(self._started.wait(), timeout)
        except TimeoutError:
            raise RuntimeError(f"workers did not start within {timeout:g} s") from None
        if self._restarts:
            raise RuntimeError("a worker died while starting (its traceback is above): check the task modules")

    # -- what the workers say ---------------------------------------------------------------------

    def on_ready(self, w: WorkerHandle) -> None:
        """The worker finished starting (its WORKER_READY frame): it may take calls."""
        w.ready = True
        self._state.replacing.discard(w.slot)
        if self._started is not None and all(x is not None and x.ready for x in self._state.workers):
            self._started.set()

    def retiring(self, w: WorkerHandle, reason: int) -> None:
        """The worker will exit once its last frame is out (RETIRE_NOTICE): send it nothing more."""
        w.dying = w.dying or RETIRE_REASONS.get(reason, "retired")
        self._state.replacing.add(w.slot)
        self._state.unpark(w)

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
        for w in state.workers:
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
        with contextlib.suppress(ValueError, OSError):
            if w.proc.exitcode is not None:
                return  # already gone (and reaped): its pid may not be ours any more
        kill_tree(w.pid)

    # -- a death ----------------------------------------------------------------------------------

    def on_exit(self, w: WorkerHandle) -> None:
        """The worker's process sentinel fired: it is gone. Settle its calls, re-queue the ones it
        never started, and start its replacement: all in this one callback, no waiting."""
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
        exitcode = exit_code_of(w.proc)
        kill_group(w.pid)  # whatever the task started in the worker's process group goes with it
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
            log.error("worker %d exited unexpectedly (%s)", w.pid, describe_exit(exitcode))
        self._restarts[reason] += 1
        if self._started is not None and not self._started.is_set():
            self._started.set()  # a death during start-up: start() reports it
        self._release(w.proc)
        self._requeue(requeue)
        if not self.closed:
            unplanned = reason == "crashed" or (reason == "max_memory" and running is not None)
            delay = self._backoff() if unplanned else 0.0
            if not delay:
                state.replacing.add(w.slot)
            self._background(self._respawn(w.slot, delay))

    def _release(self, proc: BaseProcess) -> None:
        """Free the dead process's handles; its exit code is known, so this does not block."""
        try:
            proc.close()
        except ValueError:  # exit status not in yet (cannot really happen once the sentinel fired)
            with contextlib.suppress(RuntimeError):
                self._spawner.submit(reap, proc)

    def _backoff(self) -> float:
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > _CRASH_WINDOW:
            self._crashes.popleft()
        excess = len(self._crashes) - max(3, len(self._state.workers))
        if excess <= 0:
            return 0.0
        delay = min(10.0, 0.1 * 2**excess)
        log.warning(
            "workers keep crashing (%d in %g s): waiting %.1f s before the next restart",
            len(self._crashes), _CRASH_WINDOW, delay,
        )
        return delay

    # -- starting ---------------------------------------------------------------------------------

    async def _respawn(self, slot: int, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        await self._spawn(slot)

    async def _spawn(self, slot: int) -> None:
        if self.closed:
            return
        state = self._state
        loop, table, options = state.loop, state.table, state.options
        assert loop is not None and table is not None
        parent, child = socket.socketpair()
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
        proc = self._ctx.Process(
            target=worker_main, args=(child, worker_options), name=f"procbridge-worker-{slot}", daemon=True
        )
        self._starting[slot] = (proc, parent)  # if the pool closes meanwhile, stop() stops it
        try:
            await loop.run_in_executor(self._spawner, proc.start)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._starting.pop(slot, None)
            state.replacing.discard(slot)
            parent.close()
            if self._started is None or not self._started.is_set():
                raise  # at start-up a failure to start is the caller's to see
            log.exception("could not start a worker; retrying in 1 s")
            if not self.closed:
                loop.call_later(1.0, lambda: self._background(self._spawn(slot)))
            return
        finally:
            child.close()
        if self.closed or self._starting.get(slot, (None,))[0] is not proc:
            return  # the pool closed while it started: stop() has it
        del self._starting[slot]
        w = WorkerHandle(slot, proc, parent)
        parent.setblocking(False)
        state.workers[slot] = w
        loop.add_reader(parent.fileno(), self._read, w)
        loop.add_reader(proc.sentinel, self.on_exit, w)

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
        closing our end tells an idle one to exit), wait for them all, free the table."""
        self.closed = True
        state = self._state
        procs: list[BaseProcess] = []
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
        for proc, parent in self._starting.values():  # still inside proc.start(): stopped right after it
            parent.close()
            procs.append(proc)
        self._starting.clear()
        state.workers[:] = [None] * len(state.workers)
        state.idle.clear()
        if state.loop is not None:
            # The spawner runs one thing at a time, so any proc.start() in progress finishes first.
            await state.loop.run_in_executor(self._spawner, stop_processes, procs, 2.0)
        self._spawner.shutdown(wait=False)
        if state.table is not None:
            state.table.close()
            state.table = None
