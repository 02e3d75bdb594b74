"""`--executor dask://HOST:PORT`: the executor interface (`workers/executor.py`) on a Dask cluster.

The service above does not change: it calls `await executor.call(name, kwargs, options)` as it does
on the local pool, and gets the same Outcome or the same errors. Each call becomes one Dask task,
`workers.dask.remote.run`, which runs the registered task by name on a Dask worker, so the task
modules (built-ins and `--tasks`) must be importable there (same image or checkout; the worker plugin
imports them on every worker, and start-up refuses a cluster whose workers cannot).

    options.py   DaskOptions from dask://HOST:PORT[?isolate=process|thread] and the service's settings
    executor.py  DaskExecutor: admission, submit, collect the answer, deadlines, stop remote work
    calls.py     DaskCall (one call's record), answer() (a worker's result -> Outcome or error),
                 DaskUnavailable / DaskWorkerLost
    cluster.py   Cluster: the client, introduction (events, plugin, import probe), the scheduler's
                 workers every `refresh` s -> readiness, size, rows, /v1/workers, pids
    plugin.py    ProcbridgeTasks, the worker plugin (unpickled on the workers: kept light)
    remote.py    what the workers run: run(spec, payload), the runner children, events

One call's path (calls ──▶, events ◀── ; the result comes straight from the worker, the events by
way of the scheduler):

    service: DaskExecutor           scheduler             Dask worker thread            runner child
    ─────────────────────           ─────────             ──────────────────            ────────────
    call ─ _admit: PoolClosed, DaskUnavailable, Overloaded, or a DaskCall
         ─ _prepare: bytes ≥ scatter_threshold ── scatter ─▶ kept as Dask data
         ─ client.submit(dask_remote.run, spec, payload)
         ─────────────────────────▶ picks a worker ─────▶ run(spec, payload)
                                                          emits "start" (pid)
                                                          runner.call ────────────────▶ task(**kwargs)
                                                          emits "progress" ◀── frame ── progress(done, total)
    _on_event ◀── subscribe_topic ◀── forwards events ◀── Worker.log_event(topic, msg)
      "start": started_at, worker, pid: the call leaves `pending`, its deadline starts
      "progress": the call's on_progress(done, total, message), on the loop
    _collect ◀── (status, value, pid, elapsed, reports sent) ◀── run returns ◀─────────────── the value
      waits ≤ 1 s for progress events still on their way, then answer() settles the caller

In thread isolation the task runs in the Dask worker thread itself (no runner child). A timeout
or cancel cancels the Dask future (`_stop_remote`); the worker sees its task cancelled and kills the
runner child (process), or the client kills the Dask worker, whose nanny starts another (thread).

- Data: arguments and results travel as Dask data (msgpack frames; bytes out of band, never
  base64). A binary argument of `scatter_threshold` bytes or more is scattered first and passed
  as a Dask future, so it moves once, directly, and the task graph stays small.
- Progress and start travel worker -> scheduler -> client as structured events on a topic of this
  executor (`Worker.log_event`, `Client.subscribe_topic`), the result worker -> client directly:
  that is why the answer waits for the reports the result says were sent.
- Timeout and cancel really stop the work (see `dask/remote.py`): with isolate="process" (the
  default) the task runs in a runner child of the Dask worker that the worker kills at the deadline
  or as soon as Dask cancels the task; with isolate="thread" the client restarts that Dask worker
  through its nanny. A client-side deadline (timeout + slack) backs both.
- Lost workers: a Dask worker that dies mid-task has its task rescheduled by the scheduler (Dask's
  retry, up to `distributed.scheduler.allowed-failures`, then KilledWorker: 502). A call never
  hangs: with the scheduler unreachable or no worker at all for `unavailable_grace` seconds it is
  answered 502, and a lost scheduler connection fails calls in flight with 502 at once.
- Readiness: the cluster view asks the scheduler for its identity every `refresh` seconds; `alive`
  is the number of running Dask workers while the scheduler answers, else 0 (so /readyz answers
  503), and it reconnects a client the scheduler dropped.

Nothing is imported here: a Dask worker unpickling the plugin imports `workers.dask.plugin` and
this package, never the client-side modules.
"""
