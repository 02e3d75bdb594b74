"""What runs on the Dask workers for `--executor dask://...` (the client side is the rest of `workers/dask/`).

A call is one Dask task, `run(spec, payload)`, that runs a *registered* task by name: the task
modules must be importable on every Dask worker (the same image, or the same checkout on
PYTHONPATH). What the call does is workers/execution.py, as on the local pool; this module is only
Dask's transport for it. Two ways to run it, chosen by the service (`isolate`):

    Dask worker process                                         runner child (isolate=process)
    ───────────────────                                         ──────────────────────────────
    run(spec, payload) ── isolate=thread ─▶ Execution.run       (none)
           │
           └─ isolate=process ─▶ _RunnerPool.take ─▶ _Runner.call
                                   │  [(call_id, CALL_*, ...)]  ──▶   workers.worker.main: the local
                                   │  [(call_id, PROGRESS_REPORT)] ◀─  worker loop, no table, no
                                   │  [(call_id, RESULT_*, ...)]  ◀─   shared memory, no limits
                                   │  every 50 ms: past the deadline? cancelled by Dask?
                                   └─ yes: SIGKILL its process group ─▶ RUNNER_TIMED_OUT / RUNNER_CANCELLED;
                                           a replacement starts in the background

- "process" (the default): the Dask worker thread takes an idle long-lived runner child process
  (a small pool per worker process, one runner per thread started ahead by the worker plugin;
  started with subprocess, each in its own session and process group), hands it the call over a
  socket pair, and waits for the answer while watching the call's deadline and whether Dask still
  wants the task. Past the deadline, or once the task is cancelled (the client cancelled the future:
  the worker's own state for the key turns `cancelled`), the runner's process group is SIGKILLed,
  the Dask worker lives on, and a replacement runner starts in the background. Cost: one local
  socket round trip per call (plus the CPU of one more process), ~8 ms of lost capacity per kill.
  Each runner child runs the task modules' `@preload`s and then `@on_worker_start`s as it starts
  (workers/worker.py `main`; each child builds its own preloads, nothing is shared between them, and
  the Dask worker process runs neither). A child whose hook raises says so (WORKER_START_FAILED,
  printed here with its traceback) and exits: the call that wanted it ends RUNNER_START_FAILED
  (502, naming the hook and its exception), and the next call starts a runner again.
- "thread": the task runs in the Dask worker thread itself. No extra hop, but Python code in a
  thread cannot be stopped: the client enforces timeouts and cancels by restarting that Dask
  worker through its nanny (seconds of lost capacity; see docs/dask.md for the measured costs).
  The hooks run in the Dask worker process (`run_hooks`: the worker plugin's setup, once; a call
  where they raised runs them again itself, and ends RUNNER_START_FAILED, a 502 naming the hook,
  while they still raise).

A runner child *is* a local worker (`workers.worker.main`: the same frames, constants and loop), but
the runner pool here cannot be the local pool (`workers/local/`), because:

- a Dask worker is a daemonic multiprocessing child of its nanny (`distributed.worker.daemon`), and
  multiprocessing refuses to start children from a daemonic process, so runners start with
  subprocess (`python -m workers.dask.remote FD MODULES`), not forked by the pool's worker parent;
- the local pool is driven by an asyncio loop it owns and supervises through a shared-memory table
  with a timer; here each Dask worker thread blocks in its task and must watch its one call itself
  (deadline, Dask's cancel), so a runner is taken per call and watched by the thread that took it;
- a runner must die with its Dask worker even mid-task (it polls its parent pid and kills its own
  group), where a local worker is stopped by its pool; and Dask carries the data, so there is no
  shared memory, no worker table, no batching, retirement or window to manage.

Progress goes through Dask's structured events: `Worker.log_event(topic, msg)` on the worker, the
scheduler forwards it to the client, which subscribed to `topic` (`Client.subscribe_topic`). The
first event of every call says it started (with the pid running it and, added by the scheduler,
the worker's address), which is how the client tells queued calls from running ones. Reports are
throttled where the task runs (execution.Progress: in the thread, or in the runner child, whose
reports the thread forwards as they come).

This module is light on purpose: the runner children import it (and the task modules) but never
dask or distributed.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from workers import hooks, registry
from workers.execution import Execution, Progress, Report, describe_exception
from workers.framing import BlockingFrames
from workers.protocol import (
    PROGRESS_REPORT,
    RESULT_ERROR,
    RESULT_PICKLED,
    RESULT_VALUE,
    RUNNER_CANCELLED,
    RUNNER_CRASHED,
    RUNNER_START_FAILED,
    RUNNER_TIMED_OUT,
    WORKER_READY,
    WORKER_START_FAILED,
)
from workers.worker import WorkerOptions
from workers.worker import main as worker_main

_POLL = 0.05  # how often a waiting worker thread checks the deadline and whether the task was cancelled
_RUNNER_START_TIMEOUT = 60.0
_STOPPED_STATES = frozenset({"cancelled", "released", "forgotten", "error", "memory"})
# isolate=thread: Dask serialises the results itself; the worker's threads run calls side by side
_IN_THREAD = Execution(pickle_values=False, threads=True)

# spec: (call_id, kind, task name, encode_json, want_progress, timeout, event topic, modules, isolate)
Spec = tuple[int, int, str, bool, bool, "float | None", str, tuple[str, ...], str]


# -- the Dask task ----------------------------------------------------------------------------------


def run(spec: Spec, payload: Any) -> tuple[Any, ...]:
    """The Dask task of one procbridge call. Returns (tag, value, pid, elapsed, progress reports
    sent), the tag a RESULT_* or RUNNER_* of workers/protocol.py; never raises for anything the task
    does, so Dask's own retry machinery only ever sees lost workers."""
    from distributed import get_worker

    call_id, kind, name, encode, want_progress, timeout, topic, modules, isolate = spec
    worker = get_worker()
    key = worker.get_current_task()
    emit = _Emitter(worker, topic, call_id)
    if isolate == "thread":
        registry.load(modules)
        try:
            run_hooks(modules)  # at once: the worker plugin ran them (unless they raised there)
        except hooks.HookFailed as exc:  # this call fails (502) naming the hook; the next one tries again
            details = hooks.hook_traceback(exc)
            print(f"procbridge: the worker-state hooks failed in this Dask worker: {exc}\n{details}", file=sys.stderr)
            detail = f"the worker-state hooks failed on Dask worker {worker.address}: {exc}"
            return RUNNER_START_FAILED, (detail, details, None), os.getpid(), 0.0, 0
        emit.start(os.getpid())
        start = time.perf_counter()
        progress = Progress(emit.report, call_id) if want_progress else None
        tag, value = _IN_THREAD.run(kind, name, payload, encode, False, call_id, progress)
        return tag, value, os.getpid(), time.perf_counter() - start, emit.sent
    pool = _pool_for(modules)
    try:
        runner = pool.take()
    except RunnerStartFailed as exc:  # its hook raised: this call fails (502), the next one tries again
        detail = f"the task runner could not start on Dask worker {worker.address}: {exc.line}"
        return RUNNER_START_FAILED, (detail, exc.details, exc.exitcode), exc.pid, 0.0, 0
    emit.start(runner.pid)
    try:
        message = (call_id, kind, name, payload, encode, want_progress, False)
        return (*runner.call(message, timeout, emit, lambda: _cancelled(worker, key)), emit.sent)
    finally:
        pool.give(runner)


