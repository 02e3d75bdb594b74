"""The `batch_speedup` figure: adaptive batching (`@task(batch=Batch(...))`, workers/batching.py) against the
same task unbatched, on the real server, under the same closed-loop load.

The tasks are bench/apps/batching.py's: `score` (one model input per invocation) and `score_batch` (the
same model, calls gathered into batches of up to 32, waiting at most 5 ms). One procbridge server serves
both; `CLIENTS` (64) clients keep one call each in flight against one task, then the other, for the same
time (`bench.loadtest_cli`, in its own process, as every load of ./scripts/bench). Reported for each:
calls/s, p50 and p99 latency; then

- `batch_speedup` = calls/s batched / calls/s unbatched (goal ≥ 3);
- `batch_p99_bound_ms` = the unbatched p99 under the same 64 clients + max_wait_ms + one full batch's
  compute (32 inputs through the model, timed in the benchmark's own process with one BLAS thread, the
  median of several), and `batch_p99_ms` the batched p99 under the 64 clients; the goal:
  `batch_p99_excess_ms` = batch_p99_ms − batch_p99_bound_ms ≤ 0, i.e. batching adds no more than its wait
  and one batch's compute to the tail of the same load unbatched. (Not an absolute bound: in a closed loop
  of 64 clients the mean latency is 64 / throughput whatever the batching does (Little's law), so no p99 can
  be below that; a call that arrives while every worker runs a batch waits for one of them.)
- the single-client latency of both tasks (p50, p99): with nothing else arriving a lone call leaves after
  one loop turn (the early-leave rule), so batching should cost a lone caller next to nothing;
- the batches the server sent and their mean size (from /metrics, `procbridge_batches_total` and
  `procbridge_batched_calls_total`).

`scripts/batch_bench.py` runs this alone (a minute); ./scripts/bench runs it after the contenders and writes
the "Adaptive batching" section of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import re
import statistics
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

TASKS = "bench.apps.batching"
CLIENTS = 64
# --max-pending above the clients: the figure compares work done, not load shed (4 × workers would answer
# most unbatched calls 503 at once, since each is one pending call, where a batch of 32 is one)
SERVER_ARGS = ("--tasks", TASKS, "--max-pending", str(4 * CLIENTS))
HEADING = "## Adaptive batching (batch_speedup)"
RunLoads = Callable[[dict[str, Sequence[str]]], dict[str, dict[str, Any]]]


def sample_args() -> dict[str, Any]:
    """One call's arguments: a fixed input of 16 features."""
    return {"x": [round(0.1 * (i % 7) - 0.3, 2) for i in range(16)]}


def batch_compute_ms(repeat: int = 7) -> dict[str, float]:
    """Median milliseconds of the model on 1 input and on one full batch, in this process (one BLAS thread)."""
    import numpy as np

    from bench.apps import batching as app

    app.weights()  # built here (and BLAS limited to one thread) before timing
    out: dict[str, float] = {}
    for n, key in ((1, "one_call_ms"), (app.MAX_SIZE, "one_batch_ms")):
        inputs = np.asarray([sample_args()["x"]] * n, dtype=np.float32)
        app.forward(inputs)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            app.forward(inputs)
            times.append((time.perf_counter() - start) * 1000)
        out[key] = round(statistics.median(times), 3)
    return out


