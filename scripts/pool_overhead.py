"""Per-call overhead of procbridge's pool against the stock ProcessPoolExecutor, in one run.

    .venv/bin/python scripts/pool_overhead.py [--workers N] [--calls N] [--concurrency N] [--repeat N]

Each contender runs the same no-op task (`primes(limit=1)`, a few hundred nanoseconds of work) with
the same number of calls in flight; the figure is wall time divided by calls, so it includes the
event loop's own work. Contenders: procbridge's native `await pool.call(...)`, procbridge through
`loop.run_in_executor`, and `concurrent.futures.ProcessPoolExecutor` through `run_in_executor`.
With `--repeat N` the three are measured N times in turn (both pools stay up, idle while the other
runs) and each figure is the median, so a burst of other work on the machine cannot favour one of
them; the single measurements are in `samples_us`. `loop_cpu_us` is the CPU time of this process
(the event loop) per call, the same medians: it suffers less than wall time when other work shares
the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from workers.builtin_tasks import primes
from workers.local.pool import PoolOptions, WorkerPool
from workers.local.processes import stop_helper_processes


async def measure(call: Callable[[], Awaitable[object]], calls: int, concurrency: int) -> tuple[float, float]:
    """Seconds per call with `concurrency` calls in flight (after a warm-up of 1000 calls), and this
    process's CPU seconds per call."""

    async def lane(n: int) -> None:
        for _ in range(n):
            await call()

    await asyncio.gather(*(lane(1000 // concurrency + 1) for _ in range(concurrency)))
    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(lane(calls // concurrency) for _ in range(concurrency)))
    n = calls // concurrency * concurrency
    return (time.perf_counter() - start) / n, (time.process_time() - cpu) / n


async def main(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    samples: dict[str, list[float]] = {
        "procbridge_native_us": [], "procbridge_run_in_executor_us": [], "stock_process_pool_us": [],
    }
    cpu: dict[str, list[float]] = {k: [] for k in samples}

    async def sample(key: str, call: Callable[[], Awaitable[object]]) -> None:
        wall, loop_cpu = await measure(call, args.calls, args.concurrency)
        samples[key].append(1e6 * wall)
        cpu[key].append(1e6 * loop_cpu)

    pool = WorkerPool(PoolOptions(workers=args.workers, max_pending=100_000))
    await pool.start()
    try:
        with cf.ProcessPoolExecutor(args.workers) as stock:
            for _ in range(args.repeat):
                await sample("procbridge_native_us", lambda: pool.call("primes", {"limit": 1}))
                await sample("procbridge_run_in_executor_us", lambda: loop.run_in_executor(pool, primes, 1))
                await sample("stock_process_pool_us", lambda: loop.run_in_executor(stock, primes, 1))
    finally:
        await pool.aclose()
    results: dict[str, Any] = {k: statistics.median(v) for k, v in samples.items()}
    results["speedup_native_vs_stock"] = results["stock_process_pool_us"] / results["procbridge_native_us"]
    results["speedup_executor_vs_stock"] = results["stock_process_pool_us"] / results["procbridge_run_in_executor_us"]
    results["repeat"] = args.repeat
    results["samples_us"] = {k: [round(x, 3) for x in v] for k, v in samples.items()}
    results["loop_cpu_us"] = {k: round(statistics.median(v), 3) for k, v in cpu.items()}
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1, help="measure each contender this many times, in turn")
    ns = parser.parse_args()
    out = uvloop.run(main(ns))
    stop_helper_processes()
    print(json.dumps({"cpus": len(os.sched_getaffinity(0)), "workers": ns.workers, **out}, indent=2))
