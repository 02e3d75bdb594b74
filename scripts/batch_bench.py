"""The `batch_speedup` figure alone: adaptive batching against the same task unbatched (bench/batch.py).

    .venv/bin/python scripts/batch_bench.py [--workers N] [--duration 8] [--warmup 1] [--json OUT]

Starts procbridge (`python -m service serve --tasks bench.apps.batching`) on a free loopback port, runs
64 clients in closed loop against `score` and then `score_batch` (bench.loadtest_cli, its own process),
then one client against each, prints the figures (calls/s, p50/p99, the speedup, the p99 bound) with the
machine's load average before and after, and writes them as JSON with --json. ./scripts/bench runs the
same measurement (shorter) into docs/benchmarks.md. Needs the dev lock (hdrhistogram): ./scripts/bench
installs it, or .venv/bin/pip install -r requirements-dev.lock.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import batch  # noqa: E402
from bench.run import PLANS, Bench, busy_cores, make_server  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(prog="scripts/batch_bench.py", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="worker processes [CPUs]")
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per 64-client run [8]")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring, per run [1]")
    p.add_argument("--short", type=float, default=3.0, help="seconds measured per one-client run [3]")
    p.add_argument("--json", type=Path, help="write the figures here")
    ns = p.parse_args()
    load_before = os.getloadavg()
    busy_before = busy_cores()
    with tempfile.TemporaryDirectory(prefix="procbridge-batch-bench-") as tmp:
        bench = Bench(PLANS["quick"], ns.workers, Path(tmp), quiet=True)
        server = make_server("procbridge", ns.workers, Path(tmp), batch.SERVER_ARGS)
        server.start()
        try:
            out = batch.measure(server.url, lambda loads: bench.run_loads(server, loads), ns.duration, ns.warmup,
                                ns.short)
        finally:
            server.stop()
    out["workers"] = ns.workers
    out["cpus_usable"] = len(os.sched_getaffinity(0))
    out["load_average_before"] = [round(x, 2) for x in load_before]
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    out["busy_cores_before"] = round(busy_before, 2)
    print("\n".join(batch.section(out)))
    print(f"workers {ns.workers}, {out['cpus_usable']} usable CPUs; load average before {out['load_average_before']}, "
          f"after {out['load_average_after']}; busy cores before {out['busy_cores_before']}")
    for label, r in out["runs"].items():
        print(f"  {label}: other processes took {r.get('other_processes_cores')} cores; statuses {r.get('statuses')}")
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
