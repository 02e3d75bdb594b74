"""Shared-memory segments seen as what they are on Linux, files in /dev/shm: mapping one by name
without multiprocessing's resource tracker, and sweeping the segments a dead service left behind.

Why not `multiprocessing.shared_memory.SharedMemory(name)` in the workers: on Python 3.11 and 3.12
attaching registers the name with a resource tracker, and a worker forked from the worker parent
(workers/local/parent.py) has none of its own: the first attach would start a tracker per worker,
which unlinks every segment that worker touched when it exits, the service's live ones included.
Only the service creates and unlinks segments (through SharedMemory, tracked); workers map them
here, tracker-free, which is all `shm_open` + `mmap` does anyway.

The sweep: every name procbridge creates starts with `pb_<service pid>_` (workers/shm.py,
`new_prefix`). Segments outlive their owner only when nothing could clean up, a SIGKILL of the
whole process group (the resource tracker dies with it). At start-up `sweep_orphans` removes the
segments whose owner pid is no longer a live process; another live service's are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re

log = logging.getLogger("procbridge.shm")

SHM_DIR = "/dev/shm"
_OURS = re.compile(r"^pb_(\d+)_[0-9a-f]+_")


class Attached:
    """A segment mapped read-write by name: `buf` is all of it. `close()` unmaps (BufferError while
    a view of it is still exported, as with SharedMemory)."""

    __slots__ = ("_mmap", "buf", "name", "size")

    def __init__(self, name: str) -> None:
        fd = os.open(os.path.join(SHM_DIR, name.lstrip("/")), os.O_RDWR)
        try:
            self.size = os.fstat(fd).st_size
            self._mmap = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self.name = name
        self.buf = memoryview(self._mmap)

    def close(self) -> None:
        self.buf.release()
        self._mmap.close()


def owner_pid(name: str) -> int | None:
    """The pid of the service that created segment `name`, None when it is not one of ours."""
    match = _OURS.match(name)
    return int(match.group(1)) if match else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def sweep_orphans(directory: str = SHM_DIR) -> list[str]:
    """Unlink the procbridge segments whose owner process is gone; returns their names. Segments of
    live processes (this one, another running service) stay. Runs before the loop starts (or on a
    helper thread): it lists a directory."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        pid = owner_pid(name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(os.path.join(directory, name))
            removed.append(name)
    if removed:
        log.warning(
            "removed %d shared-memory segment(s) left in %s by a procbridge that was killed: %s",
            len(removed),
            directory,
            ", ".join(sorted(removed)[:8]) + (" ..." if len(removed) > 8 else ""),
        )
    return removed
