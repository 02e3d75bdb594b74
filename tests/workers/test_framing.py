"""The wire between the loop and a worker (workers/framing.py): frames that arrive together, split
anywhere, or larger than a read come out whole and in order, on both ends."""

from __future__ import annotations

import socket
import threading

import pytest

from workers.framing import _BIG, BlockingFrames, FrameReader, dumps


def _wire(*frames: object) -> bytes:
    return b"".join(header + payload for header, payload in map(dumps, frames))


def _read_all(reader: FrameReader, sock: socket.socket, want: int) -> list[object]:
    """Drive the non-blocking reader as the loop would (level-triggered: call while data is there)."""
    out: list[object] = []
    eof = False
    while len(out) < want and not eof:
        socket.socket.setblocking(sock, True)
        sock.settimeout(5.0)
        data_ready = sock.recv(1, socket.MSG_PEEK)
        sock.setblocking(False)
        if not data_ready:
            break
        frames, eof = reader.read(sock)
        out.extend(frames)
    return out


@pytest.mark.parametrize("cut", [None, 1, 5, 8, 9, 20])
def test_the_loop_side_reader_gets_every_frame_however_the_bytes_are_cut(cut: int | None) -> None:
    frames = [[(i, 0, {"x": "y" * i}, 0.0)] for i in range(50)] + ["ready", ("grant", 3, None)]
    wire = _wire(*frames)
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)

        def send() -> None:
            step = cut or len(wire)
            for i in range(0, len(wire), step):
                b.sendall(wire[i : i + step])

        sender = threading.Thread(target=send)
        sender.start()
        got = _read_all(FrameReader(), a, len(frames))
        sender.join()
        assert got == frames
        b.shutdown(socket.SHUT_WR)
        a.setblocking(True)
        assert a.recv(1, socket.MSG_PEEK) == b""
        a.setblocking(False)
        assert FrameReader().read(a) == ([], True)


def test_the_loop_side_reader_takes_a_large_frame_in_place() -> None:
    big = [(1, 0, b"z" * (3 * _BIG), 0.0)]
    wire = _wire("ready", big, "ready")
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        sender = threading.Thread(target=b.sendall, args=(wire,))
        sender.start()
        got = _read_all(FrameReader(), a, 3)
        sender.join()
        assert got == ["ready", big, "ready"]


@pytest.mark.parametrize("buffered", [True, False])
def test_the_worker_side_reads_batches_and_large_frames_and_sees_the_end(buffered: bool) -> None:
    frames: list[object] = [[(i, 0, "primes", {"limit": i}, False, False, False)] for i in range(30)]
    frames.insert(10, [(99, 1, "big", b"q" * (2 * _BIG), False, False, False)])
    a, b = socket.socketpair()
    with a:
        worker = BlockingFrames(a, buffered=buffered)
        sender = threading.Thread(target=lambda: (b.sendall(_wire(*frames)), b.close()))
        sender.start()
        got = [worker.recv() for _ in frames]
        sender.join()
        assert got == frames
        assert worker.recv() is None  # the loop side closed its end
