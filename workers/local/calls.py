"""One call's record on the loop side, and how its waiter is completed.

`Call` is what the pool queues and hands to a worker's window; `settle` completes its waiter (an
asyncio future for `WorkerPool.call`, a concurrent one for `submit`) unless its caller already gave
up, and `drop` releases the shared-memory segments it holds. (Its Outcome is the seam's type:
`workers.executor.Outcome`.)

A call remembers the worker whose window holds it only as a `Holder` (its slot): handle.py builds
on this module, so this one must not import handle.py back, not even for type checking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import pickle
from collections.abc import Callable
from types import FunctionType
from typing import Any, Protocol

from workers.executor import ProgressCallback
from workers.protocol import CHUNK_CALLS
from workers.shm import Lease

Waiter = asyncio.Future[Any] | cf.Future[Any]

_FUNCTIONS_KEPT = 256  # plain functions whose pickle `pickled_call` keeps


class Holder(Protocol):
    """The worker whose window holds a call (a `workers.local.handle.WorkerHandle`), as far as the
    call knows it: its slot, where the pool finds the handle again."""

    slot: int


class Call:
    """A call admitted by the pool: queued, then in one worker's window until its result."""

    __slots__ = ("encode", "est", "id", "kill_on_cancel", "kind", "leases", "name", "payload", "progress",
                 "results", "shared", "short", "timeout", "waiter", "worker")

    def __init__(
        self,
        call_id: int,
        kind: int,
        name: str,
        payload: Any,
        encode: bool,
        timeout: float | None,
        waiter: Waiter,
    ) -> None:
        self.id = call_id
        self.kind = kind
        self.name = name
        self.payload = payload  # CALL_TASK: the kwargs; CALL_FUNCTION: pickled (fn, args, kwargs)
        self.encode = encode
        self.timeout = timeout
        self.waiter = waiter
        self.worker: Holder | None = None  # set while a worker's window holds it
        self.progress: ProgressCallback | None = None
        self.kill_on_cancel = False
        self.leases: list[Lease] | None = None  # segments holding its arguments, held until the worker is done
        self.results: list[Lease] | None = None  # segments granted for its results, not yet answered
        self.shared = False  # its caller takes a bytes result as a Lease (and releases it)
        self.short = False  # its task is known to be short (set on admission, from the moving average)
        self.est = 0.0  # seconds it is expected to take (the whole chunk for a map call)

    def message(self) -> tuple[Any, ...]:
        if self.leases is None:
            return (self.id, self.kind, self.name, self.payload, self.encode, self.progress is not None, False)
        if self.kind in CHUNK_CALLS:
            payload: Any = [refs(item) for item in self.payload]
        else:
            payload = refs(self.payload)
        return (self.id, self.kind, self.name, payload, self.encode, self.progress is not None, True)


def refs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.ref() if type(v) is Lease else v) for k, v in kwargs.items()}


def settle(waiter: Waiter, value: Any = None, error: BaseException | None = None) -> bool:
    """Complete a waiter unless its caller already gave up; True if this call completed it."""
    if waiter.done():
        return False
    try:
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(value)
    except (asyncio.InvalidStateError, cf.InvalidStateError):  # cancelled from another thread
        return False
    return True


def claim(call: Call) -> bool:
    """True if the call may still go to a worker (its caller has not given up on it)."""
    waiter = call.waiter
    if isinstance(waiter, cf.Future):
        return waiter.set_running_or_notify_cancel()
    return not waiter.done()


def drop(call: Call) -> None:
    """Release every segment a call holds (its worker is done with them, or never got them)."""
    if call.leases is not None:
        drop_leases(call.leases)
        call.leases = None
    if call.results is not None:
        drop_leases(call.results)
        call.results = None


def drop_leases(leases: list[Lease]) -> None:
    for lease in leases:
        lease.release()
    leases.clear()


def pickled_call(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], kept: dict[Callable[..., Any], bytes]
) -> bytes:
    """The payload of a `submit()` call (CALL_FUNCTION): the function's pickle, its arguments.
    A plain function pickles as its name, the same every time: its pickle is kept in `kept` (up
    to a bound). Raises whatever pickling raises (a lambda, a lock)."""
    fn_blob = kept.get(fn) if type(fn) is FunctionType else None
    if fn_blob is None:
        fn_blob = pickle.dumps(fn, protocol=5)
        if type(fn) is FunctionType and len(kept) < _FUNCTIONS_KEPT:
            kept[fn] = fn_blob
    return pickle.dumps((fn_blob, args, kwargs), protocol=5)
