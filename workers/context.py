"""What a task can see of the call it runs in: today, a way to report progress.

The worker loop installs a sink before each call and removes it after; outside a worker (a task
called directly, in a test or a REPL) `progress` does nothing.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressSink = Callable[[float, float | None, str | None], None]

_sink: ProgressSink | None = None


def progress(done: float, total: float | None = None, message: str | None = None) -> None:
    """Report how far the current task has got; a no-op outside a worker or a job."""
    if _sink is not None:
        _sink(done, total, message)


def set_sink(sink: ProgressSink | None) -> None:
    global _sink
    _sink = sink
