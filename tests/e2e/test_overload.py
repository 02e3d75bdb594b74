"""Sustained overload: the server sheds what it cannot queue, its memory stays flat, and every call
gets exactly one documented answer."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import psutil

from tests.conftest import http


async def _hammer(url: str, clients: int, seconds: float, max_requests: int) -> tuple[Counter[str], list[float]]:
    """`clients` closed-loop clients posting 20 ms burns; bounded by time and by request count."""
    outcomes: Counter[str] = Counter()
    admitted_latency: list[float] = []
    deadline = time.monotonic() + seconds
    sent = 0
    body = b'{"ms": 20}'
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def client() -> None:
            nonlocal sent
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                start = time.monotonic()
                async with session.post(url + "/v1/tasks/burn", data=body, headers=headers) as resp:
                    payload = await resp.json(content_type=None)
                    if resp.status == 200:
                        outcomes["ok"] += 1
                        admitted_latency.append(time.monotonic() - start)
                    else:
                        assert resp.status == 503, payload
                        assert resp.headers.get("Retry-After")
                        outcomes[payload["type"]] += 1
                        await asyncio.sleep(0.001)  # pacing of the load generator, not synchronisation

        await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes, admitted_latency


def test_ten_times_overload_is_shed_with_flat_memory(server_factory):
    server = server_factory("--workers", "1", "--max-pending", "2")
    proc = psutil.Process(server.proc.pid)
    # warm up (imports, first allocations) before taking the baseline
    asyncio.run(_hammer(server.url, 4, 0.5, 200))
    baseline = proc.memory_info().rss
    outcomes, latencies = asyncio.run(_hammer(server.url, 30, 3.0, 20_000))
    after = proc.memory_info().rss
    assert outcomes["ok"] > 0
    assert outcomes["/problems/overloaded"] > outcomes["ok"]  # most of the excess is refused at once
    assert set(outcomes) <= {"ok", "/problems/overloaded"}
    # memory stays flat: what cannot be queued is refused, not buffered
    assert after - baseline < 20 * 1024 * 1024, (baseline, after)
    # the service is whole afterwards
    assert http("GET", server.url + "/readyz").status == 200
    assert http("GET", server.url + "/v1/workers").json()["workers"][0]["state"] in ("idle", "busy")
    print(f"\n{dict(outcomes)}; admitted p50 {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms; "
          f"rss {baseline / 2**20:.1f} -> {after / 2**20:.1f} MiB")
