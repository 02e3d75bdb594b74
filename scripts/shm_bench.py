"""Large-payload round trips: procbridge's shared-memory path against pickling through a stock
ProcessPoolExecutor, in one run.

    .venv/bin/python scripts/shm_bench.py [--sizes 1,10,100] [--workers N] [--seconds S]

Each contender echoes the same random bytes (N MiB) through a worker process and back, one call at
a time; the figure is the median wall time of one round trip, starting and ending with the bytes in
the service's hands:

- `procbridge_shm`: what an HTTP call does with a large binary body. Lease a segment, copy the bytes
  in (standing for the socket read), call a task whose `memoryview` parameter sees the segment in
  place and whose result the worker writes into a second segment, copy the result out into a buffer
  allocated once (standing for the socket write, which sends straight from the segment), release.
- `procbridge_pipe`: the same pool with shared memory off (`shm_budget=0`): the bytes are pickled
  through the worker's socket both ways. Shown for reference.
- `stock_process_pool`: `loop.run_in_executor(ProcessPoolExecutor(N), echo, data)`, the bytes pickled
  through its pipes both ways.

Prints JSON, including `shm_speedup_<n>mib` = stock_process_pool / procbridge_shm for each size.

With `--http`, also the whole thing through the real server on loopback (`python -m service serve`,
a `POST` of the bytes as `application/octet-stream` to an echo task, the answer read back on a
kept-alive connection): `http_shm_<n>mib_ms` with shared memory, `http_pipe_<n>mib_ms` with
`--shm-budget 0`.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from workers import task
from workers.executor import CallOptions
from workers.local.pool import PoolOptions, WorkerPool
from workers.local.processes import stop_helper_processes

MIB = 1024 * 1024

# No task module to name: the pool's worker parent imports this script (as __mp_main__, the way
# multiprocessing gives children the main module), which registers `bench_echo` there.


@task
def bench_echo(data: memoryview) -> bytes:
    """Return the payload: a view of the request segment, written by the worker into a result segment."""
    return data  # type: ignore[return-value]


def echo_plain(data: bytes) -> bytes:
    """The stock executor's echo: the bytes it was sent (unpickled), pickled back."""
    return data


async def measure(round_trip: Callable[[], Awaitable[bytes]], data: bytes, seconds: float) -> float:
    """Median seconds of one round trip (after one checked warm-up), over at least 3 and up to 200
    calls, or as many as fit in about `seconds`."""
    result = await round_trip()
    if result != data:
        raise AssertionError("the echo came back different")
    del result
    times: list[float] = []
    spent = 0.0
    while len(times) < 3 or (spent < seconds and len(times) < 200):
        start = time.perf_counter()
        await round_trip()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
    return statistics.median(times)


async def procbridge(data: bytes, workers: int, seconds: float, shm: bool) -> float:
    pool = WorkerPool(PoolOptions(workers=workers, shm_budget=None if shm else 0))
    await pool.start()
    size = len(data)
    sink = bytearray(size)  # where the result is copied out to, as the socket write would
    out = memoryview(sink)

    async def via_shm() -> bytes:
        lease = await pool.payload_buffer(size)
        if lease is None:
            raise RuntimeError("no room in /dev/shm for the payload")
        try:
            lease.buffer[:size] = data  # the socket read, into the segment
            outcome = await pool.call("bench_echo", {"data": lease}, CallOptions(shared_result=True))
        finally:
            lease.release()
        result = outcome.value
        if isinstance(result, bytes):
            raise RuntimeError("the result did not come back through shared memory")
        try:
            out[:size] = result.view  # the socket write, from the segment
        finally:
            result.release()
        return sink  # type: ignore[return-value]  # compared with the input once, after the warm-up

    async def via_pipe() -> bytes:
        outcome = await pool.call("bench_echo", {"data": data})
        return bytes(outcome.value)

    try:
        return await measure(via_shm if shm else via_pipe, data, seconds)
    finally:
        await pool.aclose()


async def stock(data: bytes, workers: int, seconds: float) -> float:
    loop = asyncio.get_running_loop()
    with cf.ProcessPoolExecutor(workers) as executor:  # the platform's default start method (fork on Linux)
        await loop.run_in_executor(executor, echo_plain, b"warm-up")
        return await measure(lambda: loop.run_in_executor(executor, echo_plain, data), data, seconds)


def http_echo(sizes: list[float], seconds: float, shm: bool) -> dict[float, float]:
    """Median seconds of one HTTP echo round trip per size, through a real server on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    scripts = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCBRIDGE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(scripts.parent), str(scripts), env.get("PYTHONPATH")]))
    env["PROCBRIDGE_STORE"] = f"/tmp/shm_bench_{os.getpid()}.db"
    argv = [sys.executable, "-m", "service", "serve", "--port", str(port), "--tasks", "shm_bench",
            "--max-body", "200MiB", "--log-level", "warning", *([] if shm else ["--shm-budget", "0"])]
    server = subprocess.Popen(argv, cwd=scripts.parent, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        out: dict[float, float] = {}
        for mib in sizes:
            data = os.urandom(int(mib * MIB))

            def once(data: bytes = data) -> bytes:
                conn.request("POST", "/v1/tasks/bench_echo", body=data,
                             headers={"Content-Type": "application/octet-stream"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
                return body

            async def round_trip(once: Callable[[], bytes] = once) -> bytes:
                return once()

            out[mib] = asyncio.run(measure(round_trip, data, seconds))
        conn.close()
        return out
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(env["PROCBRIDGE_STORE"])


async def main(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {
        "cpus": len(os.sched_getaffinity(0)),
        "workers": args.workers,
        "python": sys.version.split()[0],
        "sizes_mib": [int(s) if s == int(s) else s for s in args.sizes],
    }
    for mib in args.sizes:
        data = os.urandom(int(mib * MIB))
        shm_s = await procbridge(data, args.workers, args.seconds, shm=True)
        pipe_s = await procbridge(data, args.workers, args.seconds, shm=False)
        stock_s = await stock(data, args.workers, args.seconds)
        key = f"{mib:g}mib"
        out[f"procbridge_shm_{key}_ms"] = round(shm_s * 1000, 3)
        out[f"procbridge_pipe_{key}_ms"] = round(pipe_s * 1000, 3)
        out[f"stock_process_pool_{key}_ms"] = round(stock_s * 1000, 3)
        out[f"shm_speedup_{key}"] = round(stock_s / shm_s, 2)
        out[f"shm_speedup_vs_own_pipe_{key}"] = round(pipe_s / shm_s, 2)
    return out


def add_http(out: dict[str, object], args: argparse.Namespace) -> None:
    for shm in (True, False):
        for mib, seconds in http_echo(args.sizes, args.seconds, shm).items():
            out[f"http_{'shm' if shm else 'pipe'}_{mib:g}mib_ms"] = round(seconds * 1000, 3)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 10.0, 100.0],
                        help="payload sizes in MiB, comma-separated [1,10,100]")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per contender and size [2]")
    parser.add_argument("--http", action="store_true", help="also measure through the real server on loopback")
    ns = parser.parse_args()
    result = uvloop.run(main(ns))
    stop_helper_processes()
    if ns.http:
        add_http(result, ns)
    print(json.dumps(result, indent=2))
