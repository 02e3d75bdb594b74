"""What runs on the Dask workers for `--executor dask://...` (the client side is `dask_executor.py`).

A call is one Dask task, `run(spec, payload)`, that runs a *registered* task by name: the task
modules must be importable on every Dask worker (the same image, or the same checkout on
PYTHONPATH). Two ways to run it, chosen by the service (`isolate`):

- "process" (the default): the Dask worker thread takes an idle long-lived runner child process
  (a small pool per worker process, one runner per thread started ahead by the worker plugin;
  started with subprocess, each in its own session and process group), hands it the call over a
  socket pair, and waits for the answer while watching the call's deadline and whether Dask still
  wants the task. Past the deadline, or once the task is cancelled (the client cancelled the future:
  the worker's own state for the key turns `cancelled`), the runner's process group is SIGKILLed,
  the Dask worker lives on, and a replacement runner starts in the background. Cost: one local
  socket round trip per call (plus the CPU of one more process), ~8 ms of lost capacity per kill.
- "thread": the task runs in the Dask worker thread itself. No extra hop, but Python code in a
  thread cannot be stopped: the client enforces timeouts and cancels by restarting that Dask
  worker through its nanny (seconds of lost capacity; see docs/dask.md for the measured costs).

Progress goes through Dask's structured events: `Worker.log_event(topic, msg)` on the worker, the
scheduler forwards it to the client, which subscribed to `topic` (`Client.subscribe_topic`). The
first event of every call says it started (with the pid running it and, added by the scheduler,
the worker's address), which is how the client tells queued calls from running ones.

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

import orjson

from workers import context, registry
from workers.framing import BlockingFrames
from workers.worker import describe_exception

# Kinds of call (spec[1]).
KIND_TASK = 0
KIND_MAP = 2
# Statuses of a result (first element of what `run` returns).
OK = 0  # bytes
ERROR = 1  # (exception type, message, traceback)
OK_JSON = 2  # the value encoded as JSON bytes
OK_VALUE = 3  # the value itself (calls made without encode_json)
OK_MAP = 5  # [(status, value, elapsed), ...] of a map chunk
TIMEOUT = 7  # the runner was killed at the deadline (value: the timeout)
CRASHED = 8  # the runner died mid-task (value: its exit code)
CANCELLED = 9  # Dask cancelled the task; the runner was killed
# Frames from a runner child: ("ready",), ("progress", done, total, message), ("result", status, value, elapsed).
_READY, _PROGRESS, _RESULT = "ready", "progress", "result"

PROGRESS_EVERY = 0.05  # at most one progress report per call this often (the final one always goes)
_POLL = 0.05  # how often a waiting worker thread checks the deadline and whether the task was cancelled
_RUNNER_START_TIMEOUT = 60.0
_STOPPED_STATES = frozenset({"cancelled", "released", "forgotten", "error", "memory"})

# spec: (call_id, kind, task name, encode_json, want_progress, timeout, event topic, modules, isolate)
Spec = tuple[int, int, str, bool, bool, "float | None", str, tuple[str, ...], str]


# -- the Dask task ----------------------------------------------------------------------------------


def run(spec: Spec, payload: Any) -> tuple[Any, ...]:
    """The Dask task of one procbridge call. Returns (status, value, pid, elapsed, progress events
    sent); never raises for anything the task does, so Dask's own retry machinery only ever sees
    lost workers."""
    from distributed import get_worker

    call_id, kind, name, encode, want_progress, timeout, topic, modules, isolate = spec
    worker = get_worker()
    key = worker.get_current_task()
    emit = _Emitter(worker, topic, call_id)
    if isolate == "thread":
        emit.start(os.getpid())
        return (*_run_here(kind, name, payload, encode, modules, emit if want_progress else None), emit.sent)
    pool = _pool_for(modules)
    runner = pool.take()
    emit.start(runner.pid)
    try:
        message = (kind, name, payload, encode, want_progress)
        return (*runner.call(message, timeout, emit, lambda: _cancelled(worker, key)), emit.sent)
    finally:
        pool.give(runner)


def run_function(blob: bytes) -> tuple[Any, ...]:
    """The Dask task of `DaskExecutor.submit`: an arbitrary pickled (fn, args, kwargs), in the worker thread."""
    start = time.perf_counter()
    try:
        fn, args, kwargs = pickle.loads(blob)
        return OK_VALUE, fn(*args, **kwargs), os.getpid(), time.perf_counter() - start
    except BaseException as exc:  # noqa: BLE001 - a task's failure is a value for the caller
        return ERROR, describe_exception(exc), os.getpid(), time.perf_counter() - start


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
        self._last = 0.0
        self.sent = 0  # progress events sent: the client waits for all of them before it answers

    def start(self, pid: int) -> None:
        self._worker.log_event(self._topic, {"id": self._id, "kind": "start", "pid": pid})

    def progress(self, done: float, total: float | None, message: str | None) -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_EVERY and not (total is not None and done >= total):
            return
        self._last = now
        self.sent += 1
        self._worker.log_event(
            self._topic,
            {"id": self._id, "kind": "progress", "done": float(done),
             "total": None if total is None else float(total),
             "message": None if message is None else str(message)[:1000]},
        )


# -- running a task (in the Dask worker thread, or in a runner child) -------------------------------


def _execute(kind: int, name: str, payload: Any, encode: bool) -> tuple[int, Any]:
    """Run one task call or map chunk: (status, value), the task's exception as an ERROR outcome.
    The one body of both ways a Dask worker runs a call (in its thread, or in a runner child)."""
    try:
        fn = _lookup(name)
        if kind == KIND_MAP:
            return OK_MAP, _run_chunk(fn, payload)
        return encode_value(fn(**payload), encode)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are task outcomes too
        return ERROR, describe_exception(exc)


def _run_here(
    kind: int, name: str, payload: Any, encode: bool, modules: tuple[str, ...], emit: _Emitter | None
) -> tuple[Any, ...]:
    start = time.perf_counter()
    value: Any
    if emit is not None:
        context.set_sink(emit.progress)
    try:
        registry.load(modules)
        status, value = _execute(kind, name, payload, encode)
    finally:
        if emit is not None:
            context.set_sink(None)
    return status, value, os.getpid(), time.perf_counter() - start


def _run_chunk(fn: Callable[..., Any], items: list[dict[str, Any]]) -> list[tuple[int, Any, float]]:
    out: list[tuple[int, Any, float]] = []
    for kwargs in items:
        start = time.perf_counter()
        value: Any
        try:
            status, value = encode_value(fn(**kwargs), True)
        except BaseException as exc:  # noqa: BLE001 - one item's failure is that item's result
            status, value = ERROR, describe_exception(exc)
        out.append((status, value, time.perf_counter() - start))
    return out


def encode_value(value: Any, encode: bool) -> tuple[int, Any]:
    """Bytes stay bytes; with `encode` anything else becomes JSON here, on the worker."""
    if type(value) is bytes:
        return OK, value
    if isinstance(value, bytearray | memoryview):
        return OK, bytes(value)
    if encode:
        try:
            return OK_JSON, orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
        except orjson.JSONEncodeError as exc:
            return ERROR, ("TypeError", f"the task's result is not JSON-serialisable: {exc}", "")
    return OK_VALUE, value


def _lookup(name: str) -> Callable[..., Any]:
    spec = registry.get(name)
    if spec is None:
        raise LookupError(f"task {name!r} is not registered on this Dask worker")
    param = spec.view_param
    if param is None:
        return spec.fn
    fn = spec.fn

    def with_view(**kwargs: Any) -> Any:  # a `memoryview` parameter gets a view of the bytes, as locally
        if isinstance(kwargs.get(param), bytes | bytearray):
            kwargs[param] = memoryview(kwargs[param]).toreadonly()
        return fn(**kwargs)

    return with_view


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
                except Exception as exc:  # noqa: BLE001 - the next call starts one itself (and reports)
                    print(f"procbridge: could not start a task runner: {exc}", file=sys.stderr)
                    return
                with self.lock:
                    self.idle.append(runner)

        threading.Thread(target=start, name="procbridge-runner-start", daemon=True).start()


class _Runner:
    """One runner child: `python -m workers.dask_remote FD MODULES`, its own session and process
    group, talking length-prefixed pickle frames over a socket pair. Used by one thread at a time."""

    def __init__(self, modules: tuple[str, ...]) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # what this worker can import
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.dask_remote", str(child.fileno()), ",".join(modules)],
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
        if not self._wait_ready():
            code = self.stop()
            raise RuntimeError(f"the task runner process did not start (exit code {code}); see the worker's log")

    def _wait_ready(self) -> bool:
        ready, _, _ = select.select([self.sock], [], [], _RUNNER_START_TIMEOUT)
        return bool(ready) and self.frames.recv() == (_READY,)

    def usable(self) -> bool:
        return not self.dead and self.proc.poll() is None

    def call(
        self, message: tuple[Any, ...], timeout: float | None, emit: _Emitter, cancelled: Callable[[], bool]
    ) -> tuple[Any, ...]:
        start = time.perf_counter()
        deadline = time.monotonic() + timeout if timeout else None
        try:
            self.frames.send(message)
        except OSError:
            return CRASHED, self.stop(), self.pid, time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - arguments that will not pickle fail this call only
            kind, text, tb = describe_exception(exc)
            return ERROR, (kind, f"arguments cannot be sent to the task runner: {text}", tb), self.pid, 0.0
        while True:
            wait = _POLL if deadline is None else max(0.0, min(_POLL, deadline - time.monotonic()))
            ready, _, _ = select.select([self.sock], [], [], wait)
            if ready:
                frame = self.frames.recv()
                if frame is None:  # the child died mid-task (segfault, os._exit, OOM kill)
                    return CRASHED, self.stop(), self.pid, time.perf_counter() - start
                if frame[0] == _PROGRESS:
                    emit.progress(*frame[1:])
                    continue
                _, status, value, elapsed = frame
                return status, value, self.pid, elapsed
            if deadline is not None and time.monotonic() >= deadline:
                self.stop()
                return TIMEOUT, timeout, self.pid, time.perf_counter() - start
            if cancelled():
                self.stop()
                return CANCELLED, None, self.pid, time.perf_counter() - start

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


# -- the runner child's side ------------------------------------------------------------------------


def _child_main(fd: int, modules: tuple[str, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on a terminal is the Dask worker's to handle
    sock = socket.socket(fileno=fd)
    parent = os.getppid()

    def orphan_watch() -> None:
        # A task holds this process busy and cannot see its socket close: if the Dask worker dies,
        # stop the whole process group rather than compute for nobody.
        while True:
            time.sleep(0.2)
            if os.getppid() != parent:
                os.killpg(0, signal.SIGKILL)

    threading.Thread(target=orphan_watch, name="orphan-watch", daemon=True).start()
    registry.load(modules)
    frames = BlockingFrames(sock)
    frames.send((_READY,))
    while True:
        message = frames.recv()
        if message is None:
            return
        kind, name, payload, encode, want_progress = message
        sink = _ChildProgress(frames) if want_progress else None
        context.set_sink(sink)
        start = time.perf_counter()
        value: Any
        try:
            status, value = _execute(kind, name, payload, encode)
        finally:
            context.set_sink(None)
        elapsed = time.perf_counter() - start
        try:
            frames.send((_RESULT, status, value, elapsed))
        except (BrokenPipeError, ConnectionResetError):
            return
        except BaseException as exc:  # noqa: BLE001 - a value that will not pickle fails this call only
            kind_, text, tb = describe_exception(exc)
            frames.send((_RESULT, ERROR, (kind_, f"the task's result cannot be sent back: {text}", tb), elapsed))


class _ChildProgress:
    """progress() inside a runner child: to the worker thread, at most every PROGRESS_EVERY s."""

    def __init__(self, frames: BlockingFrames) -> None:
        self._frames = frames
        self._last = 0.0

    def __call__(self, done: float, total: float | None, message: str | None) -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_EVERY and not (total is not None and done >= total):
            return
        self._last = now
        self._frames.send((_PROGRESS, float(done), None if total is None else float(total),
                           None if message is None else str(message)[:1000]))


def _atexit() -> None:
    stop_runners()


if __name__ == "__main__":
    _child_main(int(sys.argv[1]), tuple(m for m in sys.argv[2].split(",") if m))
else:
    import atexit

    atexit.register(_atexit)
