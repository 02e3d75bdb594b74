"""A TCP proxy on loopback that the test can cut: a client talks to `proxy.url`, the proxy forwards the
bytes both ways to the real server, and the test severs connections for real (the client's socket sees
the peer go away mid-answer, as it would when a load balancer, a NAT or the network drops it).

- `cut()` severs every connection open now;
- `budget` (bytes, None: no limit): each connection accepted from then on is severed once it has
  forwarded that many bytes from the server to the client (headers included);
- severed with a FIN, the client reads the end of the stream in the middle of the answer; with a TCP
  reset (`reset=True`, or `cut(reset=True)`), ECONNRESET;
- `accepted` counts the connections made through it; `sent` holds every byte clients sent.

Each connection is two threads that block on `recv` and end when either side closes; `close()` stops
the lot. Nothing here sleeps: severing is `shutdown()`, which wakes the blocked `recv` at once.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket, budget: int | None) -> None:
        self.client = client
        self.upstream = upstream
        self.budget = budget  # bytes server -> client still to forward; None: no limit
        self.closed = False


class CuttingProxy:
    def __init__(self, target_port: int, *, budget: int | None = None, reset: bool = False) -> None:
        self.target_port = target_port
        self.budget = budget
        self.reset = reset
        self.accepted = 0
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                pair = _Pair(client, upstream, self.budget)
                self._pairs.append(pair)
                self.accepted += 1
            threading.Thread(target=self._pump, args=(pair, True), name="proxy-up", daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, False), name="proxy-down", daemon=True).start()

    def _pump(self, pair: _Pair, upward: bool) -> None:
        """Forward one direction until either side closes; the server's bytes within the budget only."""
        source, target = (pair.client, pair.upstream) if upward else (pair.upstream, pair.client)
        try:
            while True:
                size = 65536
                if not upward and pair.budget is not None:
                    size = min(size, pair.budget)
                    if size <= 0:
                        break
                data = source.recv(size)
                if not data:
                    break
                if upward:
                    with self._lock:
                        self.sent += data
                elif pair.budget is not None:
                    pair.budget -= len(data)
                target.sendall(data)
        except OSError:
            pass
        self._sever(pair, self.reset)

    def _sever(self, pair: _Pair, reset: bool) -> None:
        with self._lock:
            if pair.closed:
                return
            pair.closed = True
            if pair in self._pairs:
                self._pairs.remove(pair)
        if reset:  # closed with SO_LINGER 0: a RST, not a FIN (SHUT_RD sends nothing, it wakes the recv)
            with contextlib.suppress(OSError):
                pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for sock in (pair.client, pair.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD if reset and sock is pair.client else socket.SHUT_RDWR)
            sock.close()

    def cut(self, reset: bool | None = None) -> int:
        """Sever every connection open now (with a reset: `reset`, else as the proxy's `reset` says); how
        many there were."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._sever(pair, self.reset if reset is None else reset)
        return len(pairs)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.cut()
        self._thread.join(10)
