"""A load generator for procbridge (or any HTTP endpoint): open or closed loop, HDR latencies.

    procbridge loadtest URL [--task NAME --args JSON | --path P --method M --body-file F | --scenario S]
                            [--rate R | --concurrency N] [--duration S] [--requests N] [--warmup S]
                            [--json FILE] [--plots PREFIX]

Modes:
- open loop (`--rate R`): request i is due at t0 + i/R and is sent then, whether or not earlier ones
  have returned. Its latency runs from that due time, not from when it actually left, so a slow
  server (or a client that falls behind) shows up in the latencies instead of silently lowering the
  load (no coordinated omission). Requests waiting for a free connection wait on the clock too.
- closed loop (`--concurrency N`): N clients, each sending its next request when the last returned.
  Latency runs from the send; this measures the throughput a fixed number of callers get.

Every run is bounded: it stops sending at `--warmup + --duration` seconds or after `--requests`
requests, whichever comes first, then waits at most `--timeout` seconds for what is in flight.
Requests still unanswered then are counted as `unfinished` and recorded with their age (a lower
bound of their latency).

Outcomes: `ok` (2xx/3xx), `overloaded` (503 with the problem slug `overloaded`: the server's
admission control refused it, kept apart from errors) and `errors` (every other status, and client
errors such as timeouts or refused connections). `latency_ms` is over the ok responses, and
`latency_ms_all` over every response. Requests started during `--warmup` are not counted.

The generator is one process with one uvloop event loop and aiohttp's client (keep-alive, a
connection pool). It reports its own CPU use and warns when it used most of a core, because then
the figures measure the client as much as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

DEV_HINT = (
    "procbridge loadtest needs the bench tools from the dev lock: "
    ".venv/bin/pip install -r requirements-dev.lock (./scripts/test and ./scripts/bench install it)"
)

# Percentiles reported by name, and the points of the percentile curve (JSON and plots).
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
CURVE_POINTS = (
    0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 75.0, 80.0, 85.0, 90.0, 92.5, 95.0, 96.0, 97.0, 97.5,
    98.0, 98.5, 99.0, 99.25, 99.5, 99.6, 99.7, 99.8, 99.9, 99.95, 99.99, 99.999, 100.0,
)
SATURATED_CORE = 0.90  # the generator's CPU use (fraction of one core) at which it warns
OTHERS_WARN = 0.25  # with --server-pid: warn when processes other than client and server used this many cores
LAG_WARN_MS = 5.0  # open loop: warn when the p99 of (actual send - due time) passes this

OK, OVERLOADED, ERROR, UNFINISHED = 0, 1, 2, 3
_HIGHEST_US = 3_600_000_000  # an hour, in microseconds: the histograms' range


class UsageError(ValueError):
    """A bad command line or scenario."""


@dataclass
class RequestSpec:
    """One kind of request of a scenario."""

    name: str
    method: str
    url: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0


@dataclass
class Options:
    url: str
    specs: list[RequestSpec]
    rate: float | None = None  # open loop when set
    concurrency: int = 8  # closed loop
    duration: float = 10.0
    requests: int | None = None
    warmup: float = 0.0
    timeout: float = 30.0
    connections: int | None = None
    seed: int = 1
    progress: bool = True
    progress_interval: float = 1.0
    server_pids: tuple[int, ...] = ()  # local server processes whose CPU use (with their children) to report

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"


# -- scenarios ------------------------------------------------------------------------------------


def _join(base: str, path: str) -> str:
    if path.startswith(("http://", "https://")):
        return path
    return base.rstrip("/") + "/" + path.lstrip("/")


def _spec_from_dict(base: str, item: dict[str, Any], index: int, root: Path) -> RequestSpec:
    known = {"name", "task", "args", "method", "path", "json", "body", "body_file", "content_type", "headers",
             "weight"}
    unknown = set(item) - known
    if unknown:
        raise UsageError(f"scenario entry {index}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    headers = {str(k): str(v) for k, v in (item.get("headers") or {}).items()}
    body: bytes | None = None
    if "task" in item:
        task = str(item["task"])
        method = str(item.get("method", "POST")).upper()
        path = f"/v1/tasks/{task}"
        if "path" in item:
            raise UsageError(f"scenario entry {index}: give either 'task' or 'path'")
        default_name = task
    else:
        method = str(item.get("method", "GET")).upper()
        path = str(item.get("path", ""))
        default_name = f"{method} {path or '/'}"
    sources = [k for k in ("args", "json", "body", "body_file") if k in item]
    if len(sources) > 1:
        raise UsageError(f"scenario entry {index}: give at most one of {sources}")
    if sources:
        src = sources[0]
        if src in ("args", "json"):
            body = json.dumps(item[src]).encode()
            headers.setdefault("Content-Type", "application/json")
        elif src == "body":
            body = str(item["body"]).encode()
        else:
            file = Path(str(item["body_file"]))
            body = (file if file.is_absolute() else root / file).read_bytes()
            headers.setdefault("Content-Type", "application/octet-stream")
    elif "task" in item:
        body = b"{}"
        headers.setdefault("Content-Type", "application/json")
    if "content_type" in item:
        headers["Content-Type"] = str(item["content_type"])
    weight = float(item.get("weight", 1.0))
    if not (weight > 0 and math.isfinite(weight)):
        raise UsageError(f"scenario entry {index}: weight must be > 0")
    return RequestSpec(str(item.get("name", default_name)), method, _join(base, path), body, headers, weight)


def load_scenario(base: str, text_or_path: str) -> list[RequestSpec]:
    """A scenario: a JSON list of entries (or {"requests": [...]}), inline or in a file.

    An entry is {"task": NAME, "args": {...}} (POST /v1/tasks/NAME) or {"method", "path", and one of
    "json", "body", "body_file"}, with optional "name", "headers", "content_type" and "weight".
    """
    stripped = text_or_path.lstrip()
    root = Path.cwd()
    if stripped.startswith(("[", "{")):
        data = json.loads(stripped)
    else:
        file = Path(text_or_path)
        data = json.loads(file.read_text())
        root = file.resolve().parent
    if isinstance(data, dict):
        data = data.get("requests")
    if not isinstance(data, list) or not data or not all(isinstance(x, dict) for x in data):
        raise UsageError("a scenario is a non-empty JSON list of objects (or {\"requests\": [...]})")
    specs = [_spec_from_dict(base, item, i, root) for i, item in enumerate(data)]
    names = [s.name for s in specs]
    for i, spec in enumerate(specs):  # make names unique: they key the per-request results
        if names.count(spec.name) > 1:
            spec.name = f"{spec.name}#{i}"
    return specs


# -- recording ------------------------------------------------------------------------------------


def _histogram() -> Any:
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(1, _HIGHEST_US, 3)


def _record(hist: Any, seconds: float) -> None:
    hist.record_value(min(max(1, round(seconds * 1e6)), _HIGHEST_US))


def summarize(hist: Any) -> dict[str, Any]:
    """p50/p90/p99/p99.9/max/mean in milliseconds, the count, and the percentile curve."""
    count = hist.get_total_count()
    if not count:
        return {"count": 0}
    out: dict[str, Any] = {"count": count}
    values = hist.get_percentile_to_value_dict(list(PERCENTILES))
    for p in PERCENTILES:
        out[f"p{p:g}"] = values[p] / 1000.0
    out["max"] = hist.get_max_value() / 1000.0
    out["min"] = hist.get_min_value() / 1000.0
    out["mean"] = round(hist.get_mean_value() / 1000.0, 3)
    inner = CURVE_POINTS[1:-1]
    curve = hist.get_percentile_to_value_dict(list(inner))
    out["curve"] = [[0.0, out["min"]], *([p, curve[p] / 1000.0] for p in inner), [100.0, out["max"]]]
    return out


class _PerSpec:
    __slots__ = ("hist", "slugs", "statuses", "tally")

    def __init__(self) -> None:
        self.hist = _histogram()
        self.statuses: Counter[str] = Counter()
        self.slugs: Counter[str] = Counter()
        self.tally = [0, 0, 0, 0]  # ok, overloaded, errors, unfinished


class Recorder:
    """Everything measured in one run. Times are time.perf_counter() seconds."""

    def __init__(self, specs: Sequence[RequestSpec], t0: float, measure_from: float) -> None:
        self.t0 = t0
        self.measure_from = measure_from
        self.window_end = math.inf
        self.ok_hist = _histogram()
        self.all_hist = _histogram()
        self.lag_hist = _histogram()
        self.interval_hist = _histogram()  # ok latencies since the last progress line
        self.per_spec = [_PerSpec() for _ in specs]
        self.statuses: Counter[str] = Counter()
        self.slugs: Counter[str] = Counter()
        self.client_errors: Counter[str] = Counter()
        self.tally = [0, 0, 0, 0]
        self.sent = 0
        self.done = 0
        self.warmup_done = 0
        self.answered = 0  # measured requests that got an HTTP status
        # one entry per finished request (warm-up included), for the timeline
        self.ends = array("d")
        self.latencies = array("d")
        self.kinds = array("b")
        self.ok_ends = array("d")  # completion times of ok responses, for the throughput window

    def record(
        self, spec_index: int, due: float, sent: float, end: float, status: int, slug: str | None,
        error: str | None, kind: int,
    ) -> None:
        # From the due time (open loop: a late send counts against the server's answer); the loop's
        # timers are coarse, so a request may leave up to a millisecond early: then from its send.
        latency = end - min(due, sent)
        self.done += 1
        self.ends.append(end - self.t0)
        self.latencies.append(latency * 1000.0)
        self.kinds.append(kind)
        if due < self.measure_from:
            self.warmup_done += 1
            return
        if kind == OK:
            self.ok_ends.append(end)
        per = self.per_spec[spec_index]
        self.tally[kind] += 1
        per.tally[kind] += 1
        key = str(status) if status else ("unfinished" if kind == UNFINISHED else "error")
        if status:
            self.answered += 1
        self.statuses[key] += 1
        per.statuses[key] += 1
        if slug:
            self.slugs[slug] += 1
            per.slugs[slug] += 1
        if error:
            self.client_errors[error] += 1
        if sent > due:
            _record(self.lag_hist, sent - due)
        if status:
            _record(self.all_hist, latency)
        if kind == OK:
            _record(self.ok_hist, latency)
            _record(per.hist, latency)
            _record(self.interval_hist, latency)
        elif kind == UNFINISHED:
            _record(self.all_hist, latency)  # a lower bound: they had not returned at the cut-off


# -- the run --------------------------------------------------------------------------------------


def _classify(status: int, body: bytes, content_type: str) -> tuple[int, str | None]:
    slug = None
    if status >= 400 and content_type.startswith("application/problem+json"):
        try:
            problem = json.loads(body)
            slug = str(problem.get("type", "")).rsplit("/", 1)[-1] or None
        except (ValueError, AttributeError):
            slug = None
    if status < 400:
        return OK, slug
    if status == 503 and slug == "overloaded":
        return OVERLOADED, slug
    return ERROR, slug


class LoadTest:
    def __init__(self, options: Options) -> None:
        self.o = options
        self.rng = random.Random(options.seed)
        self.cum_weights: list[float] = []
        total = 0.0
        for spec in options.specs:
            total += spec.weight
            self.cum_weights.append(total)
        self.recorder: Recorder | None = None
        self.inflight: dict[asyncio.Task[None], tuple[float, int]] = {}  # task -> (due time, spec index)
        self.stopped_by = ""
        self.cpu_window: dict[str, float] = {}
        self.server_cpu: dict[str, dict[int, float]] = {}
        self.cut_off = False
        self._session: Any = None
        self._last_line = 0.0
        self._last_done = 0
        self._last_cpu = 0.0
        self._tty = sys.stderr.isatty()

    def _pick(self) -> int:
        if len(self.o.specs) == 1:
            return 0
        return self.rng.choices(range(len(self.o.specs)), cum_weights=self.cum_weights)[0]

    async def _one(self, index: int, due: float) -> None:
        spec = self.o.specs[index]
        rec = self.recorder
        assert rec is not None
        sent = time.perf_counter()
        status, slug, error, kind = 0, None, None, ERROR
        try:
            async with self._session.request(spec.method, spec.url, data=spec.body, headers=spec.headers) as resp:
                body = await resp.read()
                status = resp.status
                kind, slug = _classify(status, body, resp.headers.get("Content-Type", ""))
        except TimeoutError:
            error = "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            error = type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - anything else fails this request only, counted by its type
            error = type(exc).__name__
        if self.cut_off:
            return
        rec.record(index, due, sent, time.perf_counter(), status, slug, error, kind)

    def _spawn(self, due: float) -> None:
        index = self._pick()
        task = asyncio.get_running_loop().create_task(self._one(index, due))
        self.inflight[task] = (due, index)
        task.add_done_callback(self._forget)
        assert self.recorder is not None
        self.recorder.sent += 1

    def _forget(self, task: asyncio.Task[None]) -> None:
        self.inflight.pop(task, None)

    async def _open_loop(self, t0: float, stop_at: float, limit: int) -> None:
        assert self.o.rate is not None
        interval = 1.0 / self.o.rate
        i = 0
        while i < limit:
            due = t0 + i * interval
            if due >= stop_at:
                self.stopped_by = "duration"
                return
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            self._spawn(due)
            i += 1
            if i % 64 == 0:
                await asyncio.sleep(0)  # a generator far behind still lets responses in
        self.stopped_by = "requests"

    async def _closed_loop(self, stop_at: float, limit: int) -> None:
        budget = [limit]

        async def client() -> None:
            while budget[0] > 0 and time.perf_counter() < stop_at:
                budget[0] -= 1
                assert self.recorder is not None
                self.recorder.sent += 1
                now = time.perf_counter()
                await self._one(self._pick(), now)

        await asyncio.gather(*(client() for _ in range(self.o.concurrency)))
        self.stopped_by = "requests" if budget[0] <= 0 else "duration"

    def _progress(self, final: bool = False) -> None:
        rec = self.recorder
        if rec is None or not self.o.progress:
            return
        now = time.perf_counter()
        cpu = _cpu_seconds()
        span = max(now - self._last_line, 1e-9)
        rps = (rec.done - self._last_done) / span
        core = (cpu - self._last_cpu) / span
        p99 = rec.interval_hist.get_value_at_percentile(99) / 1000.0 if rec.interval_hist.get_total_count() else 0.0
        rec.interval_hist.reset()
        self._last_line, self._last_done, self._last_cpu = now, rec.done, cpu
        phase = "warm-up " if now < rec.measure_from else ""
        line = (
            f"{phase}{now - rec.t0:6.1f}s sent {rec.sent} done {rec.done} ok {rec.tally[OK]} "
            f"overloaded {rec.tally[OVERLOADED]} errors {rec.tally[ERROR]} in-flight {len(self.inflight)} "
            f"| {rps:,.0f} resp/s p99 {p99:.1f} ms | client cpu {100 * core:.0f}%"
        )
        if self._tty:
            sys.stderr.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.o.progress_interval)
            self._progress()

    async def run(self) -> dict[str, Any]:
        o = self.o
        conns = o.connections or (o.concurrency if o.mode == "closed" else 256)
        connector = aiohttp.TCPConnector(limit=conns, limit_per_host=conns, force_close=False)
        timeout = aiohttp.ClientTimeout(total=o.timeout)
        limit = o.requests if o.requests is not None else sys.maxsize
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
            self._session = session
            t0 = time.perf_counter()
            self.recorder = rec = Recorder(o.specs, t0, t0 + o.warmup)
            stop_at = t0 + o.warmup + o.duration
            self._last_line, self._last_cpu = t0, _cpu_seconds()
            ticker = asyncio.ensure_future(self._ticker()) if o.progress else None
            cpu_mark = asyncio.get_running_loop().call_at(
                asyncio.get_running_loop().time() + o.warmup, self._mark_cpu, "start"
            ) if o.warmup > 0 else None
            if o.warmup <= 0:
                self._mark_cpu("start")
            try:
                if o.mode == "open":
                    await self._open_loop(t0, stop_at, limit)
                else:
                    await self._closed_loop(stop_at, limit)
                send_end = time.perf_counter()
                if "start" not in self.cpu_window:  # the count ran out during the warm-up
                    self._mark_cpu("start")
                self._mark_cpu("end")
                pending = set(self.inflight)
                if pending:
                    await asyncio.wait(pending, timeout=o.timeout)
                last = time.perf_counter()
                self.cut_off = True  # from here on, only the loop below records: each request once
                cancelled = []
                for task, (due, index) in list(self.inflight.items()):
                    task.remove_done_callback(self._forget)
                    self.inflight.pop(task, None)
                    if task.done():  # it recorded its outcome; only its done-callback had not run yet
                        continue
                    task.cancel()
                    cancelled.append(task)
                    if due >= rec.measure_from:
                        rec.record(index, due, due, last, 0, None, None, UNFINISHED)
                await asyncio.gather(*cancelled, return_exceptions=True)
                if self.stopped_by == "requests":  # the window runs to the last answer
                    self._mark_cpu("end")
            finally:
                if cpu_mark is not None:
                    cpu_mark.cancel()
                if ticker is not None:
                    ticker.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ticker
            self._progress(final=True)
        # Throughput over the measurement window: up to the planned end when the duration ran out,
        # or up to the last response when the request count did.
        end = stop_at if self.stopped_by == "duration" else max(send_end, max(rec.ok_ends, default=send_end))
        rec.window_end = end
        return self._result(rec, max(end - rec.measure_from, 1e-9))

    def _mark_cpu(self, what: str) -> None:
        self.cpu_window[what] = _cpu_seconds()
        self.cpu_window[what + "_t"] = time.perf_counter()
        self.cpu_window[what + "_machine"] = _machine_busy()
        self.server_cpu[what] = _tree_cpu(self.o.server_pids)

    def _server_cpu(self, wall: float) -> dict[str, Any] | None:
        if not self.o.server_pids:
            return None
        start, end = self.server_cpu.get("start", {}), self.server_cpu.get("end", {})
        mains = set(self.o.server_pids)
        main = sum(end[p] - start.get(p, 0.0) for p in end if p in mains)
        rest = sum(end[p] - start.get(p, 0.0) for p in end if p not in mains)
        return {"pids": list(self.o.server_pids), "main_cores": round(main / wall, 3),
                "children_cores": round(rest / wall, 3), "total_cores": round((main + rest) / wall, 3)}

    def _result(self, rec: Recorder, window: float) -> dict[str, Any]:
        o = self.o
        ok_in_window = sum(1 for t in rec.ok_ends if rec.measure_from <= t <= rec.window_end)
        cpu_s = self.cpu_window.get("end", 0.0) - self.cpu_window.get("start", 0.0)
        cpu_wall = max(self.cpu_window.get("end_t", 0.0) - self.cpu_window.get("start_t", 0.0), 1e-9)
        core = cpu_s / cpu_wall
        warnings: list[str] = []
        if core >= SATURATED_CORE:
            warnings.append(
                f"the load generator used {100 * core:.0f}% of a core: it may be the bottleneck, so the "
                "throughput is a lower bound and the latencies include the client's own queueing"
            )
        lag = summarize(rec.lag_hist)
        if o.mode == "open" and lag.get("count") and lag["p99"] > LAG_WARN_MS:
            warnings.append(
                f"the generator fell behind its schedule (send lag p99 {lag['p99']:.1f} ms): latencies still "
                "count from the due times, but the offered rate was not met evenly"
            )
        server = self._server_cpu(cpu_wall)
        busy = (self.cpu_window.get("end_machine", 0.0) - self.cpu_window.get("start_machine", 0.0)) / cpu_wall
        others = busy - core - (server["total_cores"] if server else 0.0)
        if server is not None and others > OTHERS_WARN:
            warnings.append(
                f"other processes on this machine used {others:.2f} cores during the run: the figures are disturbed"
            )
        if rec.tally[UNFINISHED]:
            warnings.append(f"{rec.tally[UNFINISHED]} requests had no answer {o.timeout:g} s after sending stopped")
        per_request = {spec.name: stats for spec, stats in zip(o.specs, self._spec_stats(rec), strict=True)}
        result: dict[str, Any] = {
            "tool": "procbridge-loadtest",
            "url": o.url,
            "mode": o.mode,
            "rate": o.rate,
            "concurrency": o.concurrency if o.mode == "closed" else None,
            "connections": o.connections or (o.concurrency if o.mode == "closed" else 256),
            "duration_s": o.duration,
            "warmup_s": o.warmup,
            "max_requests": o.requests,
            "stopped_by": self.stopped_by,
            "elapsed_s": round(window, 4),
            "requests": {
                "sent": rec.sent,
                "measured": sum(rec.tally),
                "warmup": rec.warmup_done,
                "ok": rec.tally[OK],
                "overloaded": rec.tally[OVERLOADED],
                "errors": rec.tally[ERROR],
                "unfinished": rec.tally[UNFINISHED],
                "answered": rec.answered,
            },
            "throughput_rps": round(ok_in_window / window, 3),
            "status_counts": dict(sorted(rec.statuses.items())),
            "slug_counts": dict(sorted(rec.slugs.items())),
            "client_errors": dict(sorted(rec.client_errors.items())),
            "latency_ms": summarize(rec.ok_hist),
            "latency_ms_all": summarize(rec.all_hist),
            "send_lag_ms": {k: v for k, v in lag.items() if k != "curve"},
            "per_request": per_request,
            "client_cpu": {
                "seconds": round(cpu_s, 4),
                "core_fraction": round(core, 4),
                "saturated": core >= SATURATED_CORE,
                "cpus": len(os.sched_getaffinity(0)),
            },
            "server_cpu": server,
            "machine_busy_cores": round(busy, 3),
            "other_processes_cores": round(max(0.0, others), 3) if server is not None else None,
            "timeline": _timeline(rec),
            "warnings": warnings,
        }
        return result

    def _spec_stats(self, rec: Recorder) -> list[dict[str, Any]]:
        out = []
        for spec, per in zip(self.o.specs, rec.per_spec, strict=True):
            out.append({
                "method": spec.method,
                "url": spec.url,
                "weight": spec.weight,
                "ok": per.tally[OK],
                "overloaded": per.tally[OVERLOADED],
                "errors": per.tally[ERROR],
                "unfinished": per.tally[UNFINISHED],
                "status_counts": dict(sorted(per.statuses.items())),
                "slug_counts": dict(sorted(per.slugs.items())),
                "latency_ms": {k: v for k, v in summarize(per.hist).items() if k != "curve"},
            })
        return out


def _timeline(rec: Recorder) -> list[dict[str, float]]:
    """Per-second buckets of completions: counts by outcome and ok latency percentiles (ms)."""
    import numpy as np

    if not rec.ends:
        return []
    ends = np.frombuffer(rec.ends, dtype=np.float64)
    lat = np.frombuffer(rec.latencies, dtype=np.float64)
    kinds = np.frombuffer(rec.kinds, dtype=np.int8)
    seconds = np.floor(ends).astype(np.int64)
    out = []
    for s in range(int(seconds.min()), int(seconds.max()) + 1):
        sel = seconds == s
        ok = sel & (kinds == OK)
        row: dict[str, float] = {
            "t": float(s),
            "ok": int(ok.sum()),
            "overloaded": int((sel & (kinds == OVERLOADED)).sum()),
            "errors": int((sel & (kinds == ERROR)).sum()),
        }
        if ok.any():
            vals = lat[ok]
            row["p50_ms"] = round(float(np.percentile(vals, 50)), 3)
            row["p99_ms"] = round(float(np.percentile(vals, 99)), 3)
            row["max_ms"] = round(float(vals.max()), 3)
        out.append(row)
    return out


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs together) since boot."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _tree_cpu(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds of these processes and all their descendants, by pid."""
    out: dict[int, float] = {}
    for pid in pids:
        try:
            top = psutil.Process(pid)
            procs = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
    return out


