"""`procbridge.AsyncClient` against a real server: the same methods as `Client`, awaited; streamed
answers as async iterators, read as they come."""

from __future__ import annotations

import asyncio
import hashlib
import traceback
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import procbridge
from procbridge import AsyncClient
from tests.conftest import ServerProcess, free_port, wait_until


@pytest.fixture
async def pb(server: ServerProcess) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.url, timeout=30) as client:
        yield client


async def test_call_binary_and_png(pb: AsyncClient) -> None:
    assert await pb.call("primes", limit=1000) == 168
    data = b"x" * 100_000
    assert await pb.call("sha256", data) == hashlib.sha256(data).hexdigest()
    png = await pb.call("mandelbrot", width=10, height=10)
    assert isinstance(png, bytes) and png.startswith(b"\x89PNG")
    assert await pb.call("st_count", n=3) == [0, 1, 2]


async def test_concurrent_calls_on_one_client(pb: AsyncClient) -> None:
    assert await asyncio.gather(*(pb.call("primes", limit=100) for _ in range(10))) == [25] * 10


async def test_typed_errors(pb: AsyncClient) -> None:
    with pytest.raises(procbridge.UnknownTask):
        await pb.call("no_such_task")
    with pytest.raises(procbridge.InvalidArguments) as caught:
        await pb.call("primes", limit=[1])
    assert caught.value.problem["errors"][0]["field"] == "limit"
    with pytest.raises(procbridge.UnknownJob):
        await pb.job("nope").info()


async def test_stream_reads_items_as_they_come(pb: AsyncClient, gate: Path) -> None:
    items = pb.stream("st_count", n=3, gate=str(gate))
    assert await anext(items) == 0
    await asyncio.to_thread(gate.touch)
    assert [i async for i in items] == [1, 2]
    with pytest.raises(procbridge.TaskFailed):
        [i async for i in pb.stream("st_count", n=3, fail_at=1)]


async def test_map_ordered_unordered_and_a_bad_item(pb: AsyncClient) -> None:
    items = [{"limit": 10}, {"limit": "x"}, {"limit": 100}]
    got = [r async for r in pb.map("primes", items, return_exceptions=True)]
    assert got[0::2] == [4, 25] and isinstance(got[1], procbridge.InvalidArguments) and got[1].index == 1
    with pytest.raises(procbridge.InvalidArguments):
        [r async for r in pb.map("primes", items)]
    pairs = [p async for p in pb.map_unordered("primes", items, return_exceptions=True)]
    assert sorted(i for i, _ in pairs) == [0, 1, 2] and dict(pairs)[2] == 25
    assert sorted([r async for r in pb.map("primes", [items[0], items[2]], ordered=False)]) == [4, 25]


async def test_map_timeout(pb: AsyncClient, gate: Path, tmp_path: Path) -> None:
    with pytest.raises(procbridge.Timeout):
        [r async for r in pb.map("mark_then_wait", [{"path": str(tmp_path / "m"), "release": str(gate)}],
                                 timeout=0.5)]
    await asyncio.to_thread(gate.touch)


async def test_listings_and_probes(pb: AsyncClient) -> None:
    assert "primes" in {t["name"] for t in await pb.tasks()}
    assert (await pb.workers())["size"] == 2
    assert await pb.health() and await pb.ready()
    assert isinstance(await pb.jobs(limit=3), list)


async def test_jobs_result_events_cancel(pb: AsyncClient, gate: Path, tmp_path: Path) -> None:
    job = await pb.submit("burn", ms=100)
    assert isinstance(job, procbridge.AsyncJob)
    kinds = [e.type async for e in job.events()]
    assert "progress" in kinds and kinds[-1] == "result"
    assert (await job.result(timeout=30))["ms"] >= 100 and await job.status() == "succeeded"

    marker = tmp_path / "running"
    held = await pb.submit("mark_then_wait", {"path": str(marker), "release": str(gate)})
    events = held.events()
    async for event in events:
        if event.type == "status" and event.data["status"] == "running":
            break
    await wait_until(marker.exists, 10, what="the job to start")
    with pytest.raises(procbridge.Timeout):
        await held.result(timeout=0.3)
    assert (await held.cancel())["status"] == "cancelled"
    assert [e.type async for e in events][-1] == "error"
    with pytest.raises(procbridge.JobCancelled):
        await held.result()
    with pytest.raises(procbridge.JobFinished):
        await held.cancel()
    with pytest.raises(procbridge.TaskFailed):
        await (await pb.submit("st_async_fail", message="no")).result(timeout=30)
    png = await (await pb.submit("mandelbrot", width=8, height=8)).result(timeout=30)
    assert png.startswith(b"\x89PNG")
    assert held.id in {j["id"] for j in await pb.jobs(status="cancelled")}


async def test_server_gone() -> None:
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", retries=0) as pb:
        with pytest.raises(procbridge.ServiceUnreachable) as caught:
            await pb.call("primes", limit=1)
        assert await pb.health() is False
    shown = "".join(traceback.format_exception(caught.value))
    assert "/httpx/" not in shown and "/httpcore/" not in shown
