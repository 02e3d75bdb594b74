"""A task for scripts/container-smoke: leave an orphan behind, so the smoke can see PID 1 reap it.

`orphan()` forks a child that forks a grandchild and exits at once: the grandchild is re-parented to
PID 1 of the PID namespace. It lives `ms` milliseconds, then exits; unless PID 1 reaps it (tini does)
it stays a zombie.
"""

from __future__ import annotations

import os
import time

from workers import task


@task
def orphan(ms: float = 200.0) -> dict[str, int]:
    """Leave a grandchild that outlives its parent; return its pid (in this PID namespace)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: fork the grandchild, report its pid, exit
        os.close(read)
        grandchild = os.fork()
        if grandchild == 0:
            os.close(write)
            time.sleep(ms / 1000.0)
            os._exit(0)
        os.write(write, str(grandchild).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 64):
        data += chunk
    os.close(read)
    os.waitpid(child, 0)  # the direct child is ours to reap; the grandchild is PID 1's
    return {"orphan": int(data), "worker": os.getpid()}
