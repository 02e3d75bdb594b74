"""`./scripts/bench`: procbridge against three baselines, on this machine, in one go.

    ./scripts/bench [--quick | --smoke] [--json FILE] [--markdown FILE] [--img-dir DIR] [--scaling [COUNTS]]
                    [--http-processes [COUNTS]] [--serving-only]

Every contender is started here as a subprocess on a free loopback port and stopped at the end:
1. naive (aiohttp, the function inline on the loop), 2. stdlib (aiohttp + a stock
ProcessPoolExecutor through run_in_executor), 3. gunicorn (sync workers, one per core, a minimal WSGI
app), 4. procbridge (`python -m service serve`). All serve the same functions (`burn`, `primes` from
workers.builtin_tasks). The load comes from `python -m bench.loadtest_cli` in its own process.

Phases: the direct rate of each function in one process; the executor dispatch cost with no HTTP
(scripts/pool_overhead.py); per contender: saturating closed-loop `burn` at 10 ms and 1 ms, a no-op
task (`primes` with limit 1) and `GET /healthz` at the same concurrency (16 clients per worker, and
for procbridge 4 per worker too), in turn, in pairs, and `/healthz` in open loop while a saturating
`burn` load runs; a py-spy profile of procbridge under the no-op load; with --scaling, procbridge's
CPU efficiency at several worker counts; with --http-processes, procbridge at several counts of
serving processes (no-op and burn(1 ms) calls/s, the efficiency); and scripts/shm_bench.py when it
exists. It writes the figures as JSON and a Markdown report with PNG plots; a figure that misses its
goal is marked MISSED there. `--serving-only` measures the serving processes and nothing else (a
short report of its own).

`--quick` takes a few minutes on 2 cores; the default (full) runs longer for steadier figures;
`--smoke` is seconds long and only proves the machinery works (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = ("naive", "stdlib", "gunicorn", "procbridge")
NOOP_ARGS = {"limit": 1}  # primes(limit=1): returns at once; the same function for every contender
# The no-op and /healthz throughput runs use 16 clients per worker: enough calls in flight to keep the
# event loop busy while calls travel to a worker and back (with 4 per worker procbridge's loop waits
# on those round trips and a tenth of 2 cores stays idle: that load measures latency, not capacity),
# and fewer than procbridge admits at once with its defaults (16 per worker in the workers' windows
# for tiny tasks, 4 per worker queued), so none is shed with a 503. Below the service's limit of
# connections per client address (256) on any machine.
NOOP_CLIENTS_PER_WORKER = 16
NOOP_CLIENTS_MAX = 192
SHM_SECTION = "## Shared-memory payloads"


@dataclass(frozen=True)
class Plan:
    name: str
    warmup: float  # seconds of load before measuring, per run
    duration: float  # seconds measured: saturating burn runs and /healthz under saturation
    short: float  # seconds measured per run: no-op and idle /healthz throughput
    healthz_rate: float  # open-loop /healthz requests per second under saturation
    direct_seconds: float  # per function, for the direct in-process rate
    dispatch_calls: int  # per contender and round of scripts/pool_overhead.py
    dispatch_repeat: int  # rounds (each figure is the median)
    profile_seconds: float  # py-spy sampling time (0: no profile)
    shm_timeout: float  # seconds scripts/shm_bench.py may take
    request_timeout: float  # per request, and the load test's drain at its end
    retries: int = 0  # times a measurement disturbed by other processes is repeated
    retry_budget: float = 0.0  # seconds all those repeats may take together
    pair_rounds: int = 1  # no-op then /healthz runs, in turn, this many times (the ratio: median of the pairs)


PLANS = {
    "full": Plan("full", 3.0, 20.0, 5.0, 100.0, 3.0, 40_000, 5, 10.0, 600.0, 30.0, 2, 600.0, pair_rounds=5),
    "quick": Plan("quick", 1.0, 6.0, 2.0, 100.0, 1.5, 10_000, 3, 5.0, 120.0, 15.0, 1, 60.0, pair_rounds=3),
    "smoke": Plan("smoke", 0.05, 0.25, 0.2, 50.0, 0.1, 300, 1, 0.0, 60.0, 10.0),
}

# name: (direction, target, what it means)
GOALS: dict[str, tuple[str, float, str]] = {
    "cpu_efficiency": (">=", 0.90, "procbridge burn(10 ms) throughput / (workers × direct rate)"),
    "cpu_efficiency_1ms": (">=", 0.80, "the same with 1 ms tasks"),
    "dispatch_ratio_vs_stdlib": ("<=", 0.25, "executor time per no-op task via run_in_executor, procbridge / stock"),
    "dispatch_ratio_native": ("<=", 0.25, "the loop-native `await pool.call` path / stock (no separate goal; "
                                          "held to the same bar)"),
    "noop_http_ratio": (">=", 0.60, "procbridge req/s on a no-op task / req/s of GET /healthz on the same app"),
    "healthz_p99_ms_saturated": ("<=", 10.0, "p99 of /healthz (ms) while burn saturates the workers"),
    "gunicorn_cpu_ratio": (">=", 0.95, "procbridge burn(10 ms) throughput / gunicorn's"),
    "gunicorn_cpu_ratio_1ms": (">=", 1.00, "procbridge burn(1 ms) throughput / gunicorn's"),
    "healthz_p99_ratio_vs_gunicorn": ("<", 1.0, "procbridge /healthz p99 / gunicorn's, both under saturation "
                                                "(\"a fraction of gunicorn's latency\")"),
    "shm_speedup_10mib": (">=", 5.0, "10 MiB round trip: stock ProcessPoolExecutor pickling time / procbridge's"),
    "batch_speedup": (">=", 3.0, "calls/s of a numpy model task with @task(batch=...) / the same task unbatched, "
                                 "64 clients (bench/batch.py)"),
    "batch_p99_excess_ms": ("<=", 0.0, "batched p99 − (unbatched p99 + max_wait + one batch's compute), ms, "
                                       "64 clients (bench/batch.py)"),
}


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


# -- contenders -----------------------------------------------------------------------------------


class Server:
    """A contender: started as its own process group on a free loopback port, stopped with SIGTERM,
    and whatever it started is killed (by pid) if still alive after that."""

    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.ready_path = ready_path
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, psutil.Process] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROCBRIDGE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if http_status(self.url + self.ready_path) == 200:
                    break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} was not ready within {timeout:g} s:\n{self.log()}")
            time.sleep(0.05)
        self.processes()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def processes(self) -> list[psutil.Process]:
        """The server's process and its descendants now (remembered for the final clean-up)."""
        assert self.proc is not None
        try:
            top = psutil.Process(self.proc.pid)
            procs = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self.seen.setdefault(p.pid, p)
        return procs

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout:g} s after SIGTERM: killing it")
                self.proc.kill()
                self.proc.wait(10)
        for p in self.seen.values():  # only processes this server started, by pid
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()


