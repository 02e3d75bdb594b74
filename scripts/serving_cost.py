"""CPU per call of each serving-side process (the core and every serving process) under wrk.

    .venv/bin/python scripts/serving_cost.py --http-processes 2 [--workers 2] [--seconds 5]

Starts `python -m service serve --http-processes N --access-log off` on a free loopback port, loads
it with `wrk -t1 -c32` POSTing the no-op `primes {"limit": 1}`, and prints calls/s and, for each
process, its CPU time (utime + stime, from psutil) over the run divided by the calls wrk completed.
Needs `wrk` (Debian: apt-get install wrk). The figures in docs/architecture.md ("Several serving
processes") come from this script.
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
