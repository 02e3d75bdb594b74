"""Length-prefixed pickle frames over a stream socket: the wire between the loop and a worker.

Written by hand because the stdlib's `multiprocessing.Connection` only offers blocking reads of one
message, while the loop side must read whatever has arrived, without blocking, from its own read
callback, and a frame here is a batch (many calls or many results in one write).

Only the service and its own workers ever write to these sockets: nothing a client sends is
unpickled (client bodies are parsed as JSON or passed on as opaque bytes).
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any, NamedTuple

HEADER = struct.Struct("!Q")
_CHUNK = 256 * 1024
_BIG = 1024 * 1024  # frames at least this large are received in place, without re-buffering
_MAX_READS = 64  # reads per callback, so one chatty worker cannot hold the loop


class BadFrame(NamedTuple):
    """Stands in for a frame that would not unpickle: the reader skips it and stays in step."""

    error: str


def _loads(data: Any) -> Any:
    try:
        return pickle.loads(data)
    except BaseException as exc:  # noqa: BLE001 - whatever the bytes do, the reader and the loop go on
        return BadFrame(f"{type(exc).__name__}: {exc}")


def dumps(obj: Any) -> tuple[bytes, bytes]:
    """A frame as (header, payload), to send with one sendmsg and no concatenation copy."""
    payload = pickle.dumps(obj, protocol=5)
    return HEADER.pack(len(payload)), payload


class FrameReader:
    """Incremental, non-blocking frame decoder for the loop side of a worker socket."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._big: bytearray | None = None
        self._got = 0

    def read(self, sock: socket.socket) -> tuple[list[Any], bool]:
        """Read what is available; return the decoded frames and whether the peer has closed."""
        out: list[Any] = []
        for _ in range(_MAX_READS):
            try:
                if self._big is not None:
                    n = sock.recv_into(memoryview(self._big)[self._got :])
                    if n == 0:
                        return out, True
                    self._got += n
                    if self._got == len(self._big):
                        out.append(_loads(self._big))
                        self._big = None
                    continue
                chunk = sock.recv(_CHUNK)
            except (BlockingIOError, InterruptedError):
                return out, False
            except OSError:  # ECONNRESET and friends: the worker is gone
                return out, True
            if not chunk:
                return out, True
            self._buf += chunk
            self._parse(out)
        return out, False

    def _parse(self, out: list[Any]) -> None:
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, pos)
            start = pos + HEADER.size
            if len(buf) - start >= size:
                with memoryview(buf) as view:
                    out.append(_loads(view[start : start + size]))
                pos = start + size
            elif size >= _BIG:
                big = bytearray(size)
                have = len(buf) - start
                big[:have] = buf[start:]
                self._big, self._got = big, have
                pos = len(buf)
                break
            else:
                break
        if pos:
            del buf[:pos]


class BlockingFrames:
    """The worker side: plain blocking reads and writes on its end of the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sock.setblocking(True)

    def recv(self) -> Any | None:
        """The next frame, or None when the loop side has closed the socket."""
        head = self._recv_exact(HEADER.size)
        if head is None:
            return None
        (size,) = HEADER.unpack(head)
        payload = self._recv_exact(size)
        if payload is None:
            return None
        return pickle.loads(payload)

    def send(self, obj: Any) -> None:
        header, payload = dumps(obj)
        self.send_raw(header, payload)

    def send_raw(self, header: bytes, payload: bytes) -> None:
        views = [memoryview(header), memoryview(payload)]
        while views:
            sent = self._sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    def _recv_exact(self, size: int) -> bytearray | None:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            try:
                n = self._sock.recv_into(view[got:])
            except InterruptedError:
                continue
            except OSError:
                return None
            if n == 0:
                return None
            got += n
        return buf