# -- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="procbridge loadtest",
        description="Drive a procbridge URL (or any HTTP endpoint) in open or closed loop; HDR latencies, "
        "status and problem-slug counts, JSON results and PNG plots.",
        epilog="Open loop (--rate) measures latency from each request's due time (no coordinated omission); "
        "closed loop (--concurrency, the default) keeps N requests in flight. Every run stops by itself.",
    )
    p.add_argument("url", help="base URL, e.g. http://127.0.0.1:8080 (or the full URL of any endpoint)")
    what = p.add_argument_group("what to send (one of --task, --path/--body-file, --scenario; default GET URL)")
    what.add_argument("--task", help="POST /v1/tasks/TASK with the JSON of --args")
    what.add_argument("--args", default=None, help='the task\'s arguments as a JSON object, e.g. \'{"ms": 10}\'')
    what.add_argument("--path", help="path under URL (or a full URL)")
    what.add_argument("--method", help="HTTP method [GET, POST with a body]")
    what.add_argument("--body-file", type=Path, help="send this file as the body")
    what.add_argument("--content-type", help="Content-Type of --body-file [application/octet-stream]")
    what.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'", help="extra header")
    what.add_argument("--scenario", help="a weighted mix: a JSON file, or inline JSON (see the module docs)")
    how = p.add_argument_group("how (open loop with --rate, else closed loop)")
    how.add_argument("--rate", type=float, help="open loop: requests per second, sent on schedule")
    how.add_argument("--concurrency", type=int, help="closed loop: clients, each with one request in flight [8]")
    how.add_argument("--duration", type=float, default=10.0, help="seconds of measurement after the warm-up [10]")
    how.add_argument("--requests", type=int, help="stop after this many requests (warm-up included)")
    how.add_argument("--warmup", type=float, default=0.0, help="seconds sent but not counted [0]")
    how.add_argument("--timeout", type=float, default=30.0,
                     help="seconds per request, and for in-flight requests at the end [30]")
    how.add_argument("--connections", type=int, help="connection pool size [closed: concurrency; open: 256]")
    how.add_argument("--seed", type=int, default=1, help="seed of the scenario's weighted choice [1]")
    out = p.add_argument_group("output")
    out.add_argument("--server-pid", type=int, action="append", default=[], metavar="PID",
                     help="a local server process: report its CPU use and its children's (repeatable)")
    out.add_argument("--json", dest="json_out", help="write the results as JSON to this file ('-': stdout)")
    out.add_argument("--plots", help="write PREFIX-timeline.png and PREFIX-percentiles.png (matplotlib)")
    out.add_argument("--title", help="title of the plots")
    out.add_argument("--quiet", action="store_true", help="no progress line")
    out.add_argument("--progress-interval", type=float, default=1.0, help="seconds between progress lines [1]")
    return p


