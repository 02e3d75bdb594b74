"""In-process fan-out of job events to server-sent-event listeners.

Each listener gets its own bounded queue, so several listeners on one job each see the whole stream
and a slow listener cannot hold the runner back: when its queue is full, its oldest progress or item
event is dropped (the latest progress is what matters; every item is in the job's result), never
status, result or error events. Listeners
on another replica's job fall back to re-reading the store (see handlers.job_events).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

Event = tuple[str, dict[str, Any]]  # (event name, JSON data)

_QUEUE_SIZE = 256


class JobEvents:
    def __init__(self) -> None:
        self._listeners: defaultdict[str, set[asyncio.Queue[Event]]] = defaultdict(set)

    def publish(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        for queue in self._listeners.get(job_id, ()):
            while queue.full():
                dropped = _drop_one_live(queue)
                if not dropped:
                    break
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait((event, data))

    @contextlib.contextmanager
    def listen(self, job_id: str) -> Iterator[asyncio.Queue[Event]]:
        queue: asyncio.Queue[Event] = asyncio.Queue(_QUEUE_SIZE)
        self._listeners[job_id].add(queue)
        try:
            yield queue
        finally:
            listeners = self._listeners.get(job_id)
            if listeners is not None:
                listeners.discard(queue)
                if not listeners:
                    del self._listeners[job_id]

    def listening(self, job_id: str) -> bool:
        return bool(self._listeners.get(job_id))


_LIVE = frozenset({"progress", "item"})  # events a listener may miss: what they say is kept elsewhere


def _drop_one_live(queue: asyncio.Queue[Event]) -> bool:
    """Remove the oldest progress or item event from a full queue; False if it holds none."""
    items: list[Event] = []
    dropped = False
    while not queue.empty():
        item = queue.get_nowait()
        if not dropped and item[0] in _LIVE:
            dropped = True
            continue
        items.append(item)
    for item in items:
        queue.put_nowait(item)
    return dropped