def batch_counts(url: str) -> dict[str, float]:
    """Batches of `score_batch` sent so far and the calls in them, from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for name in ("procbridge_batches_total", "procbridge_batched_calls_total"):
        m = re.search(rf'^{name}{{task="score_batch"}} ([0-9.e+]+)$', text, re.MULTILINE)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    lat = run.get("latency_ms") or {}
    return {"calls_per_s": run.get("throughput_rps"), "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"),
            "ok": (run.get("requests") or {}).get("ok"), "statuses": run.get("status_counts"),
            "client_saturated": (run.get("client_cpu") or {}).get("saturated"),
            "other_processes_cores": run.get("other_processes_cores")}


def measure(url: str, run_loads: RunLoads, duration: float, warmup: float, short: float) -> dict[str, Any]:
    """Both tasks under CLIENTS clients for `duration` s each (after `warmup`), then each with one client for
    `short` s; `run_loads` runs bench.loadtest_cli loads against the server at `url` (Bench.run_loads)."""
    from bench.apps import batching as app

    args = json.dumps(sample_args())
    out: dict[str, Any] = {"clients": CLIENTS, "max_size": app.MAX_SIZE, "max_wait_ms": app.MAX_WAIT_MS,
                           "model": f"16 -> {app.WIDTH} -> {app.WIDTH} -> {app.WIDTH} -> 1, float32",
                           "compute": batch_compute_ms()}
    runs: dict[str, dict[str, Any]] = {}
    for label, task, clients, seconds in (
        ("unbatched", "score", CLIENTS, duration), ("batched", "score_batch", CLIENTS, duration),
        ("unbatched_1_client", "score", 1, short), ("batched_1_client", "score_batch", 1, short),
    ):
        before = batch_counts(url) if task == "score_batch" else None
        load = ["--task", task, "--args", args, "--concurrency", str(clients), "--duration", f"{seconds:g}",
                "--warmup", f"{warmup:g}"]
        runs[label] = _summary(run_loads({f"batching-{label.replace('_', '-')}": load})
                               [f"batching-{label.replace('_', '-')}"])
        if before is not None:
            after = batch_counts(url)
            sent = after["procbridge_batches_total"] - before["procbridge_batches_total"]
            calls = after["procbridge_batched_calls_total"] - before["procbridge_batched_calls_total"]
            runs[label]["batches"] = int(sent)
            runs[label]["mean_batch_size"] = round(calls / sent, 2) if sent else None
    out["runs"] = runs
    out.update(figures(out))
    return out


def figures(b: dict[str, Any]) -> dict[str, float | None]:
    runs = b["runs"]
    fast, slow = runs["batched"].get("calls_per_s"), runs["unbatched"].get("calls_per_s")
    p99, plain = runs["batched"].get("p99_ms"), runs["unbatched"].get("p99_ms")
    bound = None if plain is None else round(plain + b["max_wait_ms"] + b["compute"]["one_batch_ms"], 3)
    return {
        "batch_speedup": round(fast / slow, 3) if fast and slow else None,
        "batch_p99_ms": p99,
        "batch_p99_bound_ms": bound,
        "batch_p99_excess_ms": round(p99 - bound, 3) if p99 is not None and bound is not None else None,
    }


def _ms(v: Any) -> str:
    return "—" if v is None else f"{v:,.1f}"


def section(b: dict[str, Any] | None) -> list[str]:
    """The report's "Adaptive batching" section (Markdown lines)."""
    lines = [HEADING, ""]
    if not b or "runs" not in b:
        reason = (b or {}).get("reason", "skipped")
        return [*lines, f"Not measured: {reason}.", ""]
    runs, comp = b["runs"], b["compute"]
    lines += [
        f"The same model scored one input per invocation (`score`) and with `@task(batch=Batch(max_size="
        f"{b['max_size']}, max_wait_ms={b['max_wait_ms']:g}))` (`score_batch`), {b['clients']} clients in closed "
        f"loop (bench/batch.py, tasks in bench/apps/batching.py: a {b['model']} network, so one input streams "
        f"every weight from memory while a batch reads them once). In the benchmark's own process, one input takes "
        f"{comp['one_call_ms']:.2f} ms and a batch of {b['max_size']} {comp['one_batch_ms']:.2f} ms.",
        "",
        "| run | clients | calls/s | p50 ms | p99 ms | batches | mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"unbatched": "`score` (unbatched)", "batched": "`score_batch` (batched)",
             "unbatched_1_client": "`score`, one client", "batched_1_client": "`score_batch`, one client"}
    for label, name in names.items():
        r = runs[label]
        lines.append(f"| {name} | {b['clients'] if 'client' not in label else 1} | {_ms(r.get('calls_per_s'))} | "
                     f"{_ms(r.get('p50_ms'))} | {_ms(r.get('p99_ms'))} | {r.get('batches', '—')} | "
                     f"{r.get('mean_batch_size') or '—'} |")
    speed = b.get("batch_speedup")
    lines += [
        "",
        f"**batch_speedup: {speed if speed is not None else '—'}×** (goal ≥ 3). Batched p99 under {b['clients']} "
        f"clients: {_ms(b.get('batch_p99_ms'))} ms, against the unbatched p99 under the same load "
        f"({_ms(runs['unbatched'].get('p99_ms'))} ms) + max_wait ({b['max_wait_ms']:g} ms) + one batch's compute "
        f"({comp['one_batch_ms']:.2f} ms) = {_ms(b.get('batch_p99_bound_ms'))} ms (goal: no more). In a closed loop "
        f"the mean latency is {b['clients']} / calls/s whatever the batching (Little's law), so the bound is "
        "relative to the same load unbatched; the one-client rows show what batching costs a lone caller.",
        "",
        "Policy (workers/batching.py): a batch leaves with max_size calls, or max_wait_ms after its first call, or "
        "earlier when a lane is free and no call arrived in the last loop turn (a lone caller waits one loop "
        "turn, not max_wait: compare the one-client rows). Run alone: `.venv/bin/python scripts/batch_bench.py`.",
        "",
    ]
    return lines
