"""`LoopFuture`: the future `WorkerPool.submit` returns on the loop's own thread.

`loop.run_in_executor(pool, fn)` is `asyncio.wrap_future(pool.submit(fn))`. Given a plain
`concurrent.futures.Future`, `wrap_future` makes a second, asyncio future and chains the two: each
result then travels through `call_soon_threadsafe` (a write to the loop's wake-up handle) and a few
Python-level hops, although the pool completes its futures on the loop's own thread anyway. A
future that `asyncio.isfuture` accepts is returned by `wrap_future` as it is, so `LoopFuture` is a
`concurrent.futures.Future` that is also a complete asyncio future of its loop: tasks await it
directly, and its completion wakes them with a plain `call_soon`.

What it keeps of each side:

- `concurrent.futures.Future`: `result(timeout)` and `exception(timeout)` from any other thread,
  `concurrent.futures.wait` / `as_completed`, `running()`, and the executor's
  `set_running_or_notify_cancel` (a call is claimed when it goes to a worker).
- `asyncio.Future`: `await`, `get_loop()`, `add_done_callback(fn, context=...)` with callbacks
  always scheduled on the loop (never run inside the pool's read callback), `remove_done_callback`,
  and `cancel(msg)`: it succeeds unless the future is done, as cancelling the future
  `run_in_executor` used to return did (a call already handed to a worker still runs there; its
  result is dropped). Awaiting a cancelled one, or its `result()` / `exception()`, raises
  `asyncio.CancelledError`, so `asyncio.wait_for` turns it into `TimeoutError` and a cancelled task
  ends cancelled.

`submit` from any other thread still returns a plain `concurrent.futures.Future` (then
`wrap_future` chains it through `call_soon_threadsafe`, as it must).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import contextvars
import threading
from collections.abc import Callable, Generator, Iterator
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any

Callback = Callable[[Any], object]
_DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))


class LoopFuture(cf.Future[Any]):
    """A concurrent.futures.Future completed on `loop`'s thread that asyncio also takes as its own."""

    _asyncio_future_blocking = False  # asyncio.isfuture() looks for this (and Task sets it)

    def __init__(self, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        super().__init__()
        self._loop = loop
        self._loop_thread = loop_thread
        self._cancel_message: Any = None
        self._callbacks: list[tuple[Callback, contextvars.Context]] = []
        self._blocked = 0  # threads waiting in result() or exception(): only then is the condition notified

    # -- asyncio.Future ----------------------------------------------------------------------------

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def __await__(self) -> Generator[Any, None, Any]:
        if not self.done():
            self._asyncio_future_blocking = True
            yield self
        if not self.done():
            raise RuntimeError("await wasn't used with future")
        return self.result()

    __iter__ = __await__

    def add_done_callback(self, fn: Callback, *, context: contextvars.Context | None = None) -> None:
        """Call `fn(self)` on the loop once the future is done (scheduled, as asyncio does; at
        once-scheduled if it is done already)."""
        if context is None:
            context = contextvars.copy_context()
        lock = self._condition
        lock.acquire()  # the lock's own C method: cheaper than `with` on the Condition
        try:
            if self._state not in _DONE:
                self._callbacks.append((fn, context))
                return
        finally:
            lock.release()
        self._schedule(fn, context)

    def remove_done_callback(self, fn: Callback) -> int:
        with self._condition:
            kept = [(f, c) for f, c in self._callbacks if f != fn]
            removed = len(self._callbacks) - len(kept)
            self._callbacks[:] = kept
        return removed

    def cancel(self, msg: Any = None) -> bool:
        """Cancel unless done (asyncio's rule); the awaiting task, if any, gets CancelledError."""
        with self._condition:
            if self._state == FINISHED:
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            self._state = CANCELLED_AND_NOTIFIED  # nobody else will tell the waiters: tell them now
            self._cancel_message = msg
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()  # (cancelling is rare: no need to spare this)
        self._invoke_callbacks()
        return True

    def _make_cancelled_error(self) -> asyncio.CancelledError:
        """The error a cancelled future raises (asyncio.gather and others call this too)."""
        if self._cancel_message is None:
            return asyncio.CancelledError()
        return asyncio.CancelledError(self._cancel_message)

    # -- concurrent.futures.Future, adjusted ----------------------------------------------------
    # done(), cancelled() and a finished result() read the state without taking the condition's
    # lock: one attribute read is atomic, and the state only ever moves forward.

    def done(self) -> bool:
        return self._state in _DONE

    def cancelled(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED:
            if self._exception is not None:
                raise self._exception
            return self._result
        with self._waiting():
            return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        with self._waiting():
            return super().exception(timeout)

    @contextlib.contextmanager
    def _waiting(self) -> Iterator[None]:
        """Around a blocking wait of concurrent.futures': refused on the loop's thread, counted while
        it waits (so completion knows to notify), and its cancellation raised as asyncio's error."""
        self._check_wait()
        with self._condition:
            self._blocked += 1
        try:
            yield
        except cf.CancelledError:
            raise self._make_cancelled_error() from None
        finally:
            with self._condition:
                self._blocked -= 1

    def set_result(self, result: Any) -> None:
        self._finish(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception)

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        """What concurrent.futures' set_result and set_exception do, less the Python-level
        `with` on the Condition and its notify_all when no thread waits on it."""
        lock = self._condition
        lock.acquire()
        try:
            if self._state in _DONE:
                raise cf.InvalidStateError(f"{self._state}: {self!r}")
            if exception is None:
                self._result = result
            else:
                self._exception = exception
            self._state = FINISHED
            for waiter in self._waiters:
                if exception is None:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
            if self._blocked:
                lock.notify_all()
            callbacks, self._callbacks = self._callbacks, []
        finally:
            lock.release()
        for fn, context in callbacks:
            self._schedule(fn, context)

    def set_running_or_notify_cancel(self) -> bool:
        lock = self._condition
        lock.acquire()
        try:
            state = self._state
            if state == PENDING:
                self._state = RUNNING
                return True
            if state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                return False
            if state == CANCELLED_AND_NOTIFIED:  # cancel() already told everyone
                return False
        finally:
            lock.release()
        raise RuntimeError(f"future in unexpected state: {state}")

    def _invoke_callbacks(self) -> None:
        with self._condition:
            callbacks, self._callbacks = self._callbacks, []
        for fn, context in callbacks:
            self._schedule(fn, context)

    def _schedule(self, fn: Callback, context: contextvars.Context) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to call back
            if threading.get_ident() == self._loop_thread:
                self._loop.call_soon(fn, self, context=context)
            else:
                self._loop.call_soon_threadsafe(fn, self, context=context)

    def _check_wait(self) -> None:
        """Waiting on the loop's thread for a future only the loop can complete would hang it."""
        if not self.done() and threading.get_ident() == self._loop_thread:
            raise asyncio.InvalidStateError("Result is not set.")
