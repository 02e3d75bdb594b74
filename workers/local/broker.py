"""The payload broker: the shared-memory segments large bytes travel in between the loop and workers.

Bytes above the threshold do not cross the sockets (workers/shm.py has the segments themselves).
Only the service creates and unlinks segments; workers attach by name and never unlink. The broker
is the pool's one dealer with them, so the segment rules live in one place:

- `share(call)`: before a call is admitted, each `Lease` among its arguments gets the call's own
  reference and bytes above the threshold are copied into a new lease (bytes that find no room stay
  bytes and take the socket); the call then holds them (`Call.leases`) until its worker is done;
- `grant(w, call_id, size)`: a worker asks (SEGMENT_REQUEST) for a segment for its running call's bytes
  result and waits for the answer: one from the free list at once, a new one made off the loop, or
  None (no room: it sends the bytes inline); a granted segment is the call's (`Call.results`);
- `result(call, ref, shared)`: the segment a worker answered RESULT_SHM with: the caller takes the
  lease over (`shared_result`), or gets a copy and the segment goes back at once;
- `forget(segment)`: a segment was unlinked (expired, over the keep limit): the workers that mapped
  it are told to unmap it (FORGET_SEGMENTS), so no memory stays pinned behind a vanished name;
- `trim(now)` on the pool's tick, `aclose()` once the workers are gone.

A call's segments are released by `calls.drop` (result, error, crash, abandonment, close), whichever
part sees its end. Interface: the broker reads `PoolState.loop` and `.workers` (to send GRANT_SEGMENT and
FORGET_SEGMENTS through each worker's handle) and runs background work through the `background` callable
the pool gives it (the executor's: cancelled at close, failures logged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from workers.local.calls import Call, drop
from workers.local.handle import WorkerHandle
from workers.local.state import PoolState
from workers.protocol import CHUNK_CALLS, FORGET_SEGMENTS, GRANT_SEGMENT
from workers.shm import Lease, Segment, SegmentPool, ShmRef

log = logging.getLogger("procbridge.pool")

Background = Callable[[Coroutine[Any, Any, Any]], None]


class Broker:
    """The shared-memory side of one pool (exists only when the pool has a segment budget)."""

    def __init__(self, state: PoolState, budget: int, prefix: str, background: Background) -> None:
        self._state = state
        self._background = background
        self.segments = SegmentPool(
            threshold=state.options.shm_threshold, budget=budget, prefix=prefix, on_unlink=self.forget
        )
        self.threshold = self.segments.threshold

    # -- arguments --------------------------------------------------------------------------------

    async def lease(self, size: int) -> Lease | None:
        """A writable buffer for an incoming payload (`payload_buffer`), None when there is no room."""
        return await self.segments.lease(size, "in", count_pipe=False)  # counted when the bytes are sent

    async def share(self, call: Call) -> None:
        """Give the call its own reference to each Lease among its arguments, and copy bytes larger
        than the threshold into new leases (those that find no room stay bytes)."""
        leases: list[Lease] = []
        call.leases = leases  # released with the call, even if this is cancelled half-way
        try:
            if call.kind in CHUNK_CALLS:
                call.payload = [await self._share_kwargs(item, leases) for item in call.payload]
            else:
                call.payload = await self._share_kwargs(call.payload, leases)
        except BaseException:
            drop(call)
            raise

    async def _share_kwargs(self, kwargs: dict[str, Any], leases: list[Lease]) -> dict[str, Any]:
        segments = self.segments
        out = dict(kwargs)
        for key, value in kwargs.items():
            if type(value) is Lease:
                leases.append(value.retain())
            elif type(value) is bytes and len(value) > segments.threshold:
                lease = await segments.lease(len(value), "in")
                if lease is not None:
                    leases.append(lease)
                    lease.buffer[: len(value)] = value
                    out[key] = lease
        return out

    # -- results ----------------------------------------------------------------------------------

    def grant(self, w: WorkerHandle, call_id: int, size: int) -> None:
        """The worker asks for a segment for its running call's bytes result: from the free list now,
        or a new one made off the loop; with no room, None (it sends the bytes inline)."""
        call = next((c for c in w.inflight if c.id == call_id), None)
        segments = self.segments
        lease = segments.take(size, "out") if call is not None else None
        if lease is None and call is not None:
            self._background(self._grant_new(w, call, size))
            return
        if lease is None:
            segments.count_pipe("out")
        self.send_grant(w, call_id, call, lease)

    async def _grant_new(self, w: WorkerHandle, call: Call, size: int) -> None:
        self.send_grant(w, call.id, call, await self.segments.lease(size, "out"))

    def send_grant(self, w: WorkerHandle, call_id: int, call: Call | None, lease: Lease | None) -> None:
        """Answer an SEGMENT_REQUEST (the worker waits for it): the segment, now the call's, or None."""
        if lease is not None:
            if call is None or w.eof or w.dying or not any(c is call for c in w.inflight):
                lease.release()  # the call or its worker is gone meanwhile
                lease = None
            else:
                lease.segment.mapped_by.add(w.pid)
                if call.results is None:
                    call.results = []
                call.results.append(lease)
        if not w.eof:
            self._state.send(w, (GRANT_SEGMENT, call_id, None if lease is None else lease.name))

    def result(self, call: Call, ref: ShmRef, shared: bool) -> Lease | bytes:
        """The result the worker wrote into a segment granted to this call: that lease (the caller
        takes it over) or its bytes (copied, the segment released at once)."""
        results = call.results or []
        for i, lease in enumerate(results):
            if lease.name == ref[0]:
                del results[i]
                break
        else:  # cannot happen: the worker writes only into segments granted to this call
            log.error("call %d answered with segment %s, which was not granted to it", call.id, ref[0])
            return b""
        lease.length = ref[1]
        if shared:
            return lease
        try:
            return lease.tobytes()
        finally:
            lease.release()

    # -- housekeeping -----------------------------------------------------------------------------

    def forget(self, segment: Segment) -> None:
        """A segment was unlinked: the workers that may have it mapped unmap it (freeing its memory)."""
        for w in self._state.workers:
            if w is not None and w.pid in segment.mapped_by and not w.eof and not w.dying:
                self._state.send(w, (FORGET_SEGMENTS, [segment.name]))

    def trim(self, now: float) -> None:
        """Unlink free segments unused for too long or beyond the keep limit (the pool's tick)."""
        self.segments.trim(now)

    def stats(self) -> dict[str, Any]:
        segments = self.segments
        return {**segments.stats(), "payloads": dict(segments.payloads)}

    async def aclose(self) -> None:
        """Unlink every segment, leased ones included: only once no worker writes into one any more."""
        await self.segments.aclose()
