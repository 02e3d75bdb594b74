"""Large payloads in POSIX shared memory: the service's segment pool and the workers' mappings.

A binary payload larger than the threshold does not travel through a worker's socket. The service
reads a request body straight into a segment and the worker gets a view of it; a large bytes result
is written by the worker into a segment the service then streams to the client. What crosses the
socket is a small handle, `ShmRef(name, length)`.

Who does what:

- Only the service creates and unlinks segments (`SegmentPool`, driven by the worker pool on the
  event loop). Workers attach by name (`Mappings`) and never unlink. Every name starts with the
  pool's prefix, `pb_<service pid>_<random>_`, so one service's segments are recognisable in /dev/shm.
- A segment is leased for one payload (`Lease`, reference-counted: the HTTP handler, the call in the
  pool and the response each hold a reference while they use it). When the last one goes, the segment
  returns to a small free list by size class and is reused; free segments beyond the keep limit, or
  unused for `idle` seconds, are unlinked, and the workers that mapped them are told to unmap them
  (`on_unlink`), so no memory stays pinned behind a name that is gone.
- New segments are created on a helper thread and reserved with posix_fallocate: a full /dev/shm
  becomes an ENOSPC there (the payload then goes through the pipe) instead of a SIGBUS when a page is
  first written, and the loop never waits while the kernel zeroes 100 MiB.
- A budget caps the bytes of all segments, leased and free. By default it is three quarters of what
  /dev/shm had free at start-up (`plan_budget`, which warns when that is small). A lease that does not
  fit, even after dropping free segments, is refused and the caller falls back to the pipe.
- `aclose()` unlinks every segment, leased ones included (a mapping still in use stays valid until
  the lease holding it is released).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import errno
import functools
import itertools
import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any, NamedTuple

from workers.shm_files import SHM_DIR, Attached

log = logging.getLogger("procbridge.shm")

MIN_SEGMENT = 64 * 1024
KEEP_BYTES = 512 * 1024 * 1024  # at most this much (or half the budget) stays mapped while free
KEEP_PER_CLASS = 4
IDLE_SECONDS = 30.0  # a free segment unused this long is unlinked
_NO_SPACE = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG)


def new_prefix() -> str:
    """The name prefix of one pool's segments: this process's pid and a random token."""
    return f"pb_{os.getpid()}_{secrets.token_hex(3)}_"


def size_class(size: int) -> int:
    """The segment size for a payload: four classes per doubling (≤ 25% slack), at least 64 KiB."""
    n = max(size, MIN_SEGMENT)
    step = (1 << (n - 1).bit_length()) // 8
    return -(-n // step) * step


def free_space(path: str = SHM_DIR) -> int | None:
    """Bytes free for unprivileged use in the file system at `path`; None where it does not exist."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def plan_budget(requested: int | None, need: int = 0, path: str = SHM_DIR) -> int:
    """The shared-memory budget for payloads, detected at start-up, with a warning when it is small.

    `requested` None: three quarters of what `path` has free now; 0: shared memory is off; else that
    many bytes (never more than is free). `need`: what one payload of the largest size in and one out
    take; below it the warning says how to give the container more.
    """
    if requested == 0:
        log.info("shared-memory payloads are off (--shm-budget 0): large payloads go through the worker pipes")
        return 0
    free = free_space(path)
    if free is None:
        log.warning("%s is not available: large payloads go through the worker pipes", path)
        return 0
    budget = free * 3 // 4 if requested is None else min(requested, free)
    if need and budget < need:
        source = "--shm-budget" if requested is not None and requested < free else f"3/4 of what {path} has free"
        log.warning(
            "only %s of shared memory for payloads (%s; %s free in %s), and a payload of the largest size "
            "(--max-body) in and out needs %s: payloads that do not fit go through the worker pipes instead "
            "(slower, same results). To fix it, give %s more room: `shm_size: 1gb` under the service in "
            "docker-compose.yml, or `docker run --shm-size=1g`",
            _mib(budget), source, _mib(free), path, _mib(need), path,
        )
    else:
        log.info("shared-memory payloads: budget %s of %s free in %s", _mib(budget), _mib(free), path)
    return budget


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


