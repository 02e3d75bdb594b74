"""Misbehaving (and a few well-behaved) tasks for the pool's fault tests.

The pool imports this module in every worker when a test passes
`PoolOptions(modules=("tests.support.fault_tasks",))`, and the server does with
`--tasks tests.support.fault_tasks`. Every fault here is real: a signal, a segfault, an exit, an
allocation; nothing is simulated. Plain module-level functions double as `run_in_executor` targets.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from workers import task

MIB = 1024 * 1024

# -- well-behaved --------------------------------------------------------------------------------


@task
def echo(value: Any = None) -> dict[str, Any]:
    """Return the value and the worker's pid."""
    return {"value": value, "pid": os.getpid()}


@task
def nap(ms: float = 0.0) -> dict[str, Any]:
    """Sleep `ms` milliseconds (an idle wait, not a burn) and report the pid."""
    if ms > 0:
        time.sleep(ms / 1000.0)
    return {"pid": os.getpid(), "ms": ms}


@task
def spin(ms: float) -> dict[str, Any]:
    """Keep a core busy for `ms` milliseconds (pure Python, holds the GIL)."""
    end = time.perf_counter() + ms / 1000.0
    n = 0
    while time.perf_counter() < end:
        n += 1
    return {"pid": os.getpid(), "loops": n}


@task
def spin_forever() -> None:
    """Burn a core until killed: only a timeout or a kill ends it."""
    n = 0
    while True:
        n += 1


@task
def mark(path: str, ms: float = 0.0) -> dict[str, Any]:
    """Write this worker's pid to `path` as soon as the task starts, then sleep `ms`."""
    Path(path).write_text(str(os.getpid()))
    if ms > 0:
        time.sleep(ms / 1000.0)
    return {"pid": os.getpid()}


@task
def mark_then_wait(path: str, release: str, finished: str = "", limit_s: float = 30.0) -> dict[str, Any]:
    """Write the pid to `path`, wait (bounded) until the file `release` exists, then write `finished`."""
    Path(path).write_text(str(os.getpid()))
    released = _wait_for_file(release, limit_s)
    if finished:
        Path(finished).write_text(str(os.getpid()))
    return {"pid": os.getpid(), "released": released}