def run_function(blob: bytes) -> tuple[Any, ...]:
    """The Dask task of `DaskExecutor.submit`: an arbitrary pickled (fn, args, kwargs), in the worker
    thread; the value goes back as is (Dask serialises it)."""
    start = time.perf_counter()
    try:
        fn, args, kwargs = pickle.loads(blob)
        return RESULT_VALUE, fn(*args, **kwargs), os.getpid(), time.perf_counter() - start
    except BaseException as exc:  # noqa: BLE001 - a task's failure is a value for the caller
        return RESULT_ERROR, describe_exception(exc), os.getpid(), time.perf_counter() - start


_hooks_ran: set[tuple[str, ...]] = set()  # isolate=thread: module sets whose hooks last ran here without raising
_hooks_lock = threading.Lock()


def run_hooks(modules: tuple[str, ...], again: bool = False) -> None:
    """isolate=thread: run the modules' `@preload`s (each once per process) and then their
    `@on_worker_start`s in this Dask worker process. The worker plugin's setup runs them (`again`:
    on_worker_start anew, for a service that introduces itself again); a call runs them only where
    they have not run without raising: they raised in the setup (a worker that joined while the
    hook fails), or the setup is still running them (a worker takes tasks before its plugins' setup
    is done: the call waits for it). Raises hooks.HookFailed."""
    if modules in _hooks_ran and not again:
        return
    with _hooks_lock:
        if modules in _hooks_ran and not again:
            return
        _hooks_ran.discard(modules)
        hooks.run_preloads(modules)
        hooks.run_worker_start(modules)
        _hooks_ran.add(modules)


def kill_worker() -> None:
    """Run on a Dask worker's event loop (`Client.run`) to stop a task in thread mode: SIGKILL the
    worker process itself, with whatever its threads run; its nanny starts a fresh one at once.
    (A graceful `restart_workers` first waits seconds for the busy thread, in vain.)"""
    stop_runners()
    os.kill(os.getpid(), signal.SIGKILL)


