"""`ServingProcesses`: N serving processes (`--http-processes N`, N ≥ 2) started, watched, replaced
and stopped by the core; the core never forks itself (it has a loop and threads by then), it starts
each one fresh (`python -m service.front`) and hands it its settings on stdin.

- **Start.** One process per slot; each gets the same `blob` (the pickled settings the core made:
  our own bytes, never a client's) on its stdin, then EOF.
- **Watch.** One task per slot awaits the process's exit. An exit the core did not ask for is
  logged and counted (`restarts`), and the slot starts again at once, or after a back-off when the
  slot's processes keep dying (0.1 s doubling up to 10 s, reset once one lives 10 s).
- **Stop.** SIGTERM to every one (each drains: serving_process's own grace), then SIGKILL to what
  is left after `deadline`, and every exit is reaped (no zombie). Each one also dies if the core
  does (PR_SET_PDEATHSIG, set by the process itself, and the relay's EOF).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Sequence

from workers.errors import describe_exit

log = logging.getLogger("procbridge.serving")

_STEADY = 10.0  # a process that lived this long resets its slot's back-off


class ServingProcesses:
    """Runs `count` copies of `argv`, each fed `blob` on stdin; see the module docstring."""

    def __init__(self, count: int, argv: Sequence[str], blob: bytes) -> None:
        self.count = count
        self.argv = list(argv)
        self.blob = blob
        self.procs: list[asyncio.subprocess.Process | None] = [None] * count
        self.restarts = 0
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False
        self._terminated = False
        self.listening = False  # every one has listened once (the core sets it: service/serving.py)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.returncode is None]

    async def start(self) -> None:
        for slot in range(self.count):
            await self._spawn(slot)
            self._watchers.append(asyncio.ensure_future(self._watch(slot)))

    async def _spawn(self, slot: int) -> None:
        # A session of its own: a terminal's Ctrl-C reaches the core only, which passes it on once.
        proc = await asyncio.create_subprocess_exec(*self.argv, stdin=asyncio.subprocess.PIPE, start_new_session=True)
        assert proc.stdin is not None
        proc.stdin.write(self.blob)
        with contextlib.suppress(ConnectionError):  # it died at once: its watcher sees the exit
            await proc.stdin.drain()
        proc.stdin.close()
        self.procs[slot] = proc

    async def _watch(self, slot: int) -> None:
        delay = 0.0
        while not self._stopping:
            proc = self.procs[slot]
            assert proc is not None
            started = time.monotonic()
            code = await proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            delay = 0.0 if time.monotonic() - started > _STEADY else min(10.0, max(0.1, 2 * delay))
            log.error("serving process %d exited (%s); starting another in %.1f s",
                      proc.pid, describe_exit(code), delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            await self._spawn(slot)

    def terminate(self) -> None:
        """SIGTERM each serving process once (each drains); none is replaced from now on."""
        self._stopping = True
        if not self._terminated:
            self._terminated = True
            self.signal_all(signal.SIGTERM)

    def hurry(self) -> None:
        """A second SIGTERM to each, after `terminate`: they cut their grace short."""
        if self._terminated:
            self.signal_all(signal.SIGTERM)
        else:
            self.terminate()

    def signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def stop(self, deadline: float) -> None:
        """SIGTERM every serving process, wait up to `deadline` seconds, SIGKILL the rest, reap all."""
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self.terminate()
        running = [p.wait() for p in self.procs if p is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*running), deadline)
        except TimeoutError:
            log.warning("serving processes still running after %g s: killing them", deadline)
            self.signal_all(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in self.procs if p is not None))

