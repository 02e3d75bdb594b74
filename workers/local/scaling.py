"""An elastic local pool (`--workers MIN..MAX`): when it grows, when it shrinks, and why it does not flap.

The pool has a slot per worker it may have (MAX: the worker table has as many rows); the slots in
`PoolState.active` are the ones it keeps a worker in. The pool starts with MIN of them.

- **Grow** while calls wait: when a call joins the queue (the slow path of the pool's admission: no
  idle worker, no window it may join) and on each tick, if more calls wait than workers are starting,
  free slots are made active, up to MAX, and a worker is forked into each (`Supervisor.grow`, in
  the background; a fork of the worker parent, which loaded the task modules and ran the preloads
  once, so a new worker is ready in milliseconds). The queued calls go to it when it is ready,
  as to a replacement. A pool at MAX pays one length check per queued call; a fixed pool, nothing.
- **Shrink** after `worker_idle` seconds without work: each tick (every 50 ms) notes, per worker,
  the calls it has finished (`WorkerHandle.done`); a worker parked idle whose count has not changed
  for `worker_idle` seconds is stopped while more than MIN are active and no call waits: one per
  tick, the one idle longest. Stopping it is clean: it is taken off the idle list and marked dying (so it is never
  handed another call), its slot is made inactive, and our end of its socket is shut for writing;
  its loop reads EOF and exits, and the supervisor's `on_exit` frees its table row, its process group
  and its output relay without replacing it or counting a restart. One that has not exited within
  `_EXIT_GRACE` is killed.
- **Hysteresis.** The pool grows only for calls that really wait (not for calls a busy worker's
  window takes), and an idle worker stops only after `worker_idle` seconds with nothing to do. Idle
  workers are handed calls last-in first-out, so a steady load keeps reusing the same few workers
  and the spare ones are the ones that age out: a load that needs k workers keeps k, rather than
  spreading its calls over all of them and keeping every one just busy enough to stay.

Counts for /metrics: `scaled["up"]` and `scaled["down"]` (the executor's `scaled` counter); the pool's
`size` is the number of active slots.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections import Counter, deque
from collections.abc import Callable

from workers.local.calls import Call
from workers.local.handle import WorkerHandle
from workers.local.processes import kill_tree
from workers.local.state import PoolState

log = logging.getLogger("procbridge.pool")

_EXIT_GRACE = 10.0  # seconds an idle worker told to stop may take to exit before it is killed
IDLE = "idle"  # the reason (WorkerHandle.dying) of a worker stopped because the pool shrank


class Scaler:
    """Grows and shrinks one elastic pool between its MIN and MAX (the module's docstring)."""

    def __init__(
        self, state: PoolState, queue: deque[Call], grow: Callable[[int], None], scaled: Counter[str]
    ) -> None:
        options = state.options
        self._state = state
        self._queue = queue  # the pool's queue of calls waiting for a worker (the same deque)
        self._grow = grow  # Supervisor.grow: fork a worker into a slot just made active
        self._scaled = scaled
        self.fewest, self.most = options.fewest, options.workers
        self._idle_for = options.worker_idle
        self._seen: dict[int, tuple[int, int, float]] = {}  # slot -> (pid, calls done, since when unchanged)
        self._stopping: dict[int, tuple[WorkerHandle, float]] = {}  # pid -> (an idle worker told to stop, deadline)

    @classmethod
    def of(
        cls, state: PoolState, queue: deque[Call], grow: Callable[[int], None], scaled: Counter[str]
    ) -> Scaler | None:
        """The scaler of an elastic pool; None for a fixed one, which then pays nothing for elasticity."""
        return cls(state, queue, grow, scaled) if state.options.fewest < state.options.workers else None

    def on_queued(self) -> None:
        """A call joined the queue: grow if calls wait beyond the workers already starting."""
        if len(self._state.active) < self.most:
            self._grow_for_waiting()

    def tick(self, now: float) -> None:
        """The pool's periodic step: grow for calls still waiting (re-queued after a death, say), note
        which workers worked since the last tick, stop one that has been idle too long."""
        state = self._state
        active, workers = state.active, state.workers
        if self._queue and len(active) < self.most:
            self._grow_for_waiting()
        if self._stopping:
            self._reap(now)
        longest: WorkerHandle | None = None
        since_longest = now
        for slot in active:
            w = workers[slot]
            if w is None or not w.ready or w.dying:
                continue
            seen = self._seen.get(slot)
            if seen is None or seen[0] != w.pid or seen[1] != w.done or w.inflight:
                self._seen[slot] = (w.pid, w.done, now)  # it worked (or is new) since the last tick
            elif w.idle and now - seen[2] >= self._idle_for and seen[2] < since_longest:
                longest, since_longest = w, seen[2]
        if longest is not None and len(active) > self.fewest and not self._queue:
            self._stop(longest, now)

    def _grow_for_waiting(self) -> None:
        state = self._state
        active, workers = state.active, state.workers
        starting = sum(1 for slot in active if (w := workers[slot]) is None or not w.ready or w.dying)
        wanted = len(self._queue) - starting
        for slot in range(len(workers)):
            if wanted <= 0 or len(active) >= self.most:
                break
            if slot in active or workers[slot] is not None:  # a worker told to stop holds its slot until it exits
                continue
            active.add(slot)
            wanted -= 1
            self._scaled["up"] += 1
            log.info("calls are waiting: starting a worker in slot %d (%d of %d..%d)", slot, len(active),
                     self.fewest, self.most)
            self._grow(slot)

    def _stop(self, w: WorkerHandle, now: float) -> None:
        """Stop an idle worker cleanly: no call is handed to it again, and it exits when it reads EOF."""
        state = self._state
        state.active.discard(w.slot)
        state.unpark(w)
        w.dying = IDLE
        self._seen.pop(w.slot, None)
        self._scaled["down"] += 1
        log.info("worker %d was idle for %g s: stopping it (%d of %d..%d remain)", w.pid, self._idle_for,
                 len(state.active), self.fewest, self.most)
        self._stopping[w.pid] = (w, now + _EXIT_GRACE)
        with contextlib.suppress(OSError):  # already gone: its sentinel says so
            w.sock.shutdown(socket.SHUT_WR)

    def _reap(self, now: float) -> None:
        """Forget the stopped workers whose exit was seen; kill one that outstays its grace."""
        workers = self._state.workers
        for pid, (w, deadline) in list(self._stopping.items()):
            if workers[w.slot] is not w:  # on_exit has run
                del self._stopping[pid]
            elif now > deadline:
                del self._stopping[pid]
                if not w.proc.gone:
                    log.warning("worker %d did not exit %g s after it was told to stop: killing it", pid, _EXIT_GRACE)
                    kill_tree(pid)
