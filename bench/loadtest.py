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

Every run is bounded: it stops sending at `--warmup + --duration` seconds of wall-clock time or
after `--requests` requests, whichever comes first, then waits at most `--timeout` seconds for what
is in flight. Requests still unanswered then are counted as `unfinished` and recorded with their age
(a lower bound of their latency). An open loop that fell behind does not send the requests still
due at the end late: they are counted as `unsent`, with a warning, since the offered load was then
lower than the rate asked.

Outcomes: `ok` (2xx/3xx), `overloaded` (503 with the problem slug `overloaded`: the server's
admission control refused it, kept apart from errors) and `errors` (every other status, and client
errors, counted by a readable key: `timeout`, `connect-failed`, `server-disconnected`...).
`latency_ms` is over the ok responses, and `latency_ms_all` over every response. Requests due during
`--warmup` are not counted. The scenario format, the JSON fields and the exit codes are described in
docs/loadtest.md.

The generator is one process with one uvloop event loop and aiohttp's client (keep-alive, a
connection pool). It reports its own CPU use and warns when it used most of a core, because then
the figures measure the client as much as the server. What it sends comes from bench/scenario.py;
its command line is bench/loadtest_cli.py.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from typing import Any

from bench.scenario import RequestSpec, UsageError, load_scenario  # noqa: F401 - the module's API

