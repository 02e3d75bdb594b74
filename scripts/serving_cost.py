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
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
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
    with tempfile.TemporaryDirectory() as tmp:
        lua = Path(tmp) / "post.lua"
        lua.write_text(POST_LUA)
        if ns.bare:
            return against_bare(Path(tmp), lua, ns)
        return per_process(Path(tmp), lua, ns)


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


def per_process(tmp: Path, lua: Path, ns: argparse.Namespace) -> int:
    """The no-op under wrk, and the CPU each serving-side process spent per call."""
    port = free_port()
    flags = ["--http-processes", str(ns.http_processes), "--access-log", "off", *ns.server_flags]
    with running(serve_command(tmp, port, ns.workers, flags)) as server:
        if not ready(server, f"http://127.0.0.1:{port}/readyz"):
            print("serving_cost: the server did not get ready", file=sys.stderr)
            return 1
        core = psutil.Process(server.pid)
        fronts = [k for k in core.children() if "service.front" in " ".join(k.cmdline())]
        procs = {"core" if ns.http_processes > 1 else "server": core,
                 **{f"serving{i + 1}": f for i, f in enumerate(fronts)}}
        rate, costs = load(procs, f"http://127.0.0.1:{port}/v1/tasks/primes", lua, ns.seconds)
    shown = ", ".join(f"{name} {cost:.1f} µs/call" for name, cost in costs.items())
    print(f"--http-processes {ns.http_processes}: {rate:,.0f} calls/s; CPU per call (of all calls): {shown}")
    return 0


def against_bare(tmp: Path, lua: Path, ns: argparse.Namespace) -> int:
    """The bare app's GET, procbridge's no-op and its /healthz, alternating, `ns.rounds` times."""
    (tmp / "bare.py").write_text(BARE_APP)
    bare_port, port = free_port(), free_port()
    with (running([sys.executable, str(tmp / "bare.py"), str(bare_port)]) as bare,
          running(serve_command(tmp, port, ns.workers, ns.server_flags)) as server):
        if not (ready(bare, f"http://127.0.0.1:{bare_port}/healthz") and ready(server, f"http://127.0.0.1:{port}/readyz")):
            print("serving_cost: a server did not get ready", file=sys.stderr)
            return 1
        bare_proc, server_proc = {"bare": psutil.Process(bare.pid)}, {"server": psutil.Process(server.pid)}
        for round_ in range(1, ns.rounds + 1):
            b_rate, b_cpu = load(bare_proc, f"http://127.0.0.1:{bare_port}/healthz", None, ns.seconds)
            n_rate, n_cpu = load(server_proc, f"http://127.0.0.1:{port}/v1/tasks/primes", lua, ns.seconds)
            h_rate, h_cpu = load(server_proc, f"http://127.0.0.1:{port}/healthz", None, ns.seconds)
            b, n, h = b_cpu["bare"], n_cpu["server"], h_cpu["server"]
            print(f"round {round_}: bare GET {b_rate:,.0f}/s ({b:.1f} µs CPU each); no-op call {n_rate:,.0f}/s "
                  f"({n:.1f} µs); /healthz {h_rate:,.0f}/s ({h:.1f} µs); no-op / bare: "
                  f"{n_rate / b_rate:.2f} by calls/s, {b / n:.2f} by CPU per request")
    return 0


def serve_command(tmp: Path, port: int, workers: int, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "service", "serve", "--workers", str(workers), "--port", str(port),
            "--max-pending", "256", "--store", f"{tmp}/jobs-{port}.db", *flags]


@contextlib.contextmanager
def running(command: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """`command` started from the checkout (no PROCBRIDGE_ variable of the caller's), stopped at the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCBRIDGE_")}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
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


def load(procs: dict[str, psutil.Process], url: str, lua: Path | None, seconds: int) -> tuple[float, dict[str, float]]:
    """wrk -t1 -c32 on `url` (POSTing the no-op with `lua`): calls/s, and µs of each process's CPU
    (user + system) per call wrk completed."""

    def cpu() -> dict[str, float]:
        return {name: sum(proc.cpu_times()[:2]) for name, proc in procs.items()}

    before = cpu()
    script = ["-s", str(lua)] if lua is not None else []
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{seconds}s", *script, url],
                         capture_output=True, text=True, check=True).stdout
    after = cpu()
    match = re.search(r"(\d+) requests in", out)
    assert match is not None, out
    calls = int(match.group(1))
    return calls / seconds, {name: 1e6 * (after[name] - before[name]) / calls for name in procs}


if __name__ == "__main__":
    sys.exit(main())