def options_from_args(ns: argparse.Namespace) -> Options:
    url = ns.url
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"URL must start with http:// or https://, got {url!r}")
    headers: dict[str, str] = {}
    for h in ns.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header takes 'Name: value', got {h!r}")
        headers[name.strip()] = value.strip()
    if ns.scenario is not None:
        if ns.task or ns.path or ns.body_file or ns.args:
            raise UsageError("--scenario replaces --task, --args, --path and --body-file")
        specs = load_scenario(url, ns.scenario)
        for s in specs:
            s.headers = {**headers, **s.headers}
    else:
        item: dict[str, Any] = {"headers": headers}
        if ns.task:
            if ns.path:
                raise UsageError("give --task or --path, not both")
            item["task"] = ns.task
            if ns.args is not None:
                try:
                    item["args"] = json.loads(ns.args)
                except ValueError as exc:
                    raise UsageError(f"--args is not JSON: {exc}") from None
                if not isinstance(item["args"], dict):
                    raise UsageError("--args must be a JSON object")
            if ns.body_file:
                item.pop("args", None)
                item["body_file"] = str(ns.body_file)
        else:
            if ns.args is not None:
                raise UsageError("--args goes with --task")
            item["path"] = ns.path or ""
            if ns.body_file:
                item["body_file"] = str(ns.body_file)
        if ns.method:
            item["method"] = ns.method
        elif ns.body_file:
            item["method"] = "POST"
        if ns.content_type:
            item["content_type"] = ns.content_type
        specs = [_spec_from_dict(url, item, 0, Path.cwd())]
    if ns.rate is not None and ns.concurrency is not None:
        raise UsageError("--rate (open loop) and --concurrency (closed loop) exclude each other")
    if ns.rate is not None and not (ns.rate > 0 and math.isfinite(ns.rate)):
        raise UsageError("--rate must be > 0")
    if ns.concurrency is not None and ns.concurrency < 1:
        raise UsageError("--concurrency must be >= 1")
    if not (ns.duration > 0 and math.isfinite(ns.duration)):
        raise UsageError("--duration must be > 0: every run is bounded")
    if ns.requests is not None and ns.requests < 1:
        raise UsageError("--requests must be >= 1")
    if ns.warmup < 0 or ns.timeout <= 0 or ns.progress_interval <= 0:
        raise UsageError("--warmup must be >= 0, --timeout and --progress-interval > 0")
    return Options(
        url=url, specs=specs, rate=ns.rate, concurrency=ns.concurrency or 8, duration=ns.duration,
        requests=ns.requests, warmup=ns.warmup, timeout=ns.timeout, connections=ns.connections, seed=ns.seed,
        progress=not ns.quiet, progress_interval=ns.progress_interval, server_pids=tuple(ns.server_pid),
    )


