"""The local executor: a supervised pool of worker processes on this machine (`WorkerPool`).

One call's way through the package, and what sits beside it:

    caller (service/, run_in_executor)
      │  WorkerPool.call / call_chunk / submit ──────────────────────────────────────── pool.py
      │  WorkerPool.call_stream: a generator's items, with flow control ──────────── streams.py
      │    Call: id, kind, task, arguments, waiter ────────────────────────────────── calls.py
      │    large bytes ──▶ Broker.share: copied into shared-memory leases ────────── broker.py
      ▼
    admit ─▶ an idle worker │ a frame already leaving │ the least-filled window │ the FIFO queue
      │       (bounded by max_pending: Overloaded)
      │  give ─▶ assign: the call joins the worker's window, its message the outbox ─ handle.py
      ▼
    flush (one call_soon per loop turn): one frame per worker ══ socket pair ══▶ workers/worker.py
                                                                                 runs the calls,
    on_readable (add_reader, no thread) ◀══ frames of results ════════════════  coalesces results
      │  frame ─▶ a plain value: settled at once (pool.py, the hot path)
      │           any other message: its own handler ─────────────────────────── frames.py
      │             PROGRESS_REPORT, SEGMENT_REQUEST (the broker grants a segment), RETIRE_NOTICE,
      │             STREAM_ITEM (to its stream's consumer: streams.py),
      │             RESULT_ERROR, RESULT_PICKLED, RESULT_CHUNK, RESULT_SHM (names from workers/protocol.py)
      ▼
    settle the waiter (LoopFuture on the loop's thread: loop_future.py), then refill the window
    from the queue, or park the worker idle

    Supervisor ──────────────────────────────────────────────────────────────── supervisor.py
      starts workers (forked by the worker parent: parent.py, forks.py; one helper thread),
      watches each worker's sentinel (its status pipe), kills on a timeout, the memory ceiling or
      a cancel (the pool's tick), hands a dead worker's unstarted calls back to the queue, replaces
      it (crash back-off); the OS side is processes.py; task output goes to the log (output.py)

    Scaler (an elastic pool, --workers MIN..MAX) ───────────────────────────────── scaling.py
      grows while calls wait in the queue (the supervisor forks into a free slot), stops workers
      idle for worker_idle while more than MIN run (the tick)

    PoolState: the options, the loop, the worker table, the workers, the idle list,
               the active slots ──────────────────────────────────────────────────── state.py

The parts hold no reference to the pool: each gets the `PoolState` and what else it needs at
construction (the supervisor: the pool's read callback, its requeue and the executor's restart
counter and background runner; the frame handlers: the supervisor and the broker), so the imports
run one way: pool → frames → streams, scaling, supervisor, broker → state → handle → calls.
"""
