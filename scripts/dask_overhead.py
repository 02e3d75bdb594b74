"""Local pool versus Dask on the same machine: per-task overhead, throughput, and what stopping a
running task costs with each of the Dask executor's two isolation modes.

    .venv/bin/python scripts/dask_overhead.py [--workers 2] [--seq 300] [--burst 2000] [--in-flight 64]

Every executor gets the same number of lanes (`--workers` processes locally; a LocalCluster of as
many one-thread worker processes with nannies for Dask, scheduler in this process as in a typical
deployment it is one hop away). The task is the built-in `primes(limit=10)`: microseconds of work,
so what is measured is the executor.

- sequential: one call at a time, `await executor.call(...)`; the median round trip.
- burst: `--burst` calls with `--in-flight` outstanding at once; calls per second.
- stop: a running `burn` is stopped (timeout 0.3 s) on a one-worker cluster, then the time until
  the next call has its answer: how long a timeout or cancel keeps that worker's capacity away.
Prints a Markdown table (docs/dask.md quotes one).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

import uvloop

from workers.errors import TaskTimeout
from workers.executor import CallOptions
from workers.local.pool import PoolOptions, WorkerPool
from workers.local.processes import stop_helper_processes

TASK, ARGS = "primes", {"limit": 10}


async def sequential(ex: Any, n: int) -> float:
    """Median seconds of one call, one at a time."""
    for _ in range(20):  # warm up: runners, connections, caches
        await ex.call(TASK, ARGS)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await ex.call(TASK, ARGS)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def burst(ex: Any, n: int, in_flight: int) -> float:
    """Calls per second with `in_flight` outstanding."""
    gate = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with gate:
            await ex.call(TASK, ARGS)

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - start)


async def stop_cost(ex: Any, tries: int = 3) -> float:
    """Median seconds from a timeout's answer until the next call on the (only) worker answers."""
    costs = []
    for _ in range(tries):
        with contextlib.suppress(TaskTimeout):
            await ex.call("burn", {"ms": 5000}, CallOptions(timeout=0.3))
        start = time.perf_counter()
        await ex.call(TASK, ARGS, CallOptions(timeout=60))
        costs.append(time.perf_counter() - start)
        await ex.call(TASK, ARGS, CallOptions(timeout=60))
    return statistics.median(costs)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=300)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    from distributed import LocalCluster

    from workers.dask.executor import DaskExecutor
    from workers.dask.options import DaskOptions

    rows: list[tuple[str, float, float, float | None]] = []

    pool = WorkerPool(PoolOptions(workers=args.workers, max_pending=args.burst))
    await pool.start()
    try:
        seq = await sequential(pool, args.seq)
        rate = await burst(pool, args.burst, args.in_flight)
        one = WorkerPool(PoolOptions(workers=1))
        await one.start()
        try:
            stop = await stop_cost(one)
        finally:
            await one.aclose()
        rows.append(("local pool", seq, rate, stop))
    finally:
        await pool.aclose()

    for isolate in ("process", "thread"):
        async with LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True, asynchronous=True,
            dashboard_address=None, host="127.0.0.1", silence_logs=logging.ERROR,
        ) as cluster:
            ex = DaskExecutor(DaskOptions(address=cluster.scheduler_address, isolate=isolate,
                                          max_pending=args.burst))
            await ex.start()
            try:
                seq = await sequential(ex, args.seq)
                rate = await burst(ex, args.burst, args.in_flight)
            finally:
                await ex.aclose()
        async with LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, asynchronous=True,
            dashboard_address=None, host="127.0.0.1", silence_logs=logging.ERROR,
        ) as cluster:
            ex = DaskExecutor(DaskOptions(address=cluster.scheduler_address, isolate=isolate))
            await ex.start()
            try:
                stop = await stop_cost(ex)
            finally:
                await ex.aclose()
        rows.append((f"Dask, isolate={isolate}", seq, rate, stop))

    print(f"\n{os.cpu_count()} CPUs, {args.workers} lanes each, task {TASK}({ARGS}), "
          f"{args.seq} sequential calls, {args.burst} calls with {args.in_flight} in flight\n")
    print("| executor | sequential round trip (median) | throughput | next call after a timeout (median of 3) |")
    print("|---|---|---|---|")
    for name, seq, rate, stop in rows:
        stop_s = "" if stop is None else f"{stop * 1000:.0f} ms"
        print(f"| {name} | {seq * 1e6:,.0f} µs | {rate:,.0f} calls/s | {stop_s} |")


if __name__ == "__main__":
    try:
        uvloop.run(main())
    finally:
        stop_helper_processes()
