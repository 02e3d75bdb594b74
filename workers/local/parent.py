"""The worker parent: the one process the local pool's workers are forked from.

    service process (the pool, workers/local/forks.py)          worker parent (this module)
    ──────────────────────────────────────────────────          ────────────────────────────
    python -m workers.local.parent FD  ──── spawn ────────────▶ ignore SIGTERM/SIGINT, die with the service
    init: (preparation data, modules)  ── control socket ────▶ import the task modules, run every
                                                               @preload, gc.freeze()
                                       ◀── ("ready", s) ─────   (or ("failed", line, traceback); exit 1)
    fork request: (WorkerOptions)      ── control socket ────▶ os.fork()
      + fds: the worker's socket, its                              └─ child: own process group, fds
        status pipe, its stdout and                                   1 and 2 on the output pipes,
        stderr pipes (SCM_RIGHTS)                                     workers.worker.main()
    status pipe: the pid at once,      ◀── written by ────────  reaps every child (SIGCHLD) and
      the exit code once it is reaped      the parent           writes its exit code
    control socket closed              ────────────────────▶ SIGKILL what is left, reap, exit 0

Why a parent of our own, not multiprocessing's forkserver: the forkserver is one per service
process (not per pool), imports modules but runs no function, reports nothing when an import
fails, and dies on a SIGTERM to the process group (systemd's stop, `kill -- -PGID`, `timeout`),
which took every worker with it: the in-flight calls got 502 instead of draining. This parent:

- runs the preloads once, so what they build is shared copy-on-write by every worker, and a
  replacement worker is a fork of a warm process (milliseconds, no preload again);
- ignores SIGTERM and SIGINT (the service drains and then stops it), and dies with the service:
  PR_SET_PDEATHSIG, and EOF on its control socket; each worker dies with it the same way, so a
  SIGKILL of the whole process group leaves no process behind;
- is single-threaded and forks only from its main loop; gc.freeze() after the preloads keeps the
  collector from writing into the pages every worker shares.

It never sees a client's data: its messages come from the pool (pickled by the service itself).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import pickle
import select
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from multiprocessing import spawn
from typing import Any

from workers import hooks, registry
from workers.local.output import redirect_output

PID = struct.Struct("q")  # the first record on a status pipe: the forked pid
EXIT = struct.Struct("i")  # the second: its exit code (negative: killed by that signal)
MAX_MESSAGE = 1 << 20
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def name_process(name: str) -> None:
    """Set the name `ps -o comm`, `top` and the OOM killer's log show (Linux, 15 bytes at most), so an
    operator tells the worker parent and each worker apart from the service."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def die_with_parent(expected_parent: int) -> None:
    """Ask the kernel for SIGKILL when the parent goes (Linux); exit now if it already went."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != expected_parent:
        os._exit(1)


def main(fd: int, service_pid: int) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a group SIGTERM is the service's to handle: it drains
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(service_pid)
    name_process("pb-parent")
    control = socket.socket(fileno=fd)
    init: dict[str, Any] = pickle.loads(control.recv(MAX_MESSAGE))
    spawn.prepare(init["preparation"])  # sys.path, cwd and __main__ as the service has them
    modules: tuple[str, ...] = init["modules"]
    started = time.monotonic()
    try:
        registry.load(modules)
        import workers.worker  # noqa: F401 - what every worker runs, loaded once here

        ran = hooks.run_preloads(modules)
        gc.collect()
        gc.freeze()  # what exists now is shared by every worker: the collector must not write to it
    except BaseException as exc:  # noqa: BLE001 - told to the pool, then this process ends
        if isinstance(exc, hooks.HookFailed):
            line = str(exc)
        else:
            line = f"importing the task modules failed: {type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            control.send(pickle.dumps(("failed", line, hooks.hook_traceback(exc))))
        return 1
    with contextlib.suppress(OSError):
        control.send(pickle.dumps(("ready", time.monotonic() - started, ran)))
    _Parent(control).serve()
    return 0


class _Parent:
    """The fork loop: fork requests from the control socket, exit statuses from SIGCHLD."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.children: dict[int, int] = {}  # pid -> the write end of its status pipe
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)

    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd does the work
        selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ)
        selector.register(self.wake_r, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self.wake_r:
                        with contextlib.suppress(BlockingIOError):
                            while self.wake_r.recv(4096):
                                pass
                        self.reap()
                    elif not self.on_request():
                        return
        finally:
            self.stop_children()

    def on_request(self) -> bool:
        """One fork request; False once the pool closed the control socket."""
        try:
            message, fds, _flags, _addr = socket.recv_fds(self.control, MAX_MESSAGE, 4)
        except OSError:
            return False
        if not message:
            for fd in fds:
                os.close(fd)
            return False
        options = pickle.loads(message)
        sock_fd, status_w, out_w, err_w = fds
        for stream in (sys.stdout, sys.stderr):  # nothing buffered here may be written twice
            with contextlib.suppress(Exception):
                stream.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = self.child(options, sock_fd, status_w, out_w, err_w)
            except BaseException:  # noqa: BLE001 - told on the worker's stderr, then it ends
                with contextlib.suppress(Exception):
                    traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(code)
        for fd in (sock_fd, out_w, err_w):
            os.close(fd)
        with contextlib.suppress(OSError):  # the pool gave up waiting: the child dies with its socket closed
            os.write(status_w, PID.pack(pid))
        self.children[pid] = status_w
        return True

    def child(self, options: Any, sock_fd: int, status_w: int, out_w: int, err_w: int) -> int:
        """In the forked worker: cut every tie to the parent's loop, then run the worker."""
        parent = os.getppid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        die_with_parent(parent)
        name_process(f"pb-worker-{options.slot}")
        self.control.close()
        self.wake_r.close()
        self.wake_w.close()
        for fd in (status_w, *self.children.values()):
            os.close(fd)
        redirect_output(out_w, err_w)  # fds 1 and 2 onto the relay's pipes, print line-buffered
        from workers.worker import main as worker_main

        return worker_main(socket.socket(fileno=sock_fd), options)

    def reap(self, block: bool = False) -> None:
        """Reap the children that have exited (with `block`, wait for every one left) and write each
        one's exit code on its status pipe."""
        while self.children or not block:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            status_w = self.children.pop(pid, None)
            if status_w is not None:
                with contextlib.suppress(OSError):
                    os.write(status_w, EXIT.pack(os.waitstatus_to_exitcode(status)))
                os.close(status_w)

    def stop_children(self) -> None:
        """The pool is gone: whatever worker is left is killed (with its process group) and reaped."""
        deadline = time.monotonic() + 2.0
        self.reap()
        while self.children and time.monotonic() < deadline:  # the pool stopped them already, mostly
            select.select([self.wake_r], [], [], max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(BlockingIOError):
                while self.wake_r.recv(4096):
                    pass
            self.reap()
        for pid in list(self.children):
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)
        self.reap(block=True)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