# The third-party modules are imported where they are used, so that `main` can name the missing ones
# (scripts/loadtest.py run by a python3 outside the venv) instead of dying on an import.
REQUIRED = ("aiohttp", "psutil", "uvloop", "hdrh.histogram", "numpy")
DEV_HINT = (
    "procbridge loadtest needs the bench tools from the dev lock: install them with "
    ".venv/bin/pip install -r requirements-dev.lock (./scripts/test and ./scripts/bench install it) and run "
    "it with the checkout's venv: .venv/bin/procbridge loadtest, or .venv/bin/python scripts/loadtest.py"
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
END_GRACE_S = 0.010  # open loop: a request due before the end is still sent this late (timer jitter)
MIN_CPU_WINDOW_S = 0.5  # the shortest measured window over which the client's CPU share means anything

OK, OVERLOADED, ERROR, UNFINISHED = 0, 1, 2, 3
_HIGHEST_US = 3_600_000_000  # an hour, in microseconds: the histograms' range


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

    def __init__(self, specs: Sequence[RequestSpec], t0: float, measure_from: float, open_loop: bool = True) -> None:
        self.t0 = t0
        self.measure_from = measure_from
        # Send lag exists only in open loop, where a request has a due time apart from its send.
        self.open_loop = open_loop
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
        self.unsent = 0  # open loop: requests that fell due but were never sent (the client fell behind)
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
        if self.open_loop and sent > due:
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


def _error_key(exc: BaseException) -> str:
    """A client-side failure's key in `client_errors`: a readable name for the common ones (the
    docs list them), the exception's class name otherwise."""
    import aiohttp

    keys: tuple[tuple[type[BaseException], str], ...] = (
        (TimeoutError, "timeout"),
        (aiohttp.ClientConnectorError, "connect-failed"),  # refused, unreachable, DNS, TLS handshake
        (aiohttp.ServerDisconnectedError, "server-disconnected"),
        (ConnectionResetError, "connection-reset"),
        (aiohttp.ClientPayloadError, "bad-response-body"),
        (aiohttp.ClientResponseError, "bad-response"),
        (aiohttp.InvalidURL, "invalid-url"),
        (OSError, "connection-error"),
    )
    for cls, key in keys:
        if isinstance(exc, cls):
            return key
    return type(exc).__name__


def _slots_before(t0: float, interval: float, end: float) -> int:
    """How many open-loop requests fall due before `end`: the i >= 0 with t0 + i * interval < end,
    computed as the send loop computes due times, so that the count matches it exactly."""
    n = max(0, math.ceil((end - t0) / interval))
    while n > 0 and t0 + (n - 1) * interval >= end:
        n -= 1
    while t0 + n * interval < end:
        n += 1
    return n


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
        self.offered_rps: float | None = None  # open loop: the rate actually offered in the measured window
        self._session: Any = None
        self._last_line = 0.0
        self._last_done = 0
        self._last_cpu = 0.0
        self._tty = sys.stderr.isatty()
        self._show_progress = options.progress  # off once stderr's reader went away

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
        except Exception as exc:  # noqa: BLE001 - a failure fails this request only, counted by its kind
            error = _error_key(exc)
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
        """Send request i at t0 + i / rate. A client that fell behind sends what fell due as fast as it
        can, but never after stop_at (and a few milliseconds of timer jitter): what is still due then
        is counted as unsent, so the run keeps its bound and the offered load is reported as it was."""
        assert self.o.rate is not None and self.recorder is not None
        interval = 1.0 / self.o.rate
        i = 0
        self.stopped_by = "requests"
        while i < limit:
            due = t0 + i * interval
            if due >= stop_at:
                self.stopped_by = "duration"
                break
            now = time.perf_counter()
            if now >= stop_at + END_GRACE_S:
                self.stopped_by = "duration"
                self.recorder.unsent = min(limit, _slots_before(t0, interval, stop_at)) - i
                break
            if due > now:
                await asyncio.sleep(due - now)
            self._spawn(due)
            i += 1
            if i % 64 == 0:
                await asyncio.sleep(0)  # a generator far behind still lets responses in
        self.offered_rps = self._offered(t0, interval, i)

    def _offered(self, t0: float, interval: float, sent: int) -> float | None:
        """The rate offered over the measured window: the asked rate times the share of the requests
        due in it that were sent (they are evenly spaced), or None when none fell due in it."""
        assert self.o.rate is not None and self.recorder is not None
        warmup_slots = _slots_before(t0, interval, self.recorder.measure_from)
        slots = sent + self.recorder.unsent - warmup_slots
        if slots <= 0:
            return None
        return self.o.rate * max(0, sent - warmup_slots) / slots

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
        if rec is None or not self._show_progress:
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
            f"| {rps:,.0f} done/s p99 {p99:.1f} ms (ok) | client cpu {100 * core:.0f}%"
        )
        text = "\r" + line + "\x1b[K" + ("\n" if final else "") if self._tty else line + "\n"
        if not write_out(sys.stderr, text):
            self._show_progress = False  # the run goes on without its progress line

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.o.progress_interval)
            self._progress()

    async def run(self) -> dict[str, Any]:
        import aiohttp

        o = self.o
        conns = o.connections or (o.concurrency if o.mode == "closed" else 256)
        connector = aiohttp.TCPConnector(limit=conns, limit_per_host=conns, force_close=False)
        timeout = aiohttp.ClientTimeout(total=o.timeout)
        limit = o.requests if o.requests is not None else sys.maxsize
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
            self._session = session
            t0 = time.perf_counter()
            self.recorder = rec = Recorder(o.specs, t0, t0 + o.warmup, open_loop=o.mode == "open")
            stop_at = t0 + o.warmup + o.duration
            self._last_line, self._last_cpu = t0, _cpu_seconds()
            ticker = asyncio.ensure_future(self._ticker()) if self._show_progress else None
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
        core, saturated = judge_client_cpu(cpu_s, cpu_wall)
        lag = summarize(rec.lag_hist)
        server = self._server_cpu(cpu_wall)
        # Counters read at two instants can differ by rounding: never report a negative number of cores.
        busy = max(0.0, self.cpu_window.get("end_machine", 0.0) - self.cpu_window.get("start_machine", 0.0)) / cpu_wall
        others = max(0.0, busy - core - (server["total_cores"] if server else 0.0))
        warnings = self._outcome_warnings(rec)
        if saturated:
            warnings.append(
                f"the load generator used {100 * core:.0f}% of a core: it may be the bottleneck, so the "
                "throughput is a lower bound and the latencies include the client's own queueing"
            )
        if o.mode == "open" and lag.get("count") and lag["p99"] > LAG_WARN_MS:
            warnings.append(
                f"the generator fell behind its schedule (send lag p99 {lag['p99']:.1f} ms): latencies still "
                "count from the due times, but the offered rate was not met evenly"
            )
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
            "offered_rps": None if self.offered_rps is None else round(self.offered_rps, 3),
            "requests": {
                "sent": rec.sent,
                "unsent": rec.unsent,
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
                "window_s": round(cpu_wall, 4),
                "saturated": saturated,
                "cpus": len(os.sched_getaffinity(0)),
            },
            "server_cpu": server,
            "machine_busy_cores": round(busy, 3),
            "other_processes_cores": round(others, 3) if server is not None else None,
            "timeline": _timeline(rec),
            "warnings": warnings,
        }
        return result

    def _outcome_warnings(self, rec: Recorder) -> list[str]:
        """What makes the figures mean less than they seem: nothing measured, nothing succeeded, or
        an open loop that could not offer the rate asked."""
        o = self.o
        out = []
        measured = sum(rec.tally)
        if not measured:
            out.append(
                f"nothing was measured: all {rec.sent} requests sent were due during the {o.warmup:g} s warm-up "
                "(raise --requests or --duration, or shorten --warmup)" if rec.sent else
                "nothing was measured: no request was sent"
            )
        elif not rec.tally[OK]:
            statuses = dict(sorted(rec.statuses.items()))
            errors = f", client errors {dict(rec.client_errors)}" if rec.client_errors else ""
            out.append(
                f"none of the {measured} measured requests succeeded (status counts {statuses}{errors}): "
                "check the URL, and that the server is up and answering"
            )
        if rec.unsent:
            offered = "" if self.offered_rps is None else f" ({self.offered_rps:,.0f} req/s in the measured window)"
            out.append(
                f"the load generator could not keep up with --rate {rate_text(o.rate or 0.0)}: {rec.unsent:,} requests "
                "that fell due were never sent (sending stops at --warmup + --duration), so the offered load was "
                f"lower than asked{offered}"
            )
        return out

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


def judge_client_cpu(cpu_s: float, wall: float) -> tuple[float, bool]:
    """The generator's share of one core over the measured window, and whether it saturated. A short
    window (a few requests) is mostly start-up work and clock granularity, so it is never judged."""
    core = max(0.0, cpu_s) / max(wall, 1e-9)
    return core, wall >= MIN_CPU_WINDOW_S and core >= SATURATED_CORE


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs together) since boot."""
    import psutil

    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _tree_cpu(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds of these processes and all their descendants, by pid."""
    import psutil

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


# -- output ---------------------------------------------------------------------------------------


def rate_text(value: float) -> str:
    """A request rate as people write it: 12,000 or 0.5."""
    return f"{value:,.0f}" if value >= 100 else f"{value:g}"


def silence(stream: Any) -> None:
    """Point a stream whose reader went away (`| head -1`) at /dev/null, so that neither a later
    write nor Python's flush at exit raises BrokenPipeError again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def write_out(stream: Any, text: str) -> bool:
    """Write and flush; False (and the stream silenced) when its reader had gone."""
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        silence(stream)
        return False
    return True


def run(options: Options) -> dict[str, Any]:
    """Run one load test in this process (on a uvloop loop) and return its results."""
    import uvloop

    return uvloop.run(LoadTest(options).run())

