"""What open dashboards cost the event loop: the service's own CPU (its process only, not the workers),
with 0 and with N dashboards streaming snapshots, idle and under the bench's load.

    .venv/bin/python scripts/dashboard_cost.py [--dashboards 5] [--duration 8]

For each of (0, N) dashboards: N readers of /v1/dashboard/events (real HTTP streams, each reading every
snapshot), then (1) `--duration` seconds with no calls: the loop's CPU %, and (2) a closed-loop load of
`primes(limit=1)` calls (bench/loadtest.py, 16 connections, in its own process) for `--duration`
seconds: calls/s and the loop's CPU per call. The service runs `--workers 2 --access-log off`.
Prints a Markdown table (docs/benchmarks.md has the figures of a run).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, folder: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCBRIDGE_")}
    env["PROCBRIDGE_STORE"] = os.path.join(folder, "jobs.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--workers", "2", "--access-log", "off"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as reply:
                if reply.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the service did not become ready within 60 s")


class Dashboard(threading.Thread):
    """One open dashboard: reads the snapshot stream until stopped, counting snapshots."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.snapshots = 0
        self.stopped = False

    def run(self) -> None:
        self.conn.request("GET", "/v1/dashboard/events", headers={"Accept": "text/event-stream"})
        reply = self.conn.getresponse()
        while not self.stopped:
            line = reply.readline()
            if not line:
                return
            if line.startswith(b"event: snapshot"):
                self.snapshots += 1

    def stop(self) -> None:
        self.stopped = True
        self.conn.close()


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def measure(port: int, server: psutil.Process, dashboards: int, duration: float) -> dict[str, float]:
    readers = [Dashboard(port) for _ in range(dashboards)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 10
    while any(r.snapshots == 0 for r in readers) and time.monotonic() < deadline:  # each stream is open
        time.sleep(0.05)
    before, start = cpu_seconds(server), time.monotonic()
    time.sleep(duration)  # measuring an idle service: nothing to wait for but the clock
    idle_cpu = (cpu_seconds(server) - before) / (time.monotonic() - start)
    out = Path(tempfile.mkdtemp()) / "load.json"
    before = cpu_seconds(server)
    subprocess.run(
        [sys.executable, "-m", "bench.loadtest_cli", f"http://127.0.0.1:{port}", "--task", "primes",
         "--args", '{"limit": 1}', "--concurrency", "16", "--duration", str(duration), "--warmup", "1",
         "--json", str(out), "--quiet"],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )
    used = cpu_seconds(server) - before
    result = json.loads(out.read_text())
    completed = float(result["requests"]["answered"])  # the warm-up's too: its CPU is in `used` as well
    for reader in readers:
        reader.stop()
    snapshots = sum(r.snapshots for r in readers)
    return {"dashboards": dashboards, "idle_cpu_pct": 100 * idle_cpu, "calls_per_s": float(result["throughput_rps"]),
            "loop_us_per_call": 1e6 * used / completed if completed else float("nan"), "snapshots": snapshots}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dashboards", type=int, default=5)
    p.add_argument("--duration", type=float, default=8.0)
    ns = p.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        proc = start_server(port, folder)
        try:
            server = psutil.Process(proc.pid)
            rows = [measure(port, server, n, ns.duration) for n in (0, ns.dashboards)]
        finally:
            proc.terminate()
            proc.wait(30)
    print("| open dashboards | loop CPU, idle | calls/s under load | loop CPU per call | snapshots read |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['dashboards']:.0f} | {row['idle_cpu_pct']:.2f} % | {row['calls_per_s']:,.0f} | "
              f"{row['loop_us_per_call']:.1f} µs | {row['snapshots']:.0f} |")


if __name__ == "__main__":
    main()