def make_server(name: str, workers: int, workdir: Path, extra: Sequence[str] = ()) -> Server:
    py = sys.executable
    port = free_port()
    if name == "naive":
        argv = [py, "-m", "bench.apps.naive", "--port", str(port)]
        return Server(name, argv, port, "/healthz", workdir)
    if name == "stdlib":
        argv = [py, "-m", "bench.apps.stdlib", "--port", str(port), "--workers", str(workers)]
        return Server(name, argv, port, "/healthz", workdir)
    if name == "gunicorn":
        argv = [py, "-m", "gunicorn", "-k", "sync", "-w", str(workers), "-b", f"127.0.0.1:{port}",
                "--chdir", str(ROOT), "--log-level", "warning", "--graceful-timeout", "5", "--backlog", "2048",
                "bench.apps.wsgi:app"]
        return Server(name, argv, port, "/healthz", workdir)
    if name == "procbridge":
        argv = [py, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                "--store", str(workdir / "jobs.db"), "--log-level", "warning", "--shutdown-grace", "5", *extra]
        return Server(name, argv, port, "/readyz", workdir)
    raise ValueError(name)


# -- measuring ------------------------------------------------------------------------------------


def direct_rate(fn: Callable[..., Any], kwargs: dict[str, Any], seconds: float) -> float:
    """Calls per second of `fn(**kwargs)` called directly, one after another, in this process."""
    fn(**kwargs)
    n = 0
    start = time.perf_counter()
    now = start
    while now - start < seconds or n < 3:
        fn(**kwargs)
        n += 1
        now = time.perf_counter()
    return n / (now - start)


