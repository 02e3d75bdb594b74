"""Server-sent events as the tests read them: one parser of a stream's lines, whatever reads them
(http.client in the e2e tests, aiohttp's client in the in-process ones)."""

from __future__ import annotations

import json
from typing import Any

Event = tuple[str | None, str, Any]  # (id, event name, data decoded as JSON)


class SseParser:
    """Feed a stream's lines one by one; a line that ends an event gives it back (WHATWG's rules, as
    far as the service uses them: `id:`, `event:`, `data:` lines, `:` comments, a blank line ends an
    event, an event without data is none)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.event_id: str | None = None
        self.event = "message"
        self.data: list[str] = []

    def feed(self, raw: bytes | str) -> Event | None:
        line = (raw.decode() if isinstance(raw, bytes) else raw).rstrip("\r\n")
        if line.startswith(":"):
            return None
        if line == "":
            done = (self.event_id, self.event, json.loads("\n".join(self.data))) if self.data else None
            self._reset()
            return done
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("id:"):
            self.event_id = line[3:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].lstrip())
        return None