def run(options: Options) -> dict[str, Any]:
    """Run one load test in this process (on a uvloop loop) and return its results."""
    import uvloop

    return uvloop.run(LoadTest(options).run())


def human_summary(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    req = r["requests"]
    lines = [
        f"{r['mode']} loop against {r['url']}: {req['measured']} requests measured in {r['elapsed_s']:.2f} s "
        f"(stopped by {r['stopped_by']})",
        f"  ok {req['ok']}  overloaded {req['overloaded']}  errors {req['errors']}  unfinished {req['unfinished']}"
        f"  -> {r['throughput_rps']:,.1f} ok/s",
        f"  status {r['status_counts']}  slugs {r['slug_counts']}"
        + (f"  client errors {r['client_errors']}" if r["client_errors"] else ""),
    ]
    if lat.get("count"):
        lines.append(
            f"  latency ms (ok): p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}"
            f"  p99.9 {lat['p99.9']:.3f}  max {lat['max']:.3f}"
        )
    cpu = r["client_cpu"]
    lines.append(f"  load generator: {100 * cpu['core_fraction']:.0f}% of one core ({cpu['cpus']} CPUs here); "
                 f"machine busy {r['machine_busy_cores']:.2f} cores")
    if r.get("server_cpu"):
        sc = r["server_cpu"]
        lines.append(f"  server: main process {sc['main_cores']:.2f} cores, children {sc['children_cores']:.2f} cores")
    lines.extend(f"  WARNING: {w}" for w in r["warnings"])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        import hdrh.histogram  # noqa: F401
    except ImportError:
        print(DEV_HINT, file=sys.stderr)
        return 2
    if ns.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(DEV_HINT, file=sys.stderr)
            return 2
    try:
        options = options_from_args(ns)
    except (UsageError, OSError, ValueError) as exc:
        parser.error(str(exc))
    recorder_holder: list[LoadTest] = []

    async def go() -> dict[str, Any]:
        lt = LoadTest(options)
        recorder_holder.append(lt)
        return await lt.run()

    import uvloop

    try:
        result = uvloop.run(go())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    if ns.plots:
        from bench import plots

        lt = recorder_holder[0]
        assert lt.recorder is not None
        title = ns.title or f"{result['mode']} loop, {', '.join(s.name for s in options.specs)}"
        result["plots"] = plots.loadtest_plots(lt.recorder, result, ns.plots, title)
    if ns.json_out == "-":
        print(json.dumps(result, indent=2))
    else:
        print(human_summary(result))
        if ns.json_out:
            Path(ns.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(ns.json_out).write_text(json.dumps(result, indent=2) + "\n")
    for w in result["warnings"]:
        if ns.json_out == "-":
            print(f"WARNING: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