class Bench:
    def __init__(self, plan: Plan, workers: int, workdir: Path, quiet: bool) -> None:
        self.plan = plan
        self.workers = workers
        self.workdir = workdir
        self.quiet = quiet
        self.sat_concurrency = 3 * workers
        self.noop_concurrency = min(NOOP_CLIENTS_PER_WORKER * workers, NOOP_CLIENTS_MAX)
        self.few_concurrency = 4 * workers  # the no-op pairs again, for procbridge, at a latency-bound load
        # the burn load of a paired run starts with the /healthz one (each in its own process, whose
        # start-up takes a few hundred ms): it runs this much longer, and /healthz warms up half of it
        self.pair_margin = 0.4 if plan.name == "smoke" else 1.0
        self.warnings: list[str] = []
        self.plot_requests: dict[str, str] = {}  # run label -> plot prefix (the load test draws them)
        self.retry_budget = plan.retry_budget  # seconds left for measuring disturbed runs again

    # one load test, in its own process
    def loadtest_argv(self, url: str, label: str, args: Sequence[str]) -> tuple[list[str], Path]:
        out = self.workdir / f"{label}.json"
        argv = [sys.executable, "-m", "bench.loadtest_cli", url, *args, "--json", str(out),
                "--timeout", f"{self.plan.request_timeout:g}"]
        if self.quiet:
            argv.append("--quiet")
        if label in self.plot_requests:
            argv += ["--plots", self.plot_requests[label], "--title", label.replace("-", " ")]
        return argv, out

    def run_loads(self, server: Server, loads: dict[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
        """Run these load tests at the same time against `server`. When other processes on the
        machine took CPU meanwhile (beyond what a paired load generator takes), run them again, up
        to the plan's retries and its time budget for them; the result says how often."""
        discarded: list[float] = []
        while True:
            started = time.perf_counter()
            results = self._run_loads_once(server, loads)
            limit = IDLE_CORES + (PAIRED_EXTRA if len(loads) > 1 else 0.0)
            worst = max(float(r.get("other_processes_cores") or 0.0) for r in results.values())
            spent = time.perf_counter() - started
            if worst <= limit or len(discarded) >= self.plan.retries or spent > self.retry_budget:
                break
            self.retry_budget -= spent
            discarded.append(round(worst, 3))
            log(f"other processes took {worst:.2f} cores during {', '.join(loads)}: measuring again")
        for label, r in results.items():
            r["discarded_disturbed_attempts"] = discarded
            self.warnings.extend(f"{label}: {w}" for w in r.get("warnings", []))
        return results

    def _run_loads_once(self, server: Server, loads: dict[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        longest = 0.0
        assert server.proc is not None
        for label, args in loads.items():
            argv, out = self.loadtest_argv(server.url, label, [*args, "--server-pid", str(server.proc.pid)])
            log(f"{label}: {' '.join(shlex.quote(a) for a in argv[2:])}")
            stdout = subprocess.DEVNULL if self.quiet else None
            procs[label] = (subprocess.Popen(argv, cwd=ROOT, env=env, stdout=stdout, stdin=subprocess.DEVNULL), out)
            longest = max(longest, _seconds_of(args))
        results: dict[str, dict[str, Any]] = {}
        for label, (proc, out) in procs.items():
            try:
                rc = proc.wait(longest + 2 * self.plan.request_timeout + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = -9
            if rc != 0 or not out.exists():
                raise RuntimeError(f"load test {label} failed (exit {rc})")
            results[label] = json.loads(out.read_text())
        return results

    def contender(self, name: str) -> dict[str, Any]:
        p = self.plan
        server = make_server(name, self.workers, self.workdir)
        log(f"starting {name}: {' '.join(server.argv[1:])}")
        server.start()
        out: dict[str, Any] = {"argv": [Path(server.argv[0]).name, *server.argv[1:]]}
        try:
            common = ["--warmup", f"{p.warmup:g}"]
            sat = ["--concurrency", str(self.sat_concurrency), "--duration", f"{p.duration:g}", *common]
            short = ["--concurrency", str(self.noop_concurrency), "--duration", f"{p.short:g}", *common]
            for ms in (10, 1):
                label = f"{name}-burn{ms}"
                out[f"burn{ms}"] = self.run_loads(server, {
                    label: ["--task", "burn", "--args", json.dumps({"ms": ms}), *sat],
                })[label]
            out.update(self.noop_pairs(server, name, short))
            if name == "procbridge":  # the same pairs at a load that waits on round trips, for the record
                few = ["--concurrency", str(self.few_concurrency), "--duration", f"{p.short:g}", *common]
                out["few_clients"] = self.noop_pairs(server, f"{name}-few", few)
            # /healthz in open loop while burn(10 ms) saturates the CPU work; the burn load starts
            # first and ends last, so every /healthz request sees it.
            both = self.run_loads(server, {
                f"{name}-saturating-load": ["--task", "burn", "--args", json.dumps({"ms": 10}),
                                            "--concurrency", str(self.sat_concurrency),
                                            "--duration", f"{p.duration + p.warmup + self.pair_margin:g}",
                                            "--warmup", "0"],
                f"{name}-healthz-saturated": ["--path", "/healthz", "--rate", f"{p.healthz_rate:g}",
                                              "--duration", f"{p.duration:g}",
                                              "--warmup", f"{p.warmup + self.pair_margin / 2:g}"],
            })
            out["healthz_saturated"] = both[f"{name}-healthz-saturated"]
            out["saturating_load"] = both[f"{name}-saturating-load"]
            if name == "procbridge" and p.profile_seconds > 0:
                out["profile"] = self.profile(server)
        finally:
            log(f"stopping {name}")
            server.stop()
        return out

    def batching(self) -> dict[str, Any]:
        """The batch_speedup figure (bench/batch.py): procbridge serving bench/apps/batching.py."""
        from bench import batch

        server = make_server("procbridge", self.workers, self.workdir, batch.SERVER_ARGS)
        log(f"starting procbridge for the batching figure: {' '.join(server.argv[1:])}")
        server.start()
        try:
            p = self.plan
            return batch.measure(server.url, lambda loads: self.run_loads(server, loads), p.duration / 2, p.warmup,
                                 p.short)
        finally:
            server.stop()

    def noop_pairs(self, server: Server, name: str, short: list[str]) -> dict[str, Any]:
        """The no-op load, then the /healthz load, `pair_rounds` times in turn. The machine's speed
        drifts (other tenants of a VM): a no-op run and a /healthz run seconds apart can see
        different machines; single pairs gave ratios from 0.51 to 0.74 on the 2-core development VM
        on one day (2026-11-26, `./scripts/bench --quick`). The figure is the median pair's ratio,
        and that pair's runs are the ones the report shows (its plots included)."""
        plots = self.plot_requests.pop(f"{name}-noop", None)  # drawn for every round, kept for the median one
        pairs: list[tuple[float, dict[str, Any], dict[str, Any], str]] = []
        for i in range(1, self.plan.pair_rounds + 1):
            noop_label, health_label = f"{name}-noop-{i}", f"{name}-healthz-{i}"
            if plots:
                self.plot_requests[noop_label] = str(self.workdir / noop_label)
            noop = self.run_loads(server, {
                noop_label: ["--task", "primes", "--args", json.dumps(NOOP_ARGS), *short],
            })[noop_label]
            health = self.run_loads(server, {health_label: ["--path", "/healthz", *short]})[health_label]
            pairs.append((_ratio(noop.get("throughput_rps"), health.get("throughput_rps")) or 0.0, noop, health,
                          noop_label))
        _, noop, health, label = sorted(pairs, key=lambda pair: pair[0])[len(pairs) // 2]
        if plots:
            for kind in ("timeline", "percentiles"):
                drawn = self.workdir / f"{label}-{kind}.png"
                if drawn.exists():
                    shutil.copyfile(drawn, f"{plots}-{kind}.png")
        return {"noop": noop, "healthz": health, "noop_pairs": [
            {"noop_rps": n.get("throughput_rps"), "healthz_rps": h.get("throughput_rps"), "ratio": r}
            for r, n, h, _ in pairs
        ]}

    def scaling(self, counts: Sequence[int], direct: dict[str, float]) -> dict[str, Any]:
        """procbridge alone at each worker count: saturating burn(10 ms) and burn(1 ms) loads (3
        clients per worker) and the CPU efficiency, as for the main figures. A load generator
        process drives at most SCALING_CLIENTS clients (one Python process tops out near 10,000
        requests/s): bigger loads are split among several, run at once and summed."""
        cpus = len(os.sched_getaffinity(0))
        points: list[dict[str, Any]] = []
        skipped = [n for n in counts if n > cpus]
        for n in (n for n in counts if n <= cpus):
            server = make_server("procbridge", n, self.workdir)
            log(f"scaling: {n} workers")
            server.start()
            point: dict[str, Any] = {"workers": n}
            try:
                for ms in (10, 1):
                    point.update(self._scaling_load(server, n, ms, direct[f"burn{ms}_per_s"]))
            finally:
                server.stop()
            points.append(point)
        out: dict[str, Any] = {"status": "measured" if points else "not measured", "cpus_usable": cpus,
                               "points": points, "skipped_workers": skipped}
        if not points:
            out["reason"] = f"every worker count asked for is above the {cpus} usable CPUs"
        return out

    def serving(self, counts: Sequence[int], direct: dict[str, float]) -> dict[str, Any]:
        """procbridge alone with `--http-processes N` for each N, the same workers (`--workers`): a
        saturating no-op load (NOOP_ARGS, the main runs' clients: 16 per worker) and a saturating
        burn(1 ms) load (3 clients per worker, as --scaling), each split among load generators as
        --scaling does; calls/s, the no-op's ratio to N = 1, and burn(1 ms)'s CPU efficiency."""
        cpus = len(os.sched_getaffinity(0))
        w = self.workers
        points: list[dict[str, Any]] = []
        for n in counts:
            server = make_server("procbridge", w, self.workdir, ["--http-processes", str(n)])
            log(f"serving processes: {n} ({w} workers)")
            server.start()
            point: dict[str, Any] = {"http_processes": n}
            try:
                loads = (("noop", "primes", NOOP_ARGS, self.noop_concurrency), ("burn1", "burn", {"ms": 1}, 3 * w))
                for key, task, args, clients in loads:
                    load = self._split_load(server, f"serving-{n}p-{key}", task, args, clients)
                    point.update({f"{key}_{k}": v for k, v in load.items()})
            finally:
                server.stop()
            point["burn1_efficiency"] = _ratio(point["burn1_rps"], w * direct["burn1_per_s"])
            points.append(point)
        one = next((pt["noop_rps"] for pt in points if pt["http_processes"] == 1), None)
        for pt in points:
            pt["noop_vs_1"] = _ratio(pt["noop_rps"], one)
        return {"status": "measured", "cpus_usable": cpus, "workers": w, "points": points,
                "noop_task": f"primes {json.dumps(NOOP_ARGS)}", "burn_task": 'burn {"ms": 1}',
                "burn1_direct_per_s": direct["burn1_per_s"], "warmup_s": self.plan.warmup,
                "duration_s": self.plan.duration, "clients_per_generator": SCALING_CLIENTS}

    def _scaling_load(self, server: Server, workers: int, ms: int, direct_rate: float) -> dict[str, Any]:
        load = self._split_load(server, f"scaling-{workers}w-burn{ms}", "burn", {"ms": ms}, 3 * workers)
        return {
            f"burn{ms}_rps": load["rps"],
            f"burn{ms}_efficiency": _ratio(load["rps"], workers * direct_rate),
            f"burn{ms}_generators": load["generators"],
            f"burn{ms}_client_cores": load["client_cores"],
            f"burn{ms}_client_saturated": load["client_saturated"],
            f"burn{ms}_server_cores": load["server_cores"],
            f"burn{ms}_other_cores": load["other_cores"],
        }

    def _split_load(self, server: Server, label: str, task: str, args: dict[str, Any], clients: int
                    ) -> dict[str, Any]:
        """A saturating closed-loop load of `clients` clients, split among load generator processes
        of at most SCALING_CLIENTS clients each (one Python process tops out near 10,000
        requests/s), run at once; their figures summed."""
        generators = -(-clients // SCALING_CLIENTS)
        shares = [clients // generators + (1 if i < clients % generators else 0) for i in range(generators)]
        p = self.plan
        loads: dict[str, Sequence[str]] = {
            f"{label}-{i + 1}": ["--task", task, "--args", json.dumps(args), "--concurrency", str(c),
                                 "--duration", f"{p.duration:g}", "--warmup", f"{p.warmup:g}"]
            for i, c in enumerate(shares)
        }
        runs = list(self._run_loads_once(server, loads).values())
        rps = sum(float(r.get("throughput_rps") or 0.0) for r in runs)
        client = [float(r["client_cpu"]["core_fraction"]) for r in runs]
        # each generator sees its siblings as "other processes": take them out again
        others = min(max(0.0, float(r.get("other_processes_cores") or 0.0) - (sum(client) - c))
                     for r, c in zip(runs, client, strict=True))
        server_cpu = runs[0].get("server_cpu") or {}
        return {
            "rps": round(rps, 1),
            "clients": clients,
            "generators": generators,
            "client_cores": round(sum(client), 3),
            "client_saturated": any(r["client_cpu"]["saturated"] for r in runs),
            "server_cores": server_cpu.get("total_cores"),
            "server_main_cores": server_cpu.get("main_cores"),
            "other_cores": round(others, 3),
            "overloaded": sum(int(r["requests"]["overloaded"]) for r in runs),
            "errors": sum(int(r["requests"]["errors"]) + int(r["requests"]["unfinished"]) for r in runs),
        }

    def profile(self, server: Server) -> dict[str, Any]:
        """py-spy samples of procbridge (loop process and workers) under the no-op load."""
        from bench import profile as prof

        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            return {"status": "not measured", "reason": "py-spy is not installed (it is in requirements-dev.lock)"}
        p = self.plan
        raw = self.workdir / "profile.raw"
        label = "procbridge-noop-profiled"
        argv, out = self.loadtest_argv(server.url, label, [
            "--task", "primes", "--args", json.dumps(NOOP_ARGS), "--concurrency", str(self.noop_concurrency),
            "--duration", f"{p.profile_seconds + 1.5:g}", "--warmup", "0.5", "--quiet",
        ])
        assert server.proc is not None
        load = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            spy_argv = [spy, "record", "--pid", str(server.proc.pid), "--subprocesses", "--nonblocking",
                        "--rate", "250", "--duration", f"{max(1, round(p.profile_seconds))}", "--format", "raw",
                        "--output", str(raw)]
            log("profiling procbridge under the no-op load: " + " ".join(spy_argv[1:]))
            done = subprocess.run(spy_argv, capture_output=True, text=True, timeout=p.profile_seconds + 60)
        finally:
            load.wait(p.profile_seconds + p.request_timeout + 60)
        if done.returncode != 0 or not raw.exists():
            return {"status": "not measured", "reason": f"py-spy failed: {done.stderr.strip()[-500:]}"}
        loadres = json.loads(out.read_text()) if out.exists() else {}
        profiles = prof.parse_raw(raw.read_text().splitlines())
        main, workers = prof.split_service(profiles, server.proc.pid)

        def section(pp: prof.ProcessProfile | None, n: int) -> dict[str, Any]:
            if pp is None:
                return {"samples": 0}
            inclusive = type(pp.inclusive)({k: v for k, v in pp.inclusive.items() if not prof.is_entry_chain(k)})
            return {
                "samples": pp.samples,
                "areas": [[a, round(v, 1)] for a, v in prof.top(pp.areas, pp.samples, 20)],
                "self": [[f, round(v, 1)] for f, v in prof.top(pp.self_time, pp.samples, n)],
                "inclusive": [[f, round(v, 1)] for f, v in prof.top(inclusive, pp.samples, n)],
            }

        return {
            "status": "measured",
            "tool": "py-spy record --nonblocking --subprocesses --rate 250 (Python frames only)",
            "seconds": p.profile_seconds,
            "load": {"throughput_rps": loadres.get("throughput_rps"), "concurrency": self.noop_concurrency},
            "loop_process": section(main, 15),
            "workers": section(workers, 8),
        }


def _seconds_of(args: Sequence[str]) -> float:
    total = 0.0
    for flag in ("--duration", "--warmup"):
        if flag in args:
            total += float(args[list(args).index(flag) + 1])
    return total


# -- the dispatch benchmark and the shared-memory one ---------------------------------------------


def run_watched(argv: list[str], timeout: float) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a benchmark script; also return the cores that processes outside its tree kept busy
    meanwhile (its tree is sampled every 0.1 s, so short-lived children may be missed: an upper bound)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    seen: dict[int, float] = {}
    start_busy, start = _busy_seconds(), time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid, cpu in _tree_cpu(proc.pid).items():
                seen[pid] = max(cpu, seen.get(pid, 0.0))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise
    finally:
        stop.set()
        sampler.join()
    wall = max(time.perf_counter() - start, 1e-9)
    others = (_busy_seconds() - start_busy - sum(seen.values())) / wall
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), round(max(0.0, others), 3)


def _tree_cpu(pid: int) -> dict[int, float]:
    out: dict[int, float] = {}
    try:
        top = psutil.Process(pid)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system + t.children_user + t.children_system
    return out


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
                 + getattr(t, "steal", 0.0))


def dispatch(plan: Plan, workers: int) -> dict[str, Any]:
    """scripts/pool_overhead.py in its own process: µs per no-op task, procbridge vs the stock pool
    (medians of `dispatch_repeat` rounds, the contenders in turn)."""
    argv = [sys.executable, str(ROOT / "scripts" / "pool_overhead.py"), "--workers", str(workers),
            "--calls", str(plan.dispatch_calls), "--concurrency", "64", "--repeat", str(plan.dispatch_repeat)]
    log("dispatch: " + " ".join(argv[1:]))
    done, others = run_watched(argv, 600)
    if others > IDLE_CORES and plan.retries:
        log(f"other processes took {others:.2f} cores during the dispatch benchmark: measuring again")
        done, others = run_watched(argv, 600)
    if done.returncode != 0:
        raise RuntimeError(f"pool_overhead.py failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout), "other_processes_cores": others}


def shm(script: Path, timeout: float, workers: int | None = None) -> dict[str, Any]:
    """scripts/shm_bench.py's JSON (it prints one object with `shm_speedup_10mib`), or why not."""
    if not script.exists():
        return {"status": "not measured", "reason": f"{_rel(script)} is not in this checkout"}
    log(f"shared-memory payloads: {_rel(script)}")
    try:
        argv = [sys.executable, str(script), *(["--workers", str(workers)] if workers else [])]
        done, others = run_watched(argv, timeout)
    except subprocess.TimeoutExpired:
        return {"status": "not measured", "reason": f"{_rel(script)} ran past {timeout:g} s"}
    if done.returncode != 0:
        return {"status": "not measured", "reason": f"{_rel(script)} exited {done.returncode}: "
                                                    f"{done.stderr.strip()[-300:]}"}
    data = _last_json_object(done.stdout)
    if data is None or not isinstance(data.get("shm_speedup_10mib"), int | float):
        return {"status": "not measured", "reason": f"{_rel(script)} printed no JSON with shm_speedup_10mib"}
    return {"status": "measured", **data, "other_processes_cores": others}


def _last_json_object(text: str) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError):
        whole = json.loads(text)
        if isinstance(whole, dict):
            return whole
    for start in reversed([m.start() for m in re.finditer(r"^\{", text, re.MULTILINE)]):
        with contextlib.suppress(ValueError):
            obj = json.loads(text[start:])
            if isinstance(obj, dict):
                return obj
    return None


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# -- figures --------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 4)


def _thr(c: dict[str, Any], run: str) -> float | None:
    r = c.get(run)
    return float(r["throughput_rps"]) if r else None


def _p99(c: dict[str, Any], run: str) -> float | None:
    r = c.get(run)
    if not r or not r["latency_ms"].get("count"):
        return None
    return float(r["latency_ms"]["p99"])


def figures(results: dict[str, Any]) -> dict[str, float | None]:
    w = results["workers"]
    direct = results["direct"]
    c = results["contenders"]
    pb, gu, na = c.get("procbridge", {}), c.get("gunicorn", {}), c.get("naive", {})
    disp = results["dispatch"]
    stock = disp.get("stock_process_pool_us")
    f: dict[str, float | None] = {
        "cpu_efficiency": _ratio(_thr(pb, "burn10"), w * direct["burn10_per_s"]),
        "cpu_efficiency_1ms": _ratio(_thr(pb, "burn1"), w * direct["burn1_per_s"]),
        "dispatch_ratio_vs_stdlib": _ratio(disp.get("procbridge_run_in_executor_us"), stock),
        "dispatch_ratio_native": _ratio(disp.get("procbridge_native_us"), stock),
        "noop_http_ratio": _ratio(_thr(pb, "noop"), _thr(pb, "healthz")),
        "noop_http_ratio_few_clients": _ratio(_thr(pb.get("few_clients", {}), "noop"),
                                              _thr(pb.get("few_clients", {}), "healthz")),
        "healthz_p99_ms_saturated": _p99(pb, "healthz_saturated"),
        "naive_healthz_p99_ms": _p99(na, "healthz_saturated"),
        "gunicorn_cpu_ratio": _ratio(_thr(pb, "burn10"), _thr(gu, "burn10")),
        "gunicorn_cpu_ratio_1ms": _ratio(_thr(pb, "burn1"), _thr(gu, "burn1")),
        "gunicorn_healthz_p99_ms_saturated": _p99(gu, "healthz_saturated"),
        "healthz_p99_ratio_vs_gunicorn": _ratio(_p99(pb, "healthz_saturated"), _p99(gu, "healthz_saturated")),
        "shm_speedup_10mib": results["shm"].get("shm_speedup_10mib") if results["shm"]["status"] == "measured"
        else None,
    }
    batching = results.get("batching") or {}
    for name in ("batch_speedup", "batch_p99_ms", "batch_p99_bound_ms", "batch_p99_excess_ms"):
        f[name] = batching.get(name)
    for name, cc in c.items():  # the same ratios for every contender, for the tables
        f[f"{name}_cpu_efficiency"] = _ratio(_thr(cc, "burn10"), w * direct["burn10_per_s"])
        f[f"{name}_cpu_efficiency_1ms"] = _ratio(_thr(cc, "burn1"), w * direct["burn1_per_s"])
        f[f"{name}_noop_http_ratio"] = _ratio(_thr(cc, "noop"), _thr(cc, "healthz"))
    return f


def judge(figs: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, (op, target, meaning) in GOALS.items():
        value = figs.get(name)
        met: bool | None
        if value is None:
            met = None
        elif op == ">=":
            met = value >= target
        elif op == "<=":
            met = value <= target
        else:
            met = value < target
        out[name] = {"value": value, "goal": f"{op.replace('>=', '≥').replace('<=', '≤')} {target:g}",
                     "met": met, "meaning": meaning}
    return out


# -- how undisturbed the machine was ---------------------------------------------------------------

IDLE_CORES = 0.25  # busy cores below which the machine counts as idle
SCALING_CLIENTS = 12  # clients per load generator process in the scaling runs
SCALING_DEFAULT = "1,2,4,8,16"
SERVING_DEFAULT = "1,2,4"  # --http-processes: counts of serving processes
PAIRED_EXTRA = 0.15  # what the other load generator of a paired run may add to that


def busy_cores(seconds: float = 1.0) -> float:
    a = psutil.cpu_times()
    time.sleep(seconds)
    b = psutil.cpu_times()
    idle = (b.idle - a.idle) + (getattr(b, "iowait", 0.0) - getattr(a, "iowait", 0.0))
    total = sum(b) - sum(a) - (getattr(b, "guest", 0.0) - getattr(a, "guest", 0.0)) - (
        getattr(b, "guest_nice", 0.0) - getattr(a, "guest_nice", 0.0))
    return max(0.0, (total - idle) / seconds)


def idle_check(wait: float) -> float:
    """Busy cores on the machine just before starting; waits (up to `wait` s) for them to drop."""
    deadline = time.monotonic() + wait
    while True:
        busy = busy_cores()
        if busy < IDLE_CORES or time.monotonic() >= deadline:
            break
        log(f"the machine is busy ({busy:.2f} cores): waiting for it to be idle")
    if busy >= IDLE_CORES:
        log(f"WARNING: other processes keep {busy:.2f} cores busy: the figures will be disturbed")
    return round(busy, 3)


def _load_runs(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(contender, run, load test result) for every load test reported, those of `few_clients` too."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for name, c in results["contenders"].items():
        for run, r in c.items():
            if run == "few_clients" and isinstance(r, dict):
                out.extend((name, f"few-clients {sub}", rr) for sub, rr in r.items() if isinstance(rr, dict))
            elif isinstance(r, dict):
                out.append((name, run, r))
    return out


def disturbance(results: dict[str, Any], busy_before: float) -> dict[str, Any]:
    """How much CPU processes other than the client and the server took during each load test."""
    runs = [(f"{name} {run}", float(r["other_processes_cores"])) for name, run, r in _load_runs(results)
            if r.get("other_processes_cores") is not None]
    for name in ("dispatch", "shm"):
        v = results.get(name, {}).get("other_processes_cores")
        if v is not None:
            runs.append((name, float(v)))
    paired = {"healthz_saturated", "saturating_load"}  # there, the other load generator counts as "other"
    disturbed = [(label, round(v, 2)) for label, v in runs
                 if v > (IDLE_CORES + PAIRED_EXTRA if label.split()[-1] in paired else IDLE_CORES)]
    repeated = sorted({f"{name} {run}": r["discarded_disturbed_attempts"] for name, run, r in _load_runs(results)
                       if r.get("discarded_disturbed_attempts")}.items())
    return {
        "repeated_runs": [[label, cores] for label, cores in repeated],
        "busy_before_start_cores": busy_before,
        "max_other_cores": round(max((v for _, v in runs), default=0.0), 3),
        "disturbed_runs": disturbed,
        "runs": len(runs),
    }


# -- environment ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model or platform.processor(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("procbridge", "aiohttp", "uvloop", "orjson", "pydantic", "gunicorn", "hdrhistogram", "matplotlib",
                 "py-spy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            out["git"] = rev.stdout.strip() + (", with uncommitted changes" if dirty.stdout.strip() else "")
    return out


# -- main -----------------------------------------------------------------------------------------


default_shm = ROOT / "scripts" / "shm_bench.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench", description=(__doc__ or "").split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter runs: a few minutes on 2 cores")
    mode.add_argument("--smoke", action="store_true",
                      help="seconds long, to test the machinery (figures meaningless; writes under build/)")
    p.add_argument("--json", type=Path, help="write the figures here [docs/benchmarks.json]")
    p.add_argument("--markdown", type=Path, help="write the report here [docs/benchmarks.md]")
    p.add_argument("--img-dir", type=Path, help="write the plots here [docs/benchmarks/]")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="worker processes of each pool (gunicorn: sync workers) [CPUs usable]")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset [all]")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    p.add_argument("--no-batching", action="store_true", help="skip the batch_speedup figure (bench/batch.py)")
    p.add_argument("--shm-script", type=Path, default=default_shm,
                   help="the shared-memory payload benchmark to run and merge [scripts/shm_bench.py]")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for the machine to be idle before starting [0]")
    p.add_argument("--quiet", action="store_true", help="no live progress from the load tests")
    p.add_argument("--keep-tmp", action="store_true", help="keep the raw load-test results and server logs")
    p.add_argument("--scaling", nargs="?", const=SCALING_DEFAULT, metavar="COUNTS",
                   help="also measure procbridge's CPU efficiency at these worker counts (those up to the usable "
                        f"CPUs) [{SCALING_DEFAULT}]")
    p.add_argument("--http-processes", nargs="?", const=SERVING_DEFAULT, metavar="COUNTS",
                   help="also measure procbridge with these counts of serving processes (`serve --http-processes "
                        "N`), --workers workers each time: no-op and burn(1 ms) calls/s, the efficiency "
                        f"[{SERVING_DEFAULT}]")
    p.add_argument("--serving-only", action="store_true",
                   help="measure only that (--http-processes, its default counts if not given): no contenders, "
                        "dispatch, batching, profile, shared memory or --scaling worker counts; writes a short "
                        "report under build/bench-serving/ (build/bench-smoke/ with --smoke) unless told where")
    return p


def _counts(text: str | None) -> list[int]:
    """`1,2,4` as sorted distinct counts; [0] when one is not a whole number (refused with the rest)."""
    try:
        return sorted({int(n) for n in text.split(",") if n.strip()}) if text else []
    except ValueError:
        return [0]


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    plan = PLANS["quick" if ns.quick else "smoke" if ns.smoke else "full"]
    if ns.smoke or ns.serving_only:  # a serving-only report never replaces docs/benchmarks.md
        base = ROOT / "build" / ("bench-smoke" if ns.smoke else "bench-serving")
        json_path = ns.json or base / "benchmarks.json"
        md_path = ns.markdown or base / "benchmarks.md"
        img_dir = ns.img_dir or base / "img"
    else:
        json_path = ns.json or ROOT / "docs" / "benchmarks.json"
        md_path = ns.markdown or ROOT / "docs" / "benchmarks.md"
        img_dir = ns.img_dir or ROOT / "docs" / "benchmarks"
    contenders = [c.strip() for c in ns.contenders.split(",") if c.strip()]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown or not contenders:
        print(f"scripts/bench: unknown contenders {sorted(unknown)}; choose from {', '.join(CONTENDERS)}",
              file=sys.stderr)
        return 2
    if ns.workers < 1:
        print("scripts/bench: --workers must be >= 1", file=sys.stderr)
        return 2
    scaling = _counts(ns.scaling)
    if scaling and scaling[0] < 1:
        print(f"scripts/bench: --scaling takes worker counts >= 1, like {SCALING_DEFAULT}", file=sys.stderr)
        return 2
    serving_text = SERVING_DEFAULT if ns.http_processes is None and ns.serving_only else ns.http_processes
    serving = _counts(serving_text)
    if (serving and serving[0] < 1) or (serving_text is not None and not serving):
        print(f"scripts/bench: --http-processes takes counts >= 1, like {SERVING_DEFAULT}", file=sys.stderr)
        return 2
    try:
        import gunicorn  # noqa: F401
        import hdrh  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError:
        print("scripts/bench needs the dev lock: .venv/bin/pip install -r requirements-dev.lock "
              "(./scripts/bench does this itself)", file=sys.stderr)
        return 2
    from bench import report

    started = time.perf_counter()
    command = "./scripts/bench" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    tmp = Path(tempfile.mkdtemp(prefix="procbridge-bench-"))
    if not ns.serving_only:
        img_dir.mkdir(parents=True, exist_ok=True)
    if ns.no_profile:
        plan = Plan(**{**asdict(plan), "profile_seconds": 0.0})
    bench = Bench(plan, ns.workers, tmp, ns.quiet)
    if not ns.smoke:  # the load test's own plots, for two procbridge runs
        bench.plot_requests = {
            "procbridge-burn10": str(img_dir / "procbridge-burn10"),
            "procbridge-noop": str(img_dir / "procbridge-noop"),
        }
    results: dict[str, Any] = {
        "command": command,
        "mode": plan.name,
        "generated_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(),
        "workers": ns.workers,
        "plan": asdict(plan),
        "load": {"saturation_concurrency": bench.sat_concurrency, "noop_concurrency": bench.noop_concurrency,
                 "noop_few_concurrency": bench.few_concurrency,
                 "healthz_rate": plan.healthz_rate, "noop_task": f"primes {json.dumps(NOOP_ARGS)}"},
    }
    busy_before = idle_check(ns.wait_idle)
    if ns.serving_only:
        results["serving_only"] = True
        if scaling:
            log("--serving-only: the --scaling worker counts are not measured")
        return serving_only(bench, results, serving, md_path, json_path, tmp, ns.keep_tmp, busy_before, started)
    try:
        from workers.builtin_tasks import burn

        log("direct rates: burn(10 ms) and burn(1 ms) called in this process")
        results["direct"] = {
            "burn10_per_s": round(direct_rate(burn, {"ms": 10}, plan.direct_seconds), 3),
            "burn1_per_s": round(direct_rate(burn, {"ms": 1}, plan.direct_seconds), 3),
        }
        results["dispatch"] = dispatch(plan, ns.workers)
        results["contenders"] = {}
        for name in contenders:
            results["contenders"][name] = bench.contender(name)
        results["batching"] = bench.batching() if not ns.no_batching else {"status": "not measured",
                                                                            "reason": "--no-batching"}
        if scaling:
            results["scaling"] = bench.scaling(scaling, results["direct"])
        else:
            results["scaling"] = {"status": "not measured", "reason": "run with --scaling"}
        if serving:
            results["serving"] = bench.serving(serving, results["direct"])
        else:
            results["serving"] = {"status": "not measured", "reason": "run with --http-processes"}
        if ns.smoke and ns.shm_script == default_shm:  # seconds, not the real payload benchmark
            results["shm"] = {"status": "not measured", "reason": "smoke run"}
        else:
            results["shm"] = shm(ns.shm_script, plan.shm_timeout, None if ns.smoke else ns.workers)
        results.update(figures(results))
        results["goals"] = judge(results)
        results["warnings"] = bench.warnings
        results["disturbance"] = disturbance(results, busy_before)
        results["wall_s"] = round(time.perf_counter() - started, 1)
        plots = report.plots(results, img_dir)
        profile = results["contenders"].get("procbridge", {}).pop("profile", None)
        results["profile"] = profile or {"status": "not measured", "reason": "skipped"}
        for _, _, run in _load_runs(results):
            run.pop("timeline", None)  # drawn already; the JSON stays small
        old = md_path.read_text() if md_path.exists() else ""
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(report.markdown(results, plots, md_path.parent, json_path, old))
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if ns.keep_tmp:
            log(f"raw results and server logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {_rel(md_path)} and {_rel(json_path)} in {time.perf_counter() - started:.0f} s")
    for name, g in results["goals"].items():
        state = "not measured" if g["met"] is None else "met" if g["met"] else "MISSED"
        value = "—" if g["value"] is None else f"{g['value']:g}"
        log(f"  {name:32s} {value:>10s}  goal {g['goal']:8s} {state}")
    log_serving(results["serving"])
    return 0


def serving_only(bench: Bench, results: dict[str, Any], counts: Sequence[int], md_path: Path, json_path: Path,
                 tmp: Path, keep_tmp: bool, busy_before: float, started: float) -> int:
    """--serving-only: the direct rate of burn(1 ms), then the serving-processes points; a short
    report (bench.report.serving_markdown) and the JSON."""
    from bench import report
    from workers.builtin_tasks import burn

    try:
        log("direct rate: burn(1 ms) called in this process")
        results["direct"] = {"burn1_per_s": round(direct_rate(burn, {"ms": 1}, bench.plan.direct_seconds), 3)}
        results["serving"] = bench.serving(counts, results["direct"])
        results["busy_before_start_cores"] = busy_before
        results["wall_s"] = round(time.perf_counter() - started, 1)
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(report.serving_markdown(results, md_path.parent, json_path))
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if keep_tmp:
            log(f"raw results and server logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {_rel(md_path)} and {_rel(json_path)} in {time.perf_counter() - started:.0f} s")
    log_serving(results["serving"])
    return 0


def log_serving(serving: dict[str, Any]) -> None:
    """Each count of serving processes: no-op calls/s and their ratio to N = 1, burn(1 ms)'s."""
    for pt in serving.get("points", []):
        ratio = "—" if pt.get("noop_vs_1") is None else f"{pt['noop_vs_1']:.2f}"
        log(f"  --http-processes {pt['http_processes']}: no-op {pt['noop_rps']:,.0f} calls/s (÷ N=1: {ratio}), "
            f"burn(1 ms) {pt['burn1_rps']:,.0f} calls/s, efficiency {pt['burn1_efficiency']}")


if __name__ == "__main__":
    sys.exit(main())
