"""One producer of snapshots for every dashboard that watches.

The first watcher to join starts a single task that builds a snapshot (snapshot.py) and publishes
it, once a second; the last watcher to leave stops it. So with nobody watching
nothing runs, and with N watchers a snapshot is still built once a second, not N times.

Publishing keeps only the latest snapshot: each watcher is told that a newer one exists and, when
it is ready to send (its previous send done, a second after it), takes the latest. A slow watcher
therefore skips snapshots; nothing is ever queued for it. Each watcher also paces itself to at most
one snapshot per `interval`: a new watcher gets the latest snapshot at once (the first watcher waits
for the first build), then at most one a second.

A drain (`drain()`, on SIGTERM) publishes one last snapshot (it says `draining: true`), which every
watcher sends before its stream ends; watchers joining after that are refused (503 `draining`).
`close()` (the app's shutdown) ends every stream at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

log = logging.getLogger("procbridge.dashboard")

INTERVAL = 1.0


class Watcher:
    """One stream's place at the hub: `await next()` gives the snapshot to send, None at the end."""

    def __init__(self, hub: SnapshotHub) -> None:
        self._hub = hub
        self.wake = asyncio.Event()
        self._seen = 0  # the version of the last snapshot it took
        self._sent_at: float | None = None

    async def next(self) -> str | None:
        hub = self._hub
        loop = asyncio.get_running_loop()
        if self._sent_at is not None and not hub.closed:
            delay = self._sent_at + hub.interval - loop.time()
            if delay > 0:  # paced; the end (a drain's last snapshot, a close) goes out at once
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await hub.ended.wait()
        while hub.version == self._seen or hub.latest is None:
            if hub.closed:
                return None
            self.wake.clear()
            await self.wake.wait()
        self._seen = hub.version
        self._sent_at = loop.time()
        return hub.latest


class SnapshotHub:
    """The watchers, the one producer task while there are any, and the latest snapshot."""

    def __init__(self, build: Callable[[], Awaitable[str]], interval: float = INTERVAL) -> None:
        self._build = build
        self.interval = interval
        self.watchers: set[Watcher] = set()
        self.producer: asyncio.Task[None] | None = None  # only while someone watches
        self.latest: str | None = None
        self.version = 0  # of `latest`; 0: none yet
        self.builds = 0  # snapshots built so far (tests count them)
        self.draining = False  # the last snapshot is on its way: no new watcher
        self.closed = False  # no snapshot will follow `latest`
        self.ended = asyncio.Event()  # set with `closed`
        self._building = False
        self._hurry = asyncio.Event()
        self._failing = False

    @property
    def closing(self) -> bool:
        return self.draining or self.closed

    @contextlib.contextmanager
    def watch(self) -> Iterator[Watcher]:
        """Join for the length of a `with` block. The caller checks `closing` first (503)."""
        watcher = Watcher(self)
        self.watchers.add(watcher)
        if self.producer is None:
            self.latest = None  # a snapshot from the last time anyone watched is stale
            self.producer = asyncio.ensure_future(self._produce())
        try:
            yield watcher
        finally:
            self.watchers.discard(watcher)
            if not self.watchers and self.producer is not None and not self._building:
                self.producer.cancel()  # asleep: nothing of the store's is interrupted
                self.producer = None

    def drain(self) -> None:
        """Send one last snapshot to every watcher, then end their streams."""
        self.draining = True
        if self.producer is None:
            self._end()
        else:
            self._hurry.set()

    async def close(self) -> None:
        """End every stream now and stop the producer."""
        self.draining = True
        self._end()
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer

    def _end(self) -> None:
        self.closed = True
        self.ended.set()
        for watcher in self.watchers:
            watcher.wake.set()

    def _publish(self, snapshot: str) -> None:
        self.latest = snapshot
        self.version += 1
        for watcher in self.watchers:
            watcher.wake.set()

    async def _produce(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            while self.watchers and not self.closed:
                began = loop.time()
                self._building = True
                try:
                    snapshot = await self._build()
                except Exception:
                    if not self._failing:
                        log.exception("dashboard: building a snapshot failed")
                    self._failing = True
                else:
                    self._failing = False
                    self.builds += 1
                    self._publish(snapshot)
                finally:
                    self._building = False
                if self.draining:
                    self._end()
                    break
                if not self.watchers:
                    break
                # One a second from start to start, with a pause however slow a build was (a drain wakes it).
                wake_at = max(began + self.interval, loop.time() + self.interval / 4)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(wake_at):
                        await self._hurry.wait()
        finally:
            if self.producer is asyncio.current_task():
                self.producer = None
