"""The pool's side of the worker parent (workers/local/parent.py draws the exchange): start it, wait
for its preloads, ask it for workers, stop it.

`WorkerParent.start()` and `fork()` block (a process start, a round trip to the parent) and run on
the supervisor's helper thread; `wait_ready()` and `watch()` are the loop's. A forked worker is not
our child but the parent's, so its handle, `ForkedProcess`, learns its end from the status pipe the
parent writes the exit code into: that pipe's read end is the sentinel the loop watches, as it
watched a multiprocessing sentinel before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
from multiprocessing import spawn
from typing import Any

from workers.local.parent import EXIT, PID
from workers.worker import WorkerOptions


class StartFailed(RuntimeError):
    """The worker parent could not get ready (a preload or a task module raised, or it took longer
    than the start timeout): `line` says why in one line, `details` has the traceback."""

    def __init__(self, line: str, details: str = "") -> None:
        super().__init__(line)
        self.line = line
        self.details = details


class ForkedProcess:
    """A worker the parent forked: pid, a sentinel readable once it is gone, its exit code."""

    def __init__(self, pid: int, status_r: int) -> None:
        self.pid = pid
        self.sentinel = status_r
        self._exitcode: int | None = None
        self._known = False  # the status pipe said something (a code, or EOF: the parent is gone)
        self._closed = False

    @property
    def exitcode(self) -> int | None:
        """Its exit code once the parent reaped it (negative: the signal that killed it); None while
        it runs, or when the parent died before telling."""
        self.join(0)
        return self._exitcode

    @property
    def gone(self) -> bool:
        """The status pipe has spoken: an exit code, or EOF because the parent itself is gone."""
        self.join(0)
        return self._known

    def _read(self) -> None:
        data = b""
        with contextlib.suppress(OSError):
            data = os.read(self.sentinel, EXIT.size)
        if len(data) == EXIT.size:
            self._exitcode = EXIT.unpack(data)[0]
        self._known = True

    def join(self, timeout: float | None = None) -> None:
        """Wait up to `timeout` seconds (None: for ever; 0: a poll) for the status pipe to speak."""
        if self._known or self._closed:
            return
        ready, _, _ = select.select([self.sentinel], [], [], timeout)
        if ready:
            self._read()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.sentinel)


class WorkerParent:
    """One worker parent process and its control socket."""

    def __init__(self, modules: tuple[str, ...]) -> None:
        self.modules = modules
        self.proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self._control is not None

    @property
    def control_fd(self) -> int:
        assert self._control is not None
        return self._control.fileno()

    def start(self, stdout: int | None = None, stderr: int | None = None) -> None:
        """Start the process and send it what to load (blocking: run it off the loop)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # what the service can import
        env["PYTHONUNBUFFERED"] = "1"  # what a preload prints reaches the relay as it is printed
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.local.parent", str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._control = ours
        preparation = spawn.get_preparation_data("procbridge-worker-parent")
        preparation["authkey"] = bytes(preparation["authkey"])  # pickled as plain bytes, as spawn does
        if preparation.get("init_main_from_name") == "service.__main__":
            del preparation["init_main_from_name"]  # the service's own entry point: nothing a worker needs
        ours.send(pickle.dumps({"preparation": preparation, "modules": self.modules}))

    async def wait_ready(self, timeout: float) -> tuple[float, int]:
        """Wait (on the loop) for the preloads: (seconds they took, how many ran). Raises StartFailed."""
        loop = asyncio.get_running_loop()
        control = self._control
        assert control is not None
        readable: asyncio.Future[None] = loop.create_future()
        def on_readable() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(control.fileno(), on_readable)
        try:
            await asyncio.wait_for(readable, timeout)
        except TimeoutError:
            raise StartFailed(
                f"the task modules and preloads did not finish within {timeout:g} s (--worker-start-timeout)"
            ) from None
        finally:
            loop.remove_reader(control.fileno())
        message = b""
        with contextlib.suppress(OSError):
            message = control.recv(1 << 20)
        if not message:
            code = self.proc.wait(5) if self.proc is not None else None
            raise StartFailed(f"the worker parent exited while loading the task modules (exit code {code})")
        reply: tuple[Any, ...] = pickle.loads(message)  # from our own child, never from a client
        if reply[0] != "ready":
            raise StartFailed(reply[1], reply[2])
        return reply[1], reply[2]

    def fork(self, options: WorkerOptions, sock: socket.socket, out_w: int, err_w: int) -> ForkedProcess:
        """Ask the parent for one worker (blocking: run it off the loop). `sock`, `out_w` and `err_w`
        are the worker's ends; the caller closes its copies."""
        control = self._control
        if control is None or not self.alive:
            raise OSError("the worker parent is not running")
        status_r, status_w = os.pipe()
        try:
            socket.send_fds(control, [pickle.dumps(options)], [sock.fileno(), status_w, out_w, err_w])
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        ready, _, _ = select.select([status_r], [], [], 10.0)
        data = os.read(status_r, PID.size) if ready else b""
        if len(data) != PID.size:
            os.close(status_r)
            raise OSError("the worker parent did not fork a worker")
        return ForkedProcess(PID.unpack(data)[0], status_r)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Close the control socket (the parent kills what workers are left and exits); SIGKILL it
        if it has not gone within `timeout`. Returns its exit code (blocking)."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL the parent (its workers follow: PR_SET_PDEATHSIG)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
