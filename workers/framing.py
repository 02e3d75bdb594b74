"""Length-prefixed pickle frames over a stream socket: the wire between the loop and a worker (and
between a Dask worker thread and its runner child). What the frames carry is workers/protocol.py.

Written by hand because the stdlib's `multiprocessing.Connection` only offers blocking reads of one
message, while the loop side must read whatever has arrived, without blocking, from its own read
callback, and a frame here is a batch (many calls or many results in one write).

Only the service and its own workers ever write to these sockets: nothing a client sends is
unpickled (client bodies are parsed as JSON or passed on as opaque bytes).
"""

from __future__ import annotations

import pickle
import select
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
        # Reads land here: `sock.recv(_CHUNK)` would allocate (and, past malloc's mmap threshold,
        # map, shrink and unmap) a fresh _CHUNK-sized object on every read.
        self._scratch = bytearray(_CHUNK)
        self._view = memoryview(self._scratch)

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
                n = sock.recv_into(self._scratch)
            except (BlockingIOError, InterruptedError):
                return out, False
            except OSError:  # ECONNRESET and friends: the worker is gone
                return out, True
            if not n:
                return out, True
            chunk = self._view[:n]
            if self._buf:
                self._buf += chunk
                self._parse(out)
            else:
                self._parse_chunk(chunk, out)
            if n < _CHUNK and self._big is None:
                # The socket had no more than this: stop here rather than pay a failing recv (and its
                # exception) to learn so. The loop's reader is level-triggered: anything that
                # arrives meanwhile calls us again.
                return out, False
        return out, False

    def feed(self, data: bytes) -> list[Any]:
        """The frames completed by `data`, bytes an asyncio protocol was handed (`data_received`)."""
        out: list[Any] = []
        view = memoryview(data)
        while view:
            big = self._big
            if big is None:
                if self._buf:
                    self._buf += view
                    self._parse(out)
                else:
                    self._parse_chunk(view, out)
                break
            n = min(len(view), len(big) - self._got)
            big[self._got : self._got + n] = view[:n]
            self._got += n
            view = view[n:]
            if self._got == len(big):
                out.append(_loads(big))
                self._big = None
        return out

    def _parse_chunk(self, chunk: memoryview, out: list[Any]) -> None:
        """Frames from a freshly received chunk, with nothing buffered before it (the common case:
        whole frames, decoded straight from the read buffer without copying them)."""
        pos = 0
        end = len(chunk)
        while end - pos >= HEADER.size:
            (size,) = HEADER.unpack_from(chunk, pos)
            start = pos + HEADER.size
            if end - start < size:
                break
            out.append(_loads(chunk[start : start + size]))
            pos = start + size
        if pos < end:
            self._buf += chunk[pos:]
            self._parse(out)

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
    """The worker side: blocking reads and writes on its end of the socket.

    With `buffered`, reads take whatever has arrived (up to _CHUNK) in one recv, so a batch of
    calls costs one system call and frames that arrived together are decoded from one buffer; a
    caller that polls the socket (select) to learn whether a frame is ready must not use it, since
    a frame may then wait in the buffer rather than in the socket. Without, each frame is read
    exactly (its header, then its payload).
    """

    def __init__(self, sock: socket.socket, *, buffered: bool = False) -> None:
        self._sock = sock
        self._sock.setblocking(True)
        self._buffered = buffered
        self._buf = bytearray()
        self._pos = 0
        self._scratch = bytearray(_CHUNK if buffered else 0)  # reads land here: no allocation per read

    def recv(self) -> Any | None:
        """The next frame, or None when the loop side has closed the socket."""
        if not self._buffered:
            head = self._recv_exact(HEADER.size)
            if head is None:
                return None
            (size,) = HEADER.unpack(head)
            payload = self._recv_exact(size)
            return None if payload is None else pickle.loads(payload)
        while True:
            buf, pos = self._buf, self._pos
            have = len(buf) - pos
            if have >= HEADER.size:
                (size,) = HEADER.unpack_from(buf, pos)
                start = pos + HEADER.size
                if len(buf) - start >= size:
                    with memoryview(buf) as view:
                        frame = pickle.loads(view[start : start + size])
                    self._pos = start + size
                    if self._pos == len(buf):
                        self._buf = bytearray()
                        self._pos = 0
                    return frame
                if size >= _BIG:  # a large frame: received in place, in one buffer of its size
                    payload = bytearray(size)
                    got = len(buf) - start
                    payload[:got] = buf[start:]
                    self._buf = bytearray()
                    self._pos = 0
                    if not self._recv_into(memoryview(payload)[got:]):
                        return None
                    return pickle.loads(payload)
            n = self._wait()
            if n is None:
                continue
            if not n:
                return None
            if not buf and n >= HEADER.size:  # nothing buffered: a whole frame decodes straight from the read
                (size,) = HEADER.unpack_from(self._scratch)
                end = HEADER.size + size
                if end <= n:
                    with memoryview(self._scratch) as view:
                        frame = pickle.loads(view[HEADER.size : end])
                        if end < n:
                            buf += view[end:n]  # the frames after it wait in the buffer
                    return frame
            if pos:
                del buf[:pos]
                self._pos = 0
            with memoryview(self._scratch) as view:
                buf += view[:n]

    def ready(self) -> bool:
        """Whether data for `recv` has arrived (buffered here or waiting in the socket); never blocks."""
        if len(self._buf) > self._pos:
            return True
        readable, _, _ = select.select([self._sock], [], [], 0)
        return bool(readable)

    def send(self, obj: Any) -> None:
        header, payload = dumps(obj)
        self.send_raw(header, payload)

    def send_raw(self, header: bytes, payload: bytes) -> None:
        sent = self._sock.sendmsg((header, payload))
        if sent == len(header) + len(payload):  # the usual case: all of it at once
            return
        views = [memoryview(header), memoryview(payload)]
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]
        while views:
            sent = self._sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    def _wait(self) -> int | None:
        """Block until data arrives, read what there is into the scratch buffer: its length (0 once
        the loop side closed), None if interrupted."""
        try:
            return self._sock.recv_into(self._scratch)
        except InterruptedError:
            return None
        except OSError:
            return 0

    def _recv_exact(self, size: int) -> bytearray | None:
        buf = bytearray(size)
        return buf if self._recv_into(memoryview(buf)) else None

    def _recv_into(self, view: memoryview) -> bool:
        got = 0
        size = len(view)
        while got < size:
            try:
                n = self._sock.recv_into(view[got:])
            except InterruptedError:
                continue
            except OSError:
                return False
            if n == 0:
                return False
            got += n
        return True
