"""How much memory a process really holds, from /proc/PID/smaps_rollup (Linux ≥ 4.14).

RSS counts every resident page, shared ones included: a worker forked from a parent holding a
200 MiB model shows ~200 MiB of RSS while it adds almost nothing. What a worker costs is its
private pages (`private_bytes`: clean + dirty pages no other process maps), and PSS shares each
shared page among those that map it, so the PSS of every process sums to the memory they use.
Reading smaps_rollup walks the process's mappings in the kernel (tens of microseconds to a
millisecond): callers read it off the event loop (`WorkerPool.sample_memory`). The same reading
takes each process's CPU seconds from /proc/PID/stat (user + system, live even in the middle of a
long task, where the worker table's figure is written only between tasks).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import NamedTuple

_FIELDS = {b"Rss:": "rss", b"Pss:": "pss", b"Private_Clean:": "private", b"Private_Dirty:": "private"}


class MemoryUse(NamedTuple):
    """Bytes: resident, proportional share, private (resident in this process only)."""

    rss: int
    pss: int
    private: int


def memory_of(pid: int | str) -> MemoryUse | None:
    """The memory of process `pid` ("self" for this one), None if it is gone or /proc cannot say."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except OSError:
        return None
    totals = {"rss": 0, "pss": 0, "private": 0}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            field = _FIELDS.get(parts[0])
            if field is not None:
                totals[field] += int(parts[1]) * 1024  # kB
    return MemoryUse(totals["rss"], totals["pss"], totals["private"])


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int | str) -> float | None:
    """CPU seconds (user + system) process `pid` has used, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text.rpartition(b")")[2].split()  # after the command name, which may hold spaces
    try:
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime: fields 14 and 15 of stat(5)
    except (IndexError, ValueError):
        return None


def read_all(pids: list[int]) -> tuple[dict[int, MemoryUse], dict[int, float]]:
    """The memory and the CPU seconds of each live process in `pids` (blocking: /proc reads)."""
    memory = {pid: use for pid in pids if (use := memory_of(pid)) is not None}
    cpu = {pid: seconds for pid in memory if (seconds := cpu_of(pid)) is not None}
    return memory, cpu


class MemorySampler:
    """The last reading of some processes' memory, refreshed on demand on a helper thread, at most
    once per `max_age` seconds however many callers ask at once (a scrape, /v1/workers), and at once
    when the processes changed (a replacement worker is not shown without its memory)."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self.last: dict[int, MemoryUse] = {}
        self.cpu: dict[int, float] = {}  # CPU seconds, by pid, read with `last`
        self._at = -1e9
        self._reading: asyncio.Future[tuple[dict[int, MemoryUse], dict[int, float]]] | None = None

    async def sample(self, max_age: float = 1.0) -> None:
        pids = self._pids()
        if time.monotonic() - self._at < max_age and set(pids) == set(self.last):
            return
        if self._reading is None:
            self._reading = asyncio.get_running_loop().run_in_executor(None, read_all, pids)
        reading = self._reading
        try:
            self.last, self.cpu = await asyncio.shield(reading)
            self._at = time.monotonic()
        finally:
            if self._reading is reading and reading.done():
                self._reading = None