def probe(modules: tuple[str, ...]) -> dict[str, Any]:
    """Run on every Dask worker at connect time (`Client.run`): its pid, and whether it can import
    the task modules (the error message if not)."""
    try:
        registry.load(modules)
        error = None
    except BaseException as exc:  # noqa: BLE001 - reported to the service, which refuses to start
        error = f"{type(exc).__name__}: {exc}"
    return {"pid": os.getpid(), "error": error}


def _cancelled(worker: Any, key: Any) -> bool:
    """Whether Dask stopped wanting this task (the client cancelled or released its future, or the
    scheduler moved it away). The worker's state machine runs on its event loop; reading one
    entry's state from this thread is a plain attribute read."""
    ts = worker.state.tasks.get(key)
    return ts is None or ts.state in _STOPPED_STATES


class _Emitter:
    """Sends this call's events (start, progress) to the service through the scheduler."""

    def __init__(self, worker: Any, topic: str, call_id: int) -> None:
        self._worker = worker
        self._topic = topic
        self._id = call_id
        self.sent = 0  # progress events sent: the client waits for all of them before it answers

    def start(self, pid: int) -> None:
        self._worker.log_event(self._topic, {"id": self._id, "kind": "start", "pid": pid})

    def report(self, call_id: int, report: Report) -> None:
        """One progress report, already throttled and normalised where the task runs (execution.Progress)."""
        done, total, message = report
        self.sent += 1
        self._worker.log_event(
            self._topic, {"id": self._id, "kind": "progress", "done": done, "total": total, "message": message}
        )


# -- runner children (isolate="process") -----------------------------------------------------------

_pools: dict[tuple[str, ...], _RunnerPool] = {}
_all_runners: set[_Runner] = set()
_all_lock = threading.Lock()


def _pool_for(modules: tuple[str, ...]) -> _RunnerPool:
    with _all_lock:
        pool = _pools.get(modules)
        if pool is None:
            pool = _pools[modules] = _RunnerPool(modules)
        return pool


def prestart(modules: tuple[str, ...], count: int) -> None:
    """Start `count` idle runner children in the background (the worker plugin's setup)."""
    _pool_for(modules).top_up_soon(count)


def stop_runners() -> None:
    """Kill every runner child of this process (worker plugin teardown, and at exit)."""
    with _all_lock:
        runners = list(_all_runners)
        _pools.clear()
    for runner in runners:
        runner.stop()


class _RunnerPool:
    """Idle runner children of one set of task modules. A worker thread takes one for a call and
    gives it back after; one that was killed (timeout, cancel) or died is replaced in the
    background at once, so the next call does not pay for the start."""

    def __init__(self, modules: tuple[str, ...]) -> None:
        self.modules = modules
        self.idle: list[_Runner] = []
        self.lock = threading.Lock()

    def take(self) -> _Runner:
        with self.lock:
            while self.idle:
                runner = self.idle.pop()
                if runner.usable():
                    return runner
                runner.stop()
        return _Runner(self.modules)

    def give(self, runner: _Runner) -> None:
        if runner.usable():
            with self.lock:
                self.idle.append(runner)
        else:
            self.top_up_soon(1, at_least=False)

    def top_up_soon(self, count: int, at_least: bool = True) -> None:
        """Start runners on a helper thread: `count` more, or (at_least) until `count` are idle."""

        def start() -> None:
            with self.lock:
                missing = count - len(self.idle) if at_least else count
            for _ in range(max(0, missing)):
                try:
                    runner = _Runner(self.modules)
                except RunnerStartFailed:  # printed with its traceback; the next call tries again
                    return
                except Exception as exc:  # noqa: BLE001 - the next call starts one itself (and reports)
                    print(f"procbridge: could not start a task runner: {exc}", file=sys.stderr)
                    return
                with self.lock:
                    self.idle.append(runner)

        threading.Thread(target=start, name="procbridge-runner-start", daemon=True).start()


class RunnerStartFailed(RuntimeError):
    """A runner child did not start: a `@preload` or `@on_worker_start` hook raised in it, or a task
    module would not import (`line` and `details`, its traceback, as the child sent them), or it
    was not ready in time. Printed with its traceback to the Dask worker's stderr where it happens."""

    def __init__(self, line: str, details: str = "", pid: int = 0, exitcode: int | None = None) -> None:
        super().__init__(line, details, pid, exitcode)
        self.line = line
        self.details = details
        self.pid = pid
        self.exitcode = exitcode

    def __str__(self) -> str:
        return self.line


