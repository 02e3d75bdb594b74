"""What a task can see of the call it runs in: today, a way to report progress.

The code that runs a call (workers/execution.py) installs a sink before the call and removes it
after; outside a call (a task called directly, in a test or a REPL) `progress` does nothing.

Where the sink lives depends on how many calls a process runs at once:

    local worker, Dask runner child    one call at a time   process-wide (`set_sink`): a task's own
                                                             helper threads report too
    Dask worker, isolate=thread        one call per thread  per thread (`set_thread_sink`): each
                                                             call's reports reach its own caller

`progress` looks at the process-wide sink first, so the common case costs one global read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

ProgressSink = Callable[[float, float | None, str | None], None]

_sink: ProgressSink | None = None
_threads = threading.local()


def progress(done: float, total: float | None = None, message: str | None = None) -> None:
    """Report how far the current task has got; a no-op outside a worker or a job."""
    sink = _sink
    if sink is None:
        sink = getattr(_threads, "sink", None)
        if sink is None:
            return
    sink(done, total, message)


def set_sink(sink: ProgressSink | None) -> None:
    """The sink of the one call this process runs (None: no call, or nobody wants its reports)."""
    global _sink
    _sink = sink


def set_thread_sink(sink: ProgressSink | None) -> None:
    """The sink of the call the current thread runs, where threads run calls side by side."""
    _threads.sink = sink
