"""The relay between serving processes and the core (workers/relay/), in one process over a real Unix
socket: calls and every kind of PoolError cross it intact, a cancel reaches the core's call, a lost
link fails what waits on either side, a burst leaves as one frame, and a large payload crosses whole.
`FrameReader.feed` (what the relay's protocol decodes with) is checked at every split point."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from workers import framing
from workers.errors import (
    ExecutorUnavailable,
    Overloaded,
    PoolClosed,
    PoolError,
    TaskFailed,
    TaskTimeout,
    WorkerCrashed,
)
from workers.executor import CallOptions, Outcome
from workers.relay.executor import RelayExecutor
from workers.relay.server import RelayServer


class Handler:
    """The core's side: answers from a script, records what it saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], float | None]] = []
        self.notes: list[tuple[str, tuple[Any, ...]]] = []
        self.raise_: PoolError | None = None
        self.hold: asyncio.Event | None = None
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def call(self, task: str, kwargs: dict[str, Any], timeout: float | None) -> Outcome:
        self.calls.append((task, kwargs, timeout))
        self.started.set()
        if self.hold is not None:
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if self.raise_ is not None:
            raise self.raise_
        value = kwargs.get("blob", repr(sorted(kwargs.items())).encode())
        return Outcome(value, 4242, 0.25, True)

    def take(self, bucket: str) -> float:
        return 0.0 if bucket == "free" else 7.5

    def note(self, what: str, args: tuple[Any, ...]) -> None:
        self.notes.append((what, args))

    def welcome(self) -> tuple[int, int]:
        return 3, 12


@pytest.fixture
async def relay(tmp_path: Path):
    handler = Handler()
    hellos: list[int] = []
    server = RelayServer(str(tmp_path / "relay.sock"), handler, hellos.append)
    await server.start()
    lost: list[bool] = []
    executor = RelayExecutor(server.path, on_lost=lambda: lost.append(True))
    await executor.start()
    yield server, executor, handler, hellos, lost
    await executor.aclose()
    await server.close()


async def test_a_call_crosses_with_its_arguments_and_timeout_and_its_outcome_comes_back(relay) -> None:
    server, executor, handler, hellos, _ = relay
    outcome = await executor.call("primes", {"limit": 5}, CallOptions(timeout=2.5))
    assert outcome == Outcome(b"[('limit', 5)]", 4242, 0.25, True)
    assert handler.calls == [("primes", {"limit": 5}, 2.5)]
    assert (executor.size, executor.core_max_pending) == (3, 12)  # the core's, from its welcome
    assert os.stat(server.path).st_mode & 0o777 == 0o600
    executor.hello()
    await wait_until(lambda: hellos == [os.getpid()], 10, "the hello")


@pytest.mark.parametrize("error", [
    TaskFailed("ValueError", "bad", "Traceback ..."), WorkerCrashed(17, -9), ExecutorUnavailable("cluster gone"),
    TaskTimeout(1.5), Overloaded(9), PoolClosed(),
])
async def test_every_pool_error_crosses_as_itself(relay, error: PoolError) -> None:
    _, executor, handler, _, _ = relay
    handler.raise_ = error
    with pytest.raises(type(error)) as caught:
        await executor.call("primes", {"limit": 1})
    assert str(caught.value) == str(error) and caught.value.args == error.args


async def test_cancelling_a_call_cancels_it_in_the_core(relay) -> None:
    _, executor, handler, _, _ = relay
    handler.hold = asyncio.Event()
    waiting = asyncio.ensure_future(executor.call("burn", {"ms": 1}))
    await asyncio.wait_for(handler.started.wait(), 10)
    waiting.cancel()
    await asyncio.wait_for(handler.cancelled.wait(), 10)
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_lost_core_fails_waiting_calls_and_says_so(relay) -> None:
    server, executor, handler, _, lost = relay
    handler.hold = asyncio.Event()
    waiting = asyncio.ensure_future(executor.call("burn", {"ms": 1}))
    await asyncio.wait_for(handler.started.wait(), 10)
    await server.close()  # the core goes away
    with pytest.raises(PoolClosed):
        await asyncio.wait_for(waiting, 10)
    assert lost == [True]
    await asyncio.wait_for(handler.cancelled.wait(), 10)  # and the core's side of the call was cancelled
    with pytest.raises(PoolClosed):
        await executor.call("primes", {"limit": 1})


async def test_a_burst_of_calls_leaves_as_one_frame(relay, monkeypatch: pytest.MonkeyPatch) -> None:
    executor = relay[1]
    frames: list[int] = []
    real = framing.dumps

    def counting(obj: Any) -> tuple[bytes, bytes]:
        if type(obj) is list and obj and obj[0][0] == 1:  # a frame of CALL messages
            frames.append(len(obj))
        return real(obj)

    monkeypatch.setattr(framing, "dumps", counting)
    outcomes = await asyncio.gather(*(executor.call("primes", {"limit": i}) for i in range(50)))
    assert [o.value for o in outcomes] == [repr([("limit", i)]).encode() for i in range(50)]
    assert frames == [50]


async def test_a_large_payload_crosses_whole(relay) -> None:
    _, executor, _, _, _ = relay
    blob = os.urandom(5 * 1024 * 1024 + 3)  # past the reader's in-place size, in many reads
    outcome = await executor.call("sha256", {"blob": blob})
    assert outcome.value == blob


async def test_rate_tokens_and_notes_are_the_cores(relay) -> None:
    _, executor, handler, _, _ = relay
    assert await executor.take("free") == 0.0
    assert await executor.take("spent") == 7.5
    executor.note("observe", "primes", "ok", 0.5)
    executor.note("unauthorized")
    await wait_until(lambda: len(handler.notes) == 2, 10, "the notes")
    assert handler.notes == [("observe", ("primes", "ok", 0.5)), ("unauthorized", ())]


def test_feed_decodes_frames_split_at_every_point() -> None:
    frames = [["a", 1], {"b": b"x" * 300}, ("c",) * 5]
    data = b"".join(b"".join(framing.dumps(f)) for f in frames)
    for cut in range(len(data) + 1):
        reader = framing.FrameReader()
        assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == frames


def test_feed_decodes_a_big_frame_given_in_small_pieces() -> None:
    frame = [b"y" * (2 * 1024 * 1024)]
    header, payload = framing.dumps(frame)
    data = header + payload + b"".join(framing.dumps(["after"]))
    reader = framing.FrameReader()
    out: list[Any] = []
    for i in range(0, len(data), 65_536):
        out += reader.feed(data[i : i + 65_536])
    assert out == [frame, ["after"]]
