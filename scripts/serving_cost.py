"""CPU per call of each serving-side process (the core and every serving process) under wrk.

    .venv/bin/python scripts/serving_cost.py --http-processes 2 [--workers 2] [--seconds 5]
    .venv/bin/python scripts/serving_cost.py --bare [--rounds 2] [-- SERVER FLAGS]

Starts `python -m service serve --http-processes N --access-log off` on a free loopback port, loads
it with `wrk -t1 -c32` POSTing the no-op `primes {"limit": 1}`, and prints calls/s and, for each
process, its CPU time (utime + stime, from psutil) over the run divided by the calls wrk completed.
With `--bare`: in the same run, a bare aiohttp app's JSON GET (one handler, uvloop, no access log:
the ceiling any aiohttp service has on this machine) against procbridge's no-op call and /healthz,
alternating, each with its calls/s and the CPU its process spent per request; the ratio no-op / bare
is issue 21's "≥ 0.6 of a bare aiohttp GET". Needs `wrk` (Debian: apt-get install wrk). The figures
in docs/architecture.md ("Where the loop's time goes", "Several serving processes") come from it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
POST_LUA = 'wrk.method = "POST"\nwrk.body = \'{"limit": 1}\'\nwrk.headers["Content-Type"] = "application/json"\n'


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--http-processes", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--bare", action="store_true", help="compare with a bare aiohttp GET in the same run")
    p.add_argument("--rounds", type=int, default=2, help="with --bare: alternating rounds")
    p.add_argument("server_flags", nargs="*", help="more `serve` flags (after --), e.g. --access-log off")
    ns = p.parse_args()
    if shutil.which("wrk") is None:
        print("serving_cost: needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        lua = Path(tmp) / "post.lua"
        lua.write_text(POST_LUA)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROCBRIDGE_")}
        if ns.bare:
            return against_bare(Path(tmp), lua, env, ns)
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--workers", str(ns.workers), "--http-processes",
             str(ns.http_processes), "--port", str(port), "--access-log", "off", "--max-pending", "256",
             "--store", f"{tmp}/jobs.db"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            return measure(server, port, lua, ns.seconds, ns.http_processes)
        finally:
            server.terminate()
            server.wait(60)


BARE_APP = """
import asyncio, sys, orjson, uvloop
from aiohttp import web
async def healthz(request):
    return web.Response(body=orjson.dumps({"status": "ok"}), content_type="application/json")
app = web.Application()
app.router.add_get("/healthz", healthz)
async def main():
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1]), backlog=1024).start()
    await asyncio.Event().wait()
uvloop.run(main())
"""


def against_bare(tmp: Path, lua: Path, env: dict[str, str], ns: argparse.Namespace) -> int:
    (tmp / "bare.py").write_text(BARE_APP)
    bare_port, port = free_port(), free_port()
    bare = subprocess.Popen([sys.executable, str(tmp / "bare.py"), str(bare_port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--workers", str(ns.workers), "--port", str(port),
         "--max-pending", "256", "--store", f"{tmp}/jobs.db", *ns.server_flags],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        if not (ready(bare, f"http://127.0.0.1:{bare_port}/healthz") and ready(server, f"http://127.0.0.1:{port}/readyz")):
            print("serving_cost: a server did not get ready", file=sys.stderr)
            return 1
        for round_ in range(1, ns.rounds + 1):
            b_rate, b_cpu = load(bare, f"http://127.0.0.1:{bare_port}/healthz", None, ns.seconds)
            n_rate, n_cpu = load(server, f"http://127.0.0.1:{port}/v1/tasks/primes", lua, ns.seconds)
            h_rate, h_cpu = load(server, f"http://127.0.0.1:{port}/healthz", None, ns.seconds)
            print(f"round {round_}: bare GET {b_rate:,.0f}/s ({b_cpu:.1f} µs CPU each); no-op call {n_rate:,.0f}/s "
                  f"({n_cpu:.1f} µs); /healthz {h_rate:,.0f}/s ({h_cpu:.1f} µs); no-op / bare: "
                  f"{n_rate / b_rate:.2f} by calls/s, {b_cpu / n_cpu:.2f} by CPU per request")
        return 0
    finally:
        for proc in (bare, server):
            proc.terminate()
            proc.wait(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready(proc: subprocess.Popen[bytes], url: str) -> bool:
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                return True
        except OSError:
            time.sleep(0.1)
    return False


def load(proc: subprocess.Popen[bytes], url: str, lua: Path | None, seconds: int) -> tuple[float, float]:
    """wrk -t1 -c32 on `url` (POST the no-op with `lua`): calls/s, and µs of `proc`'s CPU per request."""
    process = psutil.Process(proc.pid)
    before = sum(process.cpu_times()[:2])
    script = ["-s", str(lua)] if lua is not None else []
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{seconds}s", *script, url],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+) requests in", out)
    assert match is not None, out
    calls = int(match.group(1))
    return calls / seconds, 1e6 * (sum(process.cpu_times()[:2]) - before) / calls


def measure(server: subprocess.Popen[bytes], port: int, lua: Path, seconds: int, count: int) -> int:
    deadline = time.monotonic() + 60
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                print("serving_cost: the server did not get ready", file=sys.stderr)
                return 1
            time.sleep(0.1)
    core = psutil.Process(server.pid)
    fronts = [k for k in core.children() if "service.front" in " ".join(k.cmdline())]
    procs = {"core" if count > 1 else "server": core, **{f"serving{i + 1}": f for i, f in enumerate(fronts)}}

    def cpu(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    before = {name: cpu(proc) for name, proc in procs.items()}
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "-s", str(lua), f"http://127.0.0.1:{port}/v1/tasks/primes"],
        capture_output=True, text=True, check=True,
    ).stdout
    after = {name: cpu(proc) for name, proc in procs.items()}
    match = re.search(r"(\d+) requests in", out)
    assert match is not None, out
    calls = int(match.group(1))
    costs = ", ".join(f"{name} {1e6 * (after[name] - before[name]) / calls:.1f} µs/call" for name in procs)
    print(f"--http-processes {count}: {calls / seconds:,.0f} calls/s; CPU per call (of all calls): {costs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