class _Runner:
    """One runner child: `python -m workers.dask.remote FD MODULES`, its own session and process
    group, a local worker loop at the other end of a socket pair (the local pool's frames; unbuffered
    here, since select() must see every frame arrive). Used by one thread at a time."""

    def __init__(self, modules: tuple[str, ...]) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # what this worker can import
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.dask.remote", str(child.fileno()), ",".join(modules)],
                pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            child.close()
        self.pid = self.proc.pid
        self.sock = parent
        self.frames = BlockingFrames(parent)
        self.dead = False
        with _all_lock:
            _all_runners.add(self)
        failure = self._wait_ready()
        if failure is not None:
            line, details = failure
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)  # a child whose hook raised exits on its own (START_FAILED_EXIT)
            code = self.stop()
            raise RunnerStartFailed(line, details, self.pid, code)

    def _wait_ready(self) -> tuple[str, str] | None:
        """None once the child is ready, else why not: (one line, traceback); its `@preload` or
        `@on_worker_start` hook raised, or a task module would not import."""
        ready, _, _ = select.select([self.sock], [], [], _RUNNER_START_TIMEOUT)
        if not ready:
            return f"the task runner was not ready within {_RUNNER_START_TIMEOUT:g} s", ""
        frame = self.frames.recv()
        if frame == WORKER_READY:
            return None
        if type(frame) is tuple and frame and frame[0] == WORKER_START_FAILED:
            print(f"procbridge: a task runner could not start: {frame[1]}\n{frame[2]}", file=sys.stderr)
            return str(frame[1]), str(frame[2])
        return "the task runner exited before it was ready (see the Dask worker's log)", ""

    def usable(self) -> bool:
        return not self.dead and self.proc.poll() is None

    def call(
        self, message: tuple[Any, ...], timeout: float | None, emit: _Emitter, cancelled: Callable[[], bool]
    ) -> tuple[Any, ...]:
        """Run one call message (protocol.py's shape) in the child: (tag, value, pid, elapsed)."""
        start = time.perf_counter()
        deadline = time.monotonic() + timeout if timeout else None
        try:
            self.frames.send([message])
        except OSError:
            return RUNNER_CRASHED, self.stop(), self.pid, time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - arguments that will not pickle fail this call only
            kind, text, tb = describe_exception(exc)
            return RESULT_ERROR, (kind, f"arguments cannot be sent to the task runner: {text}", tb), self.pid, 0.0
        while True:
            wait = _POLL if deadline is None else max(0.0, min(_POLL, deadline - time.monotonic()))
            ready, _, _ = select.select([self.sock], [], [], wait)
            if ready:
                frame = self.frames.recv()
                if frame is None:  # the child died mid-task (segfault, os._exit, OOM kill)
                    return RUNNER_CRASHED, self.stop(), self.pid, time.perf_counter() - start
                for _call_id, tag, value, elapsed in frame:
                    if tag == PROGRESS_REPORT:
                        emit.report(_call_id, value)
                        continue
                    # A runner has no threshold and no limits: it never asks for a segment nor
                    # retires, so any other row is the call's result.
                    if tag == RESULT_PICKLED:
                        tag, value = _unpickled(value)
                    return tag, value, self.pid, elapsed
                continue
            if deadline is not None and time.monotonic() >= deadline:
                self.stop()
                return RUNNER_TIMED_OUT, timeout, self.pid, time.perf_counter() - start
            if cancelled():
                self.stop()
                return RUNNER_CANCELLED, None, self.pid, time.perf_counter() - start

    def stop(self) -> int | None:
        """SIGKILL the child's process group (what its task started goes too) and reap it."""
        self.dead = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        with contextlib.suppress(OSError):
            self.sock.close()
        with _all_lock:
            _all_runners.discard(self)
        return code


def _unpickled(blob: bytes) -> tuple[int, Any]:
    """A value the runner pickled on its own, as the value itself (Dask sends it on to the client)."""
    try:
        return RESULT_VALUE, pickle.loads(blob)
    except BaseException as exc:  # noqa: BLE001 - not even SystemExit may escape into the Dask worker
        kind, text, tb = describe_exception(exc)
        return RESULT_ERROR, (kind, f"the task's result cannot be decoded by the Dask worker: {text}", tb)


# -- the runner child's side ------------------------------------------------------------------------


def _child_main(fd: int, modules: tuple[str, ...]) -> int:
    """A runner child: the local worker loop, without a worker table, shared memory or limits, and
    with a watch on its parent, since nobody else will stop it mid-task if the Dask worker dies."""
    parent = os.getppid()

    def orphan_watch() -> None:
        # A task holds this process busy and cannot see its socket close: if the Dask worker dies,
        # stop the whole process group rather than compute for nobody.
        while True:
            time.sleep(0.2)
            if os.getppid() != parent:
                os.killpg(0, signal.SIGKILL)

    threading.Thread(target=orphan_watch, name="orphan-watch", daemon=True).start()
    return worker_main(socket.socket(fileno=fd), WorkerOptions(slot=0, modules=modules, table_name="", table_slots=0))


def _atexit() -> None:
    stop_runners()


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1]), tuple(m for m in sys.argv[2].split(",") if m)))
else:
    import atexit

    atexit.register(_atexit)
