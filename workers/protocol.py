"""The wire between the service and the processes that run its tasks: every constant, one meaning each.

Two transports carry the same messages. The local pool talks to its worker processes over a socket
pair (workers/local/ <-> workers/worker.py, frames from workers/framing.py); the Dask executor
hands a call to a Dask worker as a Dask task (workers/dask/executor.py -> workers/dask/remote.py),
which by default passes it on to a runner child that is a local worker loop (same frames as above).
Both run the call with workers/execution.py, so a call's kind and a result's tag mean the same thing
whichever way the call went:

    service                                      worker process (or Dask worker thread)
    ───────                                      ──────────────────────────────────────
    [(call_id, CALL_*, name, payload,    ──▶     execution.Execution.run
      encode_json, progress, shm), ...]                    │
                                                           ▼
    [(call_id, RESULT_*, value, elapsed), ...]   ◀──  one row per finished call (coalesced)
    [(call_id, PROGRESS_REPORT, report, 0.0)]    ◀──  while the call runs, at once, throttled
    [(call_id, SEGMENT_REQUEST, size, 0.0)]      ◀──  a large bytes result wants a segment...
    (GRANT_SEGMENT, call_id, name | None)        ──▶  ...which the service grants (or not)
    (FORGET_SEGMENTS, [name, ...])               ──▶  unlinked segments: unmap them
    [(call_id, STREAM_ITEM, item, 0.0)]          ◀──  a CALL_STREAM's item, at once, one per frame...
    (STREAM_ACK, call_id, taken)                 ──▶  ...the service took `taken` of them (credit)
    (STREAM_CLOSE, call_id)                      ──▶  its consumer is gone: close the generator
    [(0, RETIRE_NOTICE, reason, 0.0)]                 ◀──  the worker exits after this frame
    WORKER_READY                                 ◀──  once, when the worker has started (its
                                                      on_worker_start hooks ran), or instead
    (WORKER_START_FAILED, line, traceback)       ◀──  a hook raised: it exits after this frame

A call message: `(call_id, kind, name, payload, encode_json, progress, shm)`, where `progress` says
whether the caller wants the task's `progress()` reports and `shm` whether some arguments are
`ShmRef(name, length)` handles to shared-memory segments holding the bytes (workers/shm.py).

A frame from a worker is a list of rows `(call_id, tag, payload, elapsed)`. The tag is a RESULT_*
(the call is over) or one of the notices PROGRESS_REPORT, SEGMENT_REQUEST, RETIRE_NOTICE (it is not):
all are plain ints in one numbering, so no value means two things and the loop tells them apart
with one comparison each, on the hot path. `workers.dask.remote.run` returns the same tags
(plus the RUNNER_* ones, which only the Dask worker thread watching a runner child produces) as
`(tag, value, pid, elapsed, progress reports sent)`.

Plain ints and strings, not enums: a row is pickled for every call, and an enum member pickles as
a reference to its class.
"""

from __future__ import annotations

from typing import Final

# -- what a call asks for (the `kind` of a call message) -------------------------------------------

CALL_TASK: Final = 0  # run registered task `name` with the kwargs in `payload` (plain data)
CALL_FUNCTION: Final = 1  # payload: pickle.dumps((pickle.dumps(fn), args, kwargs)); local pool only
CALL_MAP: Final = 2  # payload: a list of kwargs for task `name`, each item run and failing on its own
CALL_BATCH: Final = 3  # payload: a list of kwargs for a `batch=` task, one per call, run as ONE invocation
#   (each parameter given the list of the calls' values; workers/batching.py gathers them); answered RESULT_CHUNK
CHUNK_CALLS: Final = frozenset({CALL_MAP, CALL_BATCH})  # kinds whose payload is a list of kwargs
CALL_STREAM: Final = 4  # a generator task: kwargs as CALL_TASK; its items come as STREAM_ITEM (workers/streaming.py)

# -- how a call ended (the tag of a result row) -------------------------------------------------------

RESULT_VALUE: Final = 0  # the value itself (bytes or a plain scalar locally; whatever Dask carries on Dask)
RESULT_ERROR: Final = 1  # (exception type, message, traceback) strings: TaskFailed(*payload)
RESULT_JSON: Final = 2  # the value encoded as JSON bytes in the worker (calls made with encode_json)
RESULT_PICKLED: Final = 3  # the value pickled on its own (a value that will not unpickle fails its call only)
RESULT_CHUNK: Final = 5  # a map chunk or batch: [(tag, value, elapsed), ...], one per item (VALUE, JSON, ERROR, SHM)
RESULT_SHM: Final = 8  # ShmRef(name, length): the bytes are in the segment granted to this call

# -- notices from a worker (rows that do not end a call) --------------------------------------------

RETIRE_NOTICE: Final = 4  # call id 0, payload the reason (workers/stats.py RETIRE_*): it exits after this frame
PROGRESS_REPORT: Final = 6  # payload (done, total | None, message | None), from the task's progress()
SEGMENT_REQUEST: Final = 7  # payload: the size of the running call's bytes result; answered by GRANT_SEGMENT
STREAM_ITEM: Final = 16  # payload: one item of a CALL_STREAM, JSON bytes; the call ends with RESULT_JSON (the count)

# -- how a call ended when the Dask worker thread stopped its runner child (workers/dask/remote.py only) ---------

RUNNER_TIMED_OUT: Final = 9  # killed at the call's deadline; value: the timeout
RUNNER_CRASHED: Final = 10  # the runner died mid-call (segfault, os._exit, OOM kill); value: its exit code
RUNNER_CANCELLED: Final = 11  # Dask cancelled the task and the runner was killed; value: None
RUNNER_START_FAILED: Final = 12  # the tasks could not start where the call was to run (a hook raised in
#   the runner child, or with isolate=thread in the Dask worker itself); value: (detail, traceback, exit code | None)

# -- frames that are not lists ------------------------------------------------------------------------

WORKER_READY: Final = "ready"  # worker -> service, alone in its frame: the worker has started
WORKER_START_FAILED: Final = "start-failed"  # worker -> service: (WORKER_START_FAILED, one line, traceback): it exits
GRANT_SEGMENT: Final = "grant"  # service -> worker: (GRANT_SEGMENT, call_id, segment name | None: send inline)
FORGET_SEGMENTS: Final = "forget"  # service -> worker: (FORGET_SEGMENTS, [names]): unlinked, unmap them
STREAM_ACK: Final = "ack"  # service -> worker: (STREAM_ACK, call_id, items taken so far): more credit
STREAM_CLOSE: Final = "close"  # service -> worker: (STREAM_CLOSE, call_id): stop that stream (gen.close())
