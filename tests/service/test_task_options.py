"""`@task(timeout=...)` against --task-timeout, in-process with the real pool, and the concurrency
gates of service/concurrency.py on their own (first come first served, a cancelled waiter leaves
the line and never holds a slot, a slot handed to a waiter cancelled at that moment is passed on)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from service.app import create_app
from service.concurrency import TaskGates
from service.config import Config
from tests.conftest import started_client, wait_until

TASKS = "tests.support.option_tasks"


@pytest.fixture
async def client(aiohttp_client, tmp_path) -> Any:
    config = Config(workers=2, store=str(tmp_path / "jobs.db"), tasks=(TASKS,), task_timeout=1.0)
    return await started_client(aiohttp_client, create_app(config))


async def call(client: Any, task: str, args: dict[str, Any], query: str = "") -> tuple[int, Any, float]:
    began = time.monotonic()
    resp = await client.post(f"/v1/tasks/{task}{query}", data=orjson.dumps(args),
                             headers={"Content-Type": "application/json"})
    body = orjson.loads(await resp.read())
    return resp.status, body, time.monotonic() - began


async def test_a_tasks_own_timeout_longer_than_task_timeout_holds(client):
    status, body, _ = await call(client, "patient", {"seconds": 2.0})  # --task-timeout is 1 s; its own 5 s
    assert status == 200 and body["result"] == 2.0
    status, body, _ = await call(client, "patient", {"seconds": 2.0}, "?timeout=30")  # capped at 5, not 1
    assert status == 200


async def test_a_task_without_its_own_timeout_gets_task_timeout(client):
    status, body, elapsed = await call(client, "plain_sleep", {"seconds": 300})
    assert status == 504 and body["type"] == "/problems/task-timeout"
    assert elapsed < 20
    status, body, elapsed = await call(client, "plain_sleep", {"seconds": 300}, "?timeout=60")
    assert status == 504 and elapsed < 20  # capped at --task-timeout, as before


async def test_retries_is_accepted_and_a_call_works_as_without_it(client):
    status, body, _ = await call(client, "retried", {"n": 3})
    assert status == 200 and body["result"] == 3


async def test_tasks_list_and_openapi_still_serve_tasks_with_options(client):
    names = {t["name"] for t in (await (await client.get("/v1/tasks")).json())["tasks"]}
    assert {"serial", "capped", "patient", "retried"} <= names
    assert (await client.get("/openapi.json")).status == 200


# -- the gates on their own -----------------------------------------------------------------------


def gates(limit: int) -> TaskGates:
    return TaskGates([("t", limit)], lambda: None)


async def test_a_gate_admits_its_limit_then_first_come_first_served():
    g = gates(2)
    order: list[int] = []
    hold = asyncio.Event()

    async def one(i: int) -> None:
        async def body() -> None:
            order.append(i)
            await hold.wait()

        await g.run("t", body)

    tasks = [asyncio.ensure_future(one(i)) for i in range(5)]
    await wait_until(lambda: g.waiting >= 3)
    assert order == [0, 1] and g.get("t").running == 2  # type: ignore[union-attr]
    hold.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4] and g.waiting == 0 and g.get("t").running == 0  # type: ignore[union-attr]


async def test_a_cancelled_waiter_leaves_the_line_and_never_runs():
    g = gates(1)
    ran: list[str] = []
    hold = asyncio.Event()

    async def held() -> None:
        ran.append("held")
        await hold.wait()

    async def waiter() -> None:
        ran.append("waiter")

    first = asyncio.ensure_future(g.run("t", held))
    await wait_until(lambda: ran)
    second = asyncio.ensure_future(g.run("t", waiter))
    await wait_until(lambda: g.waiting >= 1)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert g.waiting == 0
    hold.set()
    await first
    assert ran == ["held"] and g.get("t").running == 0  # type: ignore[union-attr]


async def test_a_slot_handed_to_a_waiter_cancelled_at_that_moment_is_passed_on():
    g = gates(1)
    gate = g.get("t")
    assert gate is not None
    await gate.acquire()
    doomed = asyncio.ensure_future(gate.acquire())
    nxt = asyncio.ensure_future(gate.acquire())
    await wait_until(lambda: g.waiting >= 2)
    gate.release()  # hands the slot to `doomed`...
    doomed.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await nxt  # the slot went on to the next in line
    assert gate.running == 1 and g.waiting == 0
    gate.release()
    assert gate.running == 0