class ShmRef(NamedTuple):
    """What travels in a call or result message instead of the bytes: a segment name and a length."""

    name: str
    length: int


class Segment:
    """One shared-memory segment the service created; `buf` is its whole writable mapping."""

    __slots__ = ("buf", "freed_at", "mapped_by", "name", "shm", "size")

    def __init__(self, shm: shared_memory.SharedMemory, size: int) -> None:
        self.shm = shm
        self.name: str = shm.name
        self.size = size
        self.buf: memoryview = shm.buf  # type: ignore[assignment]  # never None while open
        self.mapped_by: set[int] = set()  # worker pids told about it: they may hold a mapping
        self.freed_at = 0.0


class Lease:
    """One payload in one segment, held by whoever uses it; the segment is reused once all let go.

    `buffer` is the whole segment, writable (for filling it); `view` is the payload, `length` bytes.
    Views taken from it are valid until the last `release()`. Only the event loop's thread may
    retain or release.
    """

    __slots__ = ("_pool", "_refs", "length", "segment")

    def __init__(self, pool: SegmentPool, segment: Segment, length: int) -> None:
        self._pool = pool
        self.segment = segment
        self.length = length
        self._refs = 1

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def capacity(self) -> int:
        return self.segment.size

    @property
    def buffer(self) -> memoryview:
        return self.segment.buf

    @property
    def view(self) -> memoryview:
        return self.segment.buf[: self.length]

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"<Lease {self.segment.name} {self.length}/{self.segment.size} bytes, {self._refs} refs>"

    def ref(self) -> ShmRef:
        return ShmRef(self.segment.name, self.length)

    def tobytes(self) -> bytes:
        return bytes(self.segment.buf[: self.length])

    @property
    def released(self) -> bool:
        return self._refs <= 0

    def retain(self) -> Lease:
        if self._refs <= 0:
            raise RuntimeError("this lease was already released")
        self._refs += 1
        return self

    def release(self) -> None:
        if self._refs <= 0:
            return
        self._refs -= 1
        if self._refs == 0:
            self._pool._give_back(self.segment)