def _wait_for_file(path: str, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


@task
def fault(kind: str, marker: str = "", gate: str = "", limit_s: float = 30.0) -> Any:
    """The catalogue's one culprit: write the pid to `marker`, wait for the file `gate`, then misbehave.

    With kind "none" it returns at once; the catalogue warms it up that way first, so the pool
    counts it as a short task and pipelines other calls behind it (calls a crash must re-queue).
    """
    if marker:
        Path(marker).write_text(str(os.getpid()))
    if gate and not _wait_for_file(gate, limit_s):
        raise TimeoutError("the test never opened the gate")
    return _FAULTS[kind]()


def _spin_forever() -> None:
    n = 0
    while True:
        n += 1


def _wait_to_be_killed() -> None:
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:  # bounded: the test kills it long before
        time.sleep(0.005)
    raise TimeoutError("nobody killed this worker")


class _ExitOnLoad:
    """Pickles fine in the worker; unpickling it calls sys.exit (it must not stop the service's loop)."""

    def __reduce__(self) -> Any:
        return (sys.exit, (5,))


_FAULTS: dict[str, Any] = {
    "none": lambda: {"pid": os.getpid()},
    "wait_kill": _wait_to_be_killed,
    "segfault": lambda: ctypes.string_at(0),
    "os_exit": lambda: os._exit(3),
    "kill_self": lambda: os.kill(os.getpid(), signal.SIGKILL),
    "spin_forever": _spin_forever,
    "blow_up": lambda: blow_up(4096, 16),
    "sys_exit": lambda: sys.exit(0),
    "sys_exit_msg": lambda: sys.exit("bye"),
    "keyboard_interrupt": lambda: (_ for _ in ()).throw(KeyboardInterrupt()),
    "needs_two": lambda: (_ for _ in ()).throw(NeedsTwo(1, 2)),
    "holds_lock": lambda: (_ for _ in ()).throw(HoldsLock("a lock inside")),
    "return_lock": lambda: threading.Lock(),
    "return_needs_two": lambda: NeedsTwo(3, 4),
    "return_exit_on_load": lambda: _ExitOnLoad(),
    "return_explosive": lambda: Explosive(),
}


@task
def append_pid(path: str) -> int:
    """Append this worker's pid as one line to `path`: the file counts how often the call ran."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()


def add(a: int, b: int) -> int:
    """A plain function for the executor API."""
    return a + b


def pid_after(ms: float = 0.0) -> int:
    if ms > 0:
        time.sleep(ms / 1000.0)
    return os.getpid()


@task
def spawn_child(info: str, limit_s: float = 30.0) -> None:
    """Start a child process that sleeps ten minutes (it stays in this worker's process group: nothing
    here moves it), check it runs, write {"worker", "child", "child_pgid"} to `info` (atomically), then
    wait (bounded) to be killed: only a timeout, a cancel or a kill of the worker ends the call."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    if child.poll() is not None:
        raise RuntimeError(f"the child exited at once ({child.returncode})")
    report = {"worker": os.getpid(), "child": child.pid, "child_pgid": os.getpgid(child.pid)}
    Path(info + ".tmp").write_text(json.dumps(report))
    os.replace(info + ".tmp", info)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:  # bounded: the test kills this worker long before
        time.sleep(0.005)
    child.kill()
    raise TimeoutError("nobody killed this worker")


# -- crashes -------------------------------------------------------------------------------------


@task
def segfault() -> None:
    """A real segmentation fault: read address 0."""
    ctypes.string_at(0)


@task
def hard_exit(code: int = 3) -> None:
    """Leave the process at once, skipping every handler."""
    os._exit(code)


@task
def kill_self(sig: int = int(signal.SIGKILL)) -> None:
    os.kill(os.getpid(), sig)


@task
def blow_up(limit_mb: int = 4096, step_mb: int = 16) -> int:
    """Allocate (and touch) memory step by step up to `limit_mb`: the pool's memory ceiling must stop it."""
    hold = []
    for _ in range(limit_mb // step_mb):
        hold.append(b"\x01" * (step_mb * MIB))
        time.sleep(0.002)
    return len(hold)


def crash_in_function() -> None:
    """The executor-API twin of hard_exit."""
    os._exit(3)


# -- failures the worker must survive ------------------------------------------------------------


@task
def exit_task(code: int = 0) -> None:
    sys.exit(code)


@task
def interrupt() -> None:
    raise KeyboardInterrupt


@task
def fail(message: str = "boom") -> None:
    raise ValueError(message)


class NeedsTwo(Exception):
    """An exception whose __init__ takes two required arguments: pickle.loads of it fails."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"needs {a} and {b}")
        self.a = a
        self.b = b


class HoldsLock(Exception):
    """An exception holding a lock: pickle.dumps of it fails."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


@task
def raise_needs_two() -> None:
    raise NeedsTwo(1, 2)


@task
def raise_holds_lock() -> None:
    raise HoldsLock("a lock inside")


@task
def return_lock() -> Any:
    """A result that cannot be pickled."""
    return threading.Lock()


@task
def return_needs_two() -> Any:
    """A result that pickles in the worker but cannot be unpickled by the service."""
    return NeedsTwo(3, 4)


class Explosive:
    """Pickling it raises SystemExit: the worker must not exit because of it."""

    def __reduce__(self) -> Any:
        raise SystemExit(7)


@task
def return_explosive() -> Any:
    return Explosive()


def function_returning_lock() -> Any:
    return threading.Lock()


def function_raising_holds_lock() -> None:
    raise HoldsLock("from the executor API")


# -- recycling -----------------------------------------------------------------------------------

_LEAK: list[bytes] = []


@task
def leak(mb: int = 4) -> dict[str, Any]:
    """Keep `mb` more MiB alive in a module-level list on every call."""
    _LEAK.append(b"\x01" * (mb * MIB))
    return {"pid": os.getpid(), "held_mb": len(_LEAK) * mb}
