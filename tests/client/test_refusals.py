"""Refusals against real servers: a missing key (401, never retried), 503 `overloaded` on a full
admission queue and 429 on a rate limit (retried after Retry-After, within the client's deadline),
for both clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import procbridge
from procbridge import AsyncClient, Client
from tests.client.conftest import TASKS
from tests.conftest import ServerProcess, free_port, joined, metric, run_in_thread, serving, wait_for


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(tmp_path_factory.mktemp("keyed"), "--workers", "1", "--api-keys", "k-one,k-two") as srv:
        yield srv


def test_a_missing_or_wrong_key_is_unauthorized(keyed: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROCBRIDGE_API_KEY", raising=False)
    with Client(keyed.url) as pb:
        with pytest.raises(procbridge.Unauthorized) as caught:
            pb.call("primes", limit=10)
        assert caught.value.status == 401
        assert pb.health() is True  # the probes stay open
    with Client(keyed.url, api_key="wrong") as pb, pytest.raises(procbridge.Unauthorized):
        pb.tasks()
    with Client(keyed.url, api_key="k-two") as pb:
        assert pb.call("primes", limit=10) == 4
    monkeypatch.setenv("PROCBRIDGE_API_KEY", "k-one")
    with Client(keyed.url) as pb:
        assert pb.submit("primes", limit=10).result(timeout=30) == 4


async def test_the_async_client_sends_its_key(keyed: ServerProcess) -> None:
    async with AsyncClient(keyed.url) as pb:
        with pytest.raises(procbridge.Unauthorized):
            await pb.workers()
    async with AsyncClient(keyed.url, api_key="k-one") as pb:
        assert (await pb.workers())["size"] == 1


@pytest.fixture
def full(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    """A server whose one worker is held by a gated call and whose one pending slot is taken: the next
    call is refused with 503 overloaded (Retry-After: 1) until the gate file is written."""
    gate = tmp_path / "gate"
    with serving(tmp_path, "--workers", "1", "--max-pending", "1", *TASKS) as srv, Client(srv.url) as pb:
        first = run_in_thread(lambda: pb.call("mark_then_wait", path=str(tmp_path / "a"), release=str(gate)))
        wait_for((tmp_path / "a").exists, 10, what="the first call to hold the worker")
        second = run_in_thread(lambda: pb.call("mark_then_wait", path=str(tmp_path / "b"), release=str(gate)))
        wait_for(lambda: metric(srv, "procbridge_pending_tasks") == 1, 10, what="the second call to wait")
        held = [first, second]
        try:
            yield srv, gate
        finally:
            gate.touch()
            for thread, box in held:
                joined(thread, box)


def test_overloaded_without_retries_carries_retry_after(full: tuple[ServerProcess, Path]) -> None:
    srv, _ = full
    with Client(srv.url, retries=0) as pb, pytest.raises(procbridge.Overloaded) as caught:
        pb.call("primes", limit=10)
    assert caught.value.status == 503 and caught.value.retry_after == 1.0


def test_overloaded_is_retried_after_retry_after(full: tuple[ServerProcess, Path]) -> None:
    srv, gate = full
    with Client(srv.url, retries=3) as pb:
        started = time.monotonic()
        thread, box = run_in_thread(lambda: pb.call("primes", limit=100))
        time.sleep(0.3)  # the first try is refused by now; free the queue before its Retry-After ends
        gate.touch()
        assert joined(thread, box) == 25
        assert time.monotonic() - started >= 1.0  # it waited Retry-After (1 s) before trying again


def test_no_retry_past_the_clients_deadline(full: tuple[ServerProcess, Path]) -> None:
    srv, _ = full
    with Client(srv.url, retries=5, timeout=0.5) as pb:
        started = time.monotonic()
        with pytest.raises(procbridge.Overloaded):
            pb.call("primes", limit=10)
        assert time.monotonic() - started < 1.0  # a 1 s Retry-After would end past the 0.5 s deadline


async def test_the_async_client_retries_overloaded_too(full: tuple[ServerProcess, Path]) -> None:
    srv, gate = full
    async with AsyncClient(srv.url, retries=0) as pb:
        with pytest.raises(procbridge.Overloaded):
            await pb.call("primes", limit=10)
    async with AsyncClient(srv.url, retries=3) as pb:
        started = time.monotonic()
        call = asyncio.create_task(pb.call("primes", limit=100))
        await asyncio.sleep(0.3)
        gate.touch()
        assert await call == 25 and time.monotonic() - started >= 1.0


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(tmp_path_factory.mktemp("limited"), "--workers", "1", "--rate-limit", "2/s") as srv:
        yield srv


def test_rate_limited_carries_retry_after_and_is_retried(limited: ServerProcess) -> None:
    with Client(limited.url, retries=0) as pb:
        with pytest.raises(procbridge.RateLimited) as caught:
            for _ in range(10):
                pb.call("primes", limit=10)
        assert caught.value.status == 429 and caught.value.retry_after is not None and caught.value.retry_after >= 1
    time.sleep(1.1)
    with Client(limited.url, retries=3) as pb:
        started = time.monotonic()
        assert [pb.call("primes", limit=10) for _ in range(4)] == [4] * 4  # the 3rd and 4th wait their turn
        assert time.monotonic() - started >= 0.9


def test_other_errors_are_not_retried(limited: ServerProcess) -> None:
    time.sleep(1.1)
    with Client(limited.url, retries=3) as pb, pytest.raises(procbridge.InvalidArguments):
        pb.call("primes", limit="x")
    # one request only: the next two still fit the bucket of 2
    with Client(limited.url, retries=0) as pb:
        assert pb.call("primes", limit=10) == 4


def test_connect_errors_are_retried_then_reported(tmp_path: Path) -> None:
    """Nothing listens: each try fails to connect (nothing was sent), so all are retried, then
    ServiceUnreachable; the back-off keeps the whole thing short."""
    with Client(f"http://127.0.0.1:{free_port()}", retries=3) as pb:
        started = time.monotonic()
        with pytest.raises(procbridge.ServiceUnreachable):
            pb.call("primes", limit=1)
        assert 0.5 < time.monotonic() - started < 5  # 0.1 + 0.2 + 0.4 s of back-off, with jitter
