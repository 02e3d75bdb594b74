"""The ways a call on the pool can end badly, as plain exceptions.

They carry only strings and numbers, so they pickle cleanly and mean the same thing whichever
executor (local pool or Dask) raised them. The service maps each to one problem+json answer.
"""

from __future__ import annotations


class PoolError(Exception):
    """Base of every error the pool raises for a call."""


class TaskFailed(PoolError):
    """The task raised (any BaseException, SystemExit and KeyboardInterrupt included)."""

    def __init__(self, exc_type: str, message: str, traceback: str = "") -> None:
        super().__init__(exc_type, message, traceback)
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback

    def __str__(self) -> str:
        return f"{self.exc_type}: {self.message}" if self.message else self.exc_type


class WorkerCrashed(PoolError):
    """The worker process died while it was running this call. `pid` and `exitcode` are None where
    the backend cannot know them (a Dask worker lost by the scheduler); `detail` then says what
    happened."""

    def __init__(self, pid: int | None, exitcode: int | None, detail: str = "") -> None:
        super().__init__(pid, exitcode, detail)
        self.pid = pid
        self.exitcode = exitcode
        self.detail = detail

    def __str__(self) -> str:
        if self.detail:
            return self.detail
        return f"worker {self.pid} died while running the task ({describe_exit(self.exitcode)})"


class ExecutorUnavailable(PoolError):
    """The executor cannot run the call at all: its cluster is unreachable, or has had no worker
    for too long. Answered 502 like a crashed worker (the upstream failed), never left hanging."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class TaskTimeout(PoolError):
    """The call ran past its timeout; its worker was killed and replaced."""

    def __init__(self, timeout: float) -> None:
        super().__init__(timeout)
        self.timeout = timeout

    def __str__(self) -> str:
        return f"the task ran longer than its timeout of {self.timeout:g} s; its worker was stopped"


class Overloaded(PoolError):
    """The admission queue is full: the call was refused without waiting."""

    def __init__(self, pending: int) -> None:
        super().__init__(pending)
        self.pending = pending

    def __str__(self) -> str:
        return f"{self.pending} tasks are already waiting for a worker; retry later"


class StreamingUnsupported(PoolError):
    """This executor cannot stream a generator task's items (the Dask executor: docs/dask.md)."""

    def __init__(self, task: str, executor: str) -> None:
        super().__init__(task, executor)
        self.task = task
        self.executor = executor

    def __str__(self) -> str:
        return (f"task {self.task!r} is a generator, whose items stream; the {self.executor} cannot stream them "
                "(run it on the local pool)")


class PoolClosed(PoolError):
    """The pool is draining or closed and takes no new work (or dropped this call while stopping)."""

    def __str__(self) -> str:
        return "the service is shutting down and takes no new work"


def describe_exit(exitcode: int | None) -> str:
    """'killed by SIGKILL', 'exit code 3' or 'exit status unknown' for a worker's exit code."""
    import signal

    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