class SegmentPool:
    """The service's segments: leased, free for reuse, created on a helper thread, always unlinked."""

    def __init__(
        self,
        *,
        threshold: int,
        budget: int,
        prefix: str | None = None,
        keep_bytes: int | None = None,
        keep_per_class: int = KEEP_PER_CLASS,
        idle: float = IDLE_SECONDS,
        on_unlink: Callable[[Segment], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.budget = budget
        self.prefix = prefix or new_prefix()
        self.keep_bytes = min(budget // 2, KEEP_BYTES) if keep_bytes is None else keep_bytes
        self.keep_per_class = keep_per_class
        self.idle = idle
        self.on_unlink = on_unlink
        # (direction "in" | "out", path "shm" | "pipe"): payloads above the threshold and how they went
        self.payloads: Counter[tuple[str, str]] = Counter()
        self._free: dict[int, list[Segment]] = {}  # size class -> free segments, most recently freed last
        self._idle: dict[str, Segment] = {}  # every free segment, oldest first
        self._all: dict[str, Segment] = {}  # created and not yet unlinked (guarded by _lock)
        self._lock = threading.Lock()
        self._committed = 0  # bytes of segments alive or being created
        self._free_bytes = 0
        self._leased = 0
        self._leased_bytes = 0
        self._names = itertools.count()
        self._thread = cf.ThreadPoolExecutor(1, thread_name_prefix="procbridge-shm")
        self._closed = False

    # -- leasing ---------------------------------------------------------------------------------

    def take(self, size: int, direction: str = "in") -> Lease | None:
        """A lease from the free list (a segment of the size's class, or up to twice it); None if none."""
        want = size_class(size)
        best = 0
        for cls, segs in self._free.items():
            if segs and want <= cls <= 2 * want and (not best or cls < best):
                best = cls
        if not best or self._closed:
            return None
        seg = self._free[best].pop()
        del self._idle[seg.name]
        self._free_bytes -= seg.size
        self.payloads[(direction, "shm")] += 1
        return self._lend(seg, size)

    async def lease(self, size: int, direction: str = "in", *, count_pipe: bool = True) -> Lease | None:
        """A lease for `size` bytes: reused, or created (off the loop); None when there is no room.

        Each payload is counted once in `payloads`: "shm" when leased, "pipe" when refused, unless
        `count_pipe` is false (the caller will try again elsewhere and count it there)."""
        lease = self.take(size, direction)
        if lease is not None:
            return lease
        cls = size_class(size)
        if self._closed or not self._make_room(cls):
            if count_pipe:
                self.payloads[(direction, "pipe")] += 1
            return None
        self._committed += cls
        name = f"{self.prefix}{next(self._names)}"
        try:
            future = asyncio.wrap_future(self._thread.submit(self._create, name, cls))
        except RuntimeError:  # the helper thread is shut down: the pool is closing
            self._committed -= cls
            return None
        try:
            seg = await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(functools.partial(self._adopt, cls))  # keep it for the next caller
            raise
        if seg is None:
            self._committed -= cls
            if count_pipe:
                self.payloads[(direction, "pipe")] += 1
            return None
        if self._closed:  # aclose() unlinked it meanwhile
            self._close_mapping(seg)
            return None
        self.payloads[(direction, "shm")] += 1
        return self._lend(seg, size)

    def count_pipe(self, direction: str) -> None:
        """Count a payload above the threshold that went through the pipe without asking for a lease."""
        self.payloads[(direction, "pipe")] += 1

    def _lend(self, seg: Segment, size: int) -> Lease:
        self._leased += 1
        self._leased_bytes += seg.size
        return Lease(self, seg, size)

    def _adopt(self, cls: int, future: asyncio.Future[Segment | None]) -> None:
        """A segment finished creating after its caller gave up: it becomes a free segment."""
        seg = None if future.cancelled() or future.exception() is not None else future.result()
        if seg is None:
            self._committed -= cls
        elif self._closed:  # aclose() unlinked it meanwhile
            self._close_mapping(seg)
        else:
            self._leased += 1
            self._leased_bytes += seg.size
            self._give_back(seg)

    def _make_room(self, size: int) -> bool:
        """Whether `size` more bytes fit the budget, unlinking free segments (oldest first) if needed."""
        if size > self.budget:
            return False
        while self._committed + size > self.budget and self._idle:
            self._evict(next(iter(self._idle.values())))
        return self._committed + size <= self.budget

    # -- giving back -----------------------------------------------------------------------------

    def _give_back(self, seg: Segment) -> None:
        self._leased -= 1
        self._leased_bytes -= seg.size
        if self._closed:
            if seg.name not in self._all:  # unlinked by aclose(); unmap it now that nobody uses it
                self._close_mapping(seg)
            return
        if seg.size > self.keep_bytes or len(self._free.get(seg.size, ())) >= self.keep_per_class:
            self._unlink(seg)
            return
        seg.freed_at = time.monotonic()
        self._free.setdefault(seg.size, []).append(seg)
        self._idle[seg.name] = seg
        self._free_bytes += seg.size
        while self._free_bytes > self.keep_bytes and self._idle:
            self._evict(next(iter(self._idle.values())))

    def trim(self, now: float | None = None) -> None:
        """Unlink free segments that nobody used for `idle` seconds (called by the pool's timer)."""
        if not self._idle:
            return
        limit = (time.monotonic() if now is None else now) - self.idle
        while self._idle:
            seg = next(iter(self._idle.values()))
            if seg.freed_at > limit:
                break
            self._evict(seg)

    def drop_free(self) -> None:
        """Unlink every free segment now."""
        while self._idle:
            self._evict(next(iter(self._idle.values())))

    def _evict(self, seg: Segment) -> None:
        del self._idle[seg.name]
        self._free[seg.size].remove(seg)
        self._free_bytes -= seg.size
        self._unlink(seg)

    def _unlink(self, seg: Segment) -> None:
        """Remove the name now (fast), tell the workers, unmap on the helper thread (munmap can be slow)."""
        with self._lock:
            self._all.pop(seg.name, None)
        self._committed -= seg.size
        with contextlib.suppress(FileNotFoundError):
            seg.shm.unlink()
        if self.on_unlink is not None:
            try:
                self.on_unlink(seg)
            except Exception:
                log.exception("telling the workers about an unlinked segment failed")
        try:
            self._thread.submit(self._close_mapping, seg)
        except RuntimeError:
            self._close_mapping(seg)

    # -- the helper thread -----------------------------------------------------------------------

    def _create(self, name: str, size: int) -> Segment | None:
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        except OSError as exc:
            log.warning("cannot create a shared-memory segment of %s: %s; using the pipe", _mib(size), exc)
            return None
        try:
            fd = os.open(os.path.join(SHM_DIR, shm.name.lstrip("/")), os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                log.warning("no room for %s more in %s (%s): this payload goes through the pipe",
                            _mib(size), SHM_DIR, exc.strerror)
                _destroy(shm)
                return None
            # no /dev/shm path or no fallocate there: go on unreserved (the budget still applies)
        seg = Segment(shm, size)
        with self._lock:
            closed = self._closed
            if not closed:
                self._all[name] = seg
        if closed:
            _destroy(shm)
            return None
        return seg

    @staticmethod
    def _close_mapping(seg: Segment) -> None:
        with contextlib.suppress(BufferError):  # a view still in use: the mapping goes when it does
            seg.shm.close()

    # -- closing and introspection -----------------------------------------------------------------

    async def aclose(self) -> None:
        """Unlink every segment, leased or free; unmap the free ones. Safe to call more than once."""
        with self._lock:
            already = self._closed
            self._closed = True
            segs = list(self._all.values())
            self._all.clear()
        if already:
            return
        for seg in segs:
            with contextlib.suppress(FileNotFoundError):
                seg.shm.unlink()
        free = list(self._idle.values())
        self._free.clear()
        self._idle.clear()
        self._free_bytes = 0
        self._committed = 0
        try:
            # FIFO: segments still being created finish first (and, seeing the pool closed, unlink themselves).
            await asyncio.wrap_future(self._thread.submit(lambda: [self._close_mapping(s) for s in free]))
        except RuntimeError:
            for seg in free:
                self._close_mapping(seg)
        self._thread.shutdown(wait=False)

    @property
    def closed(self) -> bool:
        return self._closed

    def names(self) -> set[str]:
        """Names of the segments alive now (leased or free)."""
        with self._lock:
            return set(self._all)

    def free_names(self) -> set[str]:
        return set(self._idle)

    def stats(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "leased_segments": self._leased,
            "leased_bytes": self._leased_bytes,
            "free_segments": len(self._idle),
            "free_bytes": self._free_bytes,
        }


def _destroy(shm: shared_memory.SharedMemory) -> None:
    with contextlib.suppress(BufferError):
        shm.close()
    with contextlib.suppress(FileNotFoundError):
        shm.unlink()


class Mappings:
    """The worker's side: segments attached by name and kept mapped, so a reused segment costs no
    new mapping (and no page faults). The service says when one is unlinked (`forget`); a bound on
    their number keeps a worker from pinning many. Workers never create or unlink segments."""

    def __init__(self, limit: int = 64) -> None:
        self._limit = limit
        self._maps: dict[str, Attached] = {}  # least recently used first

    def get(self, name: str) -> memoryview:
        """The whole segment `name`, writable."""
        shm = self._maps.pop(name, None)
        if shm is None:
            while len(self._maps) >= self._limit:
                _unmap(self._maps.pop(next(iter(self._maps))))
            shm = Attached(name)  # no resource tracker in a worker (shm_files.py)
        self._maps[name] = shm
        return shm.buf

    def forget(self, names: list[str]) -> None:
        for name in names:
            shm = self._maps.pop(name, None)
            if shm is not None:
                _unmap(shm)

    def close(self) -> None:
        self.forget(list(self._maps))

    def __contains__(self, name: object) -> bool:
        return name in self._maps


def _unmap(shm: Attached) -> None:
    with contextlib.suppress(BufferError):  # a task kept a view: the mapping goes when the view does
        shm.close()
