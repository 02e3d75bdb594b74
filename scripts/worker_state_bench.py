"""Worker state on the real server: what a `@preload` costs the HTTP process and each worker, how
fast a SIGKILLed worker is replaced, and how long start-up takes (issue 16's figures).

    .venv/bin/python scripts/worker_state_bench.py [--workers 2] [--mib 200] [--preload-seconds 3] \
        [--kills 20] [--json OUT]

The server (`python -m service serve --workers W --tasks bench.apps.worker_state --access-log off`,
its job store in a temporary folder) runs twice: first with a tiny preload (`--baseline-mib`, 1 MiB,
no sleep), then with the big one (`--mib` MiB of numpy ones, every page written, after sleeping
`--preload-seconds`). The task module is bench/apps/worker_state.py; its hooks log, with times, the
pid of every process they run in. Each run measures:

- **start-up:** from `Popen` to the first `GET /healthz` 200 and the first `GET /readyz` 200
  (polled every 5 ms on fresh connections);
- **memory:** after calls that made every worker read every page of the array, the HTTP process's
  RSS (psutil) and, for it, the worker parent and each worker, RSS, private (Private_Clean +
  Private_Dirty) and PSS bytes read by this script from /proc/PID/smaps_rollup, with the service's
  own /v1/workers figures beside them; the PSS of the parent and the workers together against the
  model's size (PSS splits each shared page among the processes mapping it: one copy sums to its size
  once, wherever it is mapped);
- **replacement:** `--kills` times, SIGKILL one idle worker (taking the slots in turn) and poll
  /v1/workers on one kept-alive connection (every `--poll-ms`) until a new pid is listed idle: the
  time from the kill to that answer (`idle_ms`, the headline), to the first listing of the new pid
  (`listed_ms`), to the new worker's `@on_worker_start` (`hook_ms`, from its own log line) and to the
  victim leaving /proc or becoming a zombie (`dead_ms`, polled in the same loop). The service backs
  off after more than max(3, workers) crashes in 10 s, so kills are spaced to stay under that (no
  back-off warning may appear in the log); the figure is a replacement, not a restart spin;
- **hooks:** the preload ran exactly once, in the worker parent (not the HTTP process), and
  `@on_worker_start` once in every worker, replacements included;
- **stop:** SIGTERM, the exit code (must be 0), how long it took, and no process left behind.

Prints a plain-text table (and `--json OUT` writes every figure); exits 1 if a check fails. The
figures are wall-clock on a shared machine: the load average before and after is in the JSON.
"""

from __future__ import annotations

import argparse
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
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
TASKS = "bench.apps.worker_state"
MIB = 1024 * 1024
CRASH_WINDOW = 10.0  # workers/local/supervisor.py: more than max(3, workers) crashes in this many seconds back off
BACKOFF_WARNING = "workers keep crashing"


# -- /proc ------------------------------------------------------------------------------------------


def smaps(pid: int) -> dict[str, int] | None:
    """RSS, private (clean + dirty) and PSS bytes of `pid`, read here from /proc/PID/smaps_rollup."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    out = {"rss_bytes": 0, "private_bytes": 0, "pss_bytes": 0}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        field = {"Rss": "rss_bytes", "Pss": "pss_bytes", "Private_Clean": "private_bytes",
                 "Private_Dirty": "private_bytes"}.get(key)
        if field:
            out[field] += int(rest.split()[0]) * 1024
    return out


def gone(pid: int) -> bool:
    """Whether `pid` has left /proc or is a zombie (dead, not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def log_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# -- HTTP -------------------------------------------------------------------------------------------


class Client:
    """A kept-alive connection to the server (reopened after an error)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {body}")
        return body

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def status_of(port: int, path: str) -> int | None:
    """The status of one GET on a fresh connection, None when nothing answers yet."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


# -- one server run ---------------------------------------------------------------------------------


class Run:
    """One server with the benchmark's task module, its hook logs and its stderr in `folder`."""

    def __init__(self, folder: Path, workers: int, mib: float, preload_seconds: float) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.workers = folder, workers
        self.preload_log, self.worker_log = folder / "preload.log", folder / "worker.log"
        self.server_log = folder / "server.log"
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PROCBRIDGE_", "BENCH_STATE_"))}
        env.update({
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            "BENCH_STATE_MIB": f"{mib:g}",
            "BENCH_STATE_PRELOAD_SECONDS": f"{preload_seconds:g}",
            "BENCH_STATE_PRELOAD_LOG": str(self.preload_log),
            "BENCH_STATE_WORKER_LOG": str(self.worker_log),
        })
        argv = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(workers), "--tasks", TASKS, "--access-log", "off",
                "--store", str(folder / "jobs.db"), "--worker-start-timeout", f"{preload_seconds + 60:g}"]
        with open(self.server_log, "wb") as log:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        self.client = Client(self.port)
        self.seen: dict[int, psutil.Process] = {}  # every process of the service met, to check none is left

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.server_log.read_text(errors="replace").splitlines()[-n:])

    def fail(self, what: str) -> RuntimeError:
        return RuntimeError(f"{what}\n--- server log ({self.server_log}) ---\n{self.log_tail()}")

    def note(self, pids: list[int]) -> None:
        for pid in pids:
            if pid not in self.seen:
                with contextlib.suppress(psutil.Error):
                    self.seen[pid] = psutil.Process(pid)

    def startup(self, timeout: float) -> dict[str, float]:
        """Milliseconds from Popen to the first /healthz 200, then to the first /readyz 200."""
        out: dict[str, float] = {}
        deadline = self.started + timeout
        for path in ("/healthz", "/readyz"):
            while status_of(self.port, path) != 200:
                if self.proc.poll() is not None:
                    raise self.fail(f"the server exited with {self.proc.returncode} before {path} answered 200")
                if time.monotonic() > deadline:
                    raise self.fail(f"no 200 from {path} within {timeout:g} s")
                time.sleep(0.005)
            out[f"{path.strip('/')}_ms"] = round((time.monotonic() - self.started) * 1000, 3)
        return out

    def listing(self) -> dict[str, Any]:
        body: dict[str, Any] = self.client.get("/v1/workers")
        parent = [body["parent"]["pid"]] if "parent" in body else []
        self.note([w["pid"] for w in body["workers"] if w["pid"]] + parent)
        return body

    def call(self, hold: float = 0.0) -> dict[str, Any]:
        """One call of the task on a connection of its own; its result, checked."""
        status, body = Client(self.port).request("POST", "/v1/tasks/model_sum", {"hold": hold})
        if status != 200:
            raise self.fail(f"model_sum: HTTP {status}: {body}")
        result: dict[str, Any] = body["result"]
        if result["sum"] != float(result["items"]):
            raise self.fail(f"model_sum read {result['sum']} from an array of {result['items']} ones")
        return result

    def touch_every_worker(self, calls: int) -> int:
        """Rounds of `workers` calls at once, each holding its worker 50 ms, until every worker has
        read the whole array and at least `calls` calls were made; how many were made."""
        pids = {w["pid"] for w in self.listing()["workers"]}
        answered: set[int] = set()
        made = 0
        with cf.ThreadPoolExecutor(self.workers) as pool:
            for _ in range(50):
                results = list(pool.map(lambda _: self.call(0.05), range(self.workers)))
                made += len(results)
                answered.update(r["pid"] for r in results)
                if pids <= answered and made >= calls:
                    return made
        raise self.fail(f"after {made} calls, workers {sorted(pids - answered)} never answered one")

    def memory(self) -> dict[str, Any]:
        """Memory of the HTTP process, the worker parent and each worker: read here, and as reported."""
        time.sleep(1.1)  # /v1/workers samples memory at most once a second: let it take a fresh sample
        body = self.listing()
        http_proc = smaps(self.proc.pid) or {}
        parent = body.get("parent") or {}
        out: dict[str, Any] = {
            "http": {"pid": self.proc.pid, "psutil_rss_bytes": self.ps.memory_info().rss, **http_proc},
            "parent": {"pid": parent.get("pid"), **((smaps(parent["pid"]) or {}) if parent else {}),
                       "reported": {k: parent.get(k) for k in ("rss_bytes", "private_bytes", "pss_bytes")}},
            "workers": [
                {"slot": w["slot"], "pid": w["pid"], **(smaps(w["pid"]) or {}),
                 "reported": {k: w.get(k) for k in ("rss_bytes", "private_bytes", "pss_bytes")}}
                for w in body["workers"]
            ],
        }
        out["pool_pss_bytes"] = out["parent"].get("pss_bytes", 0) + sum(w.get("pss_bytes", 0) for w in out["workers"])
        return out

    def idle_workers(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.listing()["workers"]
            if len(rows) == self.workers and all(w["pid"] and w["state"] == "idle" for w in rows):
                return list(rows)
            if time.monotonic() > deadline:
                raise self.fail(f"the workers were not all idle within {timeout:g} s: {rows}")
            time.sleep(0.01)

    def kill_one(self, slot: int, known: set[int], poll: float, timeout: float = 30.0) -> dict[str, Any]:
        """SIGKILL the idle worker in `slot`; poll until a new pid is listed idle. Milliseconds."""
        rows = self.idle_workers()
        victim = next(w["pid"] for w in rows if w["slot"] == slot)
        hooks_before = len(log_lines(self.worker_log))
        polls: list[float] = []
        listed = dead = None
        start = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        while True:
            if dead is None and gone(victim):
                dead = time.monotonic() - start
            sent = time.monotonic()
            rows = self.listing()["workers"]
            now = time.monotonic()
            polls.append(now - sent)
            new = [w for w in rows if w["pid"] and w["pid"] not in known]
            if new and listed is None:
                listed = now - start
            if new and new[0]["state"] == "idle":
                idle = now - start
                break
            if now - start > timeout:
                raise self.fail(f"no replacement for worker {victim} idle within {timeout:g} s: {rows}")
            if poll:
                time.sleep(poll)
        if dead is None:
            while not gone(victim) and time.monotonic() - start < timeout:
                time.sleep(0.0005)
            dead = time.monotonic() - start
        pid = new[0]["pid"]
        hook = next((float(f[1]) for f in log_lines(self.worker_log)[hooks_before:] if int(f[0]) == pid), None)
        return {"victim": victim, "pid": pid, "slot": slot, "idle_ms": ms(idle),
                "listed_ms": ms(idle if listed is None else listed),
                "hook_ms": None if hook is None else ms(hook - start), "dead_ms": ms(dead),
                "poll_ms": ms(statistics.median(polls)), "polls": len(polls)}

    def kills(self, n: int, poll: float) -> list[dict[str, Any]]:
        """`n` kills, the slots in turn, spaced so that no more than max(3, workers) fall within the
        service's crash window (beyond that it backs off, which is not what is measured here)."""
        allowed = max(3, self.workers)
        recent: deque[float] = deque()
        known = set(self.seen)
        out = []
        for i in range(n):
            self.idle_workers()
            time.sleep(0.2)  # let the last replacement settle (its hook's log line, the pool's bookkeeping)
            while len(recent) >= allowed:
                wait = recent[0] + CRASH_WINDOW + 0.5 - time.monotonic()
                if wait <= 0:
                    recent.popleft()
                else:
                    time.sleep(wait)
            recent.append(time.monotonic())
            one = self.kill_one(i % self.workers, known, poll)
            known.add(one["pid"])
            out.append(one)
        return out

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        with contextlib.suppress(Exception):
            self.listing()
        self.client.close()
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise self.fail(f"the server did not exit within {timeout:g} s of SIGTERM") from None
        stop_ms = (time.monotonic() - start) * 1000
        deadline = time.monotonic() + 10
        left = self.leftovers()
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = self.leftovers()
        return {"exit_code": code, "stop_ms": round(stop_ms, 3), "leftovers": left}

    def leftovers(self) -> list[int]:
        alive = []
        for pid, p in self.seen.items():
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive

    def kill_all(self) -> None:
        for p in [*self.seen.values(), self.ps]:
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def spread(values: list[float]) -> dict[str, float | None]:
    """min, median, p90 and max (None with no values)."""
    if not values:
        return {"min": None, "median": None, "p90": None, "max": None}
    p90 = statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]
    return {"min": min(values), "median": round(statistics.median(values), 3), "p90": round(p90, 3),
            "max": max(values)}


def measure(folder: Path, args: argparse.Namespace, mib: float, preload_seconds: float) -> dict[str, Any]:
    """Start, warm up, read memory, kill workers, stop: one run's figures and checks."""
    run = Run(folder, args.workers, mib, preload_seconds)
    try:
        out: dict[str, Any] = {"mib": mib, "preload_seconds": preload_seconds, "server_pid": run.proc.pid}
        out.update(run.startup(preload_seconds + 120))
        run.idle_workers()
        out["calls"] = run.touch_every_worker(args.calls)
        out["memory"] = run.memory()
        first = run.listing()
        parent_pid = (first.get("parent") or {}).get("pid")
        initial = {w["pid"] for w in first["workers"]}
        samples = run.kills(args.kills, args.poll_ms / 1000)
        out["kills"] = samples
        out["replacement"] = {key: spread([s[key] for s in samples if s[key] is not None])
                              for key in ("idle_ms", "listed_ms", "hook_ms", "dead_ms", "poll_ms")}
        if samples:  # the replacements read the model too, and hold as little of it
            run.idle_workers()
            run.touch_every_worker(args.workers)
            out["memory_after_kills"] = run.memory()
        preloads = log_lines(run.preload_log)
        starts = [int(f[0]) for f in log_lines(run.worker_log)]
        workers_ever = initial | {s["pid"] for s in samples}
        out["preload_runs"] = len(preloads)
        out["preload_pids"] = [int(f[0]) for f in preloads]
        out["preload_ran_s"] = round(float(preloads[0][2]) - float(preloads[0][1]), 6) if preloads else None
        out["parent_pid"] = parent_pid
        out["worker_start_runs"] = len(starts)
        out["workers_ever"] = len(workers_ever)
        checks = {
            "preload_once_in_parent": out["preload_pids"] == [parent_pid] and parent_pid is not None,
            "preload_not_in_http_process": run.proc.pid not in out["preload_pids"],
            "on_worker_start_once_per_worker": sorted(starts) == sorted(workers_ever),
            "replacements_are_new_pids": len(workers_ever) == args.workers + len(samples),
        }
        out.update(run.stop())
        log = run.server_log.read_text(errors="replace")
        out["backoff_warnings"] = log.count(BACKOFF_WARNING)
        checks["no_backoff"] = out["backoff_warnings"] == 0
        checks["sigterm_exit_0"] = out["exit_code"] == 0
        checks["nothing_left"] = not out["leftovers"]
        out["checks"] = checks
        return out
    except BaseException:
        run.kill_all()
        raise


# -- report -----------------------------------------------------------------------------------------


def summary(base: dict[str, Any], big: dict[str, Any]) -> dict[str, Any]:
    """The headline figures, flat. `pool_pss_delta_over_model`: how many copies of the model the
    preload run's parent and workers hold beyond the baseline's (1.0: one, however many workers)."""
    model = int(big["mib"] * MIB)
    extra = model - int(base["mib"] * MIB)
    bm, m = base["memory"], big["memory"]
    workers_private = [w.get("private_bytes", 0) for w in m["workers"]]
    rep = big["replacement"]["idle_ms"]
    return {
        "healthz_ms": big["healthz_ms"],
        "readyz_ms": big["readyz_ms"],
        "baseline_healthz_ms": base["healthz_ms"],
        "baseline_readyz_ms": base["readyz_ms"],
        "http_rss_bytes": m["http"]["psutil_rss_bytes"],
        "baseline_http_rss_bytes": bm["http"]["psutil_rss_bytes"],
        "http_rss_delta_bytes": m["http"]["psutil_rss_bytes"] - bm["http"]["psutil_rss_bytes"],
        "worker_private_bytes_max": max(workers_private) if workers_private else None,
        "worker_private_fraction_of_model_max":
            round(max(workers_private) / model, 4) if workers_private and model else None,
        "pool_pss_bytes": m["pool_pss_bytes"],
        "baseline_pool_pss_bytes": bm["pool_pss_bytes"],
        "pool_pss_delta_bytes": m["pool_pss_bytes"] - bm["pool_pss_bytes"],
        "model_bytes": model,
        "pool_pss_delta_over_model": round((m["pool_pss_bytes"] - bm["pool_pss_bytes"]) / extra, 3) if extra else None,
        "replacement_idle_ms": rep,
        "baseline_replacement_idle_ms": base["replacement"]["idle_ms"],
        "preload_runs": big["preload_runs"],
        "worker_start_runs": big["worker_start_runs"],
        "workers_ever": big["workers_ever"],
        "exit_code": big["exit_code"],
    }


def table(result: dict[str, Any]) -> str:
    base, big, s = result["baseline"], result["preload"], result["summary"]

    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v / MIB:.1f} MiB"

    def fmt_ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} ms"

    def spread_ms(d: dict[str, float | None]) -> str:
        if d["median"] is None:
            return "-"
        return " / ".join(f"{d[k]:.1f}" for k in ("min", "median", "p90", "max")) + " ms"

    def each(run: dict[str, Any], key: str, section: str = "memory") -> str:
        return ", ".join(mib(w.get(key)) for w in run[section]["workers"])

    def reported(run: dict[str, Any], key: str) -> str:
        return ", ".join(mib(w["reported"][key]) for w in run["memory"]["workers"])

    rows = [
        ("start -> /healthz 200", fmt_ms(base["healthz_ms"]), fmt_ms(big["healthz_ms"])),
        ("start -> /readyz 200", fmt_ms(base["readyz_ms"]), fmt_ms(big["readyz_ms"])),
        ("preload ran (its own clock)", f"{base['preload_ran_s']:.3f} s", f"{big['preload_ran_s']:.3f} s"),
        ("HTTP process RSS (psutil)", mib(base["memory"]["http"]["psutil_rss_bytes"]),
         f"{mib(big['memory']['http']['psutil_rss_bytes'])} ({s['http_rss_delta_bytes'] / MIB:+.1f} MiB)"),
        ("HTTP process private", mib(base["memory"]["http"].get("private_bytes")),
         mib(big["memory"]["http"].get("private_bytes"))),
        ("worker parent RSS / private / PSS",
         " / ".join(mib(base["memory"]["parent"].get(k)) for k in ("rss_bytes", "private_bytes", "pss_bytes")),
         " / ".join(mib(big["memory"]["parent"].get(k)) for k in ("rss_bytes", "private_bytes", "pss_bytes"))),
        ("each worker RSS", each(base, "rss_bytes"), each(big, "rss_bytes")),
        ("each worker private (smaps_rollup)", each(base, "private_bytes"), each(big, "private_bytes")),
        ("  as /v1/workers reports it", reported(base, "private_bytes"), reported(big, "private_bytes")),
        ("each worker PSS (smaps_rollup)", each(base, "pss_bytes"), each(big, "pss_bytes")),
        ("  as /v1/workers reports it", reported(base, "pss_bytes"), reported(big, "pss_bytes")),
        ("parent + workers PSS", mib(base["memory"]["pool_pss_bytes"]),
         f"{mib(big['memory']['pool_pss_bytes'])} ({s['pool_pss_delta_bytes'] / MIB:+.1f} MiB for "
         f"{big['mib'] - base['mib']:g} MiB more model: {s['pool_pss_delta_over_model']:.2f} copies)"),
    ]
    if "memory_after_kills" in big:
        rows.append(("each replacement's private", each(base, "private_bytes", "memory_after_kills")
                     if "memory_after_kills" in base else "-", each(big, "private_bytes", "memory_after_kills")))
    for key, label in (("idle_ms", "kill -> new pid idle"), ("listed_ms", "kill -> new pid listed"),
                       ("hook_ms", "kill -> its on_worker_start"), ("dead_ms", "kill -> victim gone/zombie"),
                       ("poll_ms", "one /v1/workers poll")):
        rows.append((f"{label} (min/med/p90/max)", spread_ms(base["replacement"][key]),
                     spread_ms(big["replacement"][key])))
    rows += [
        ("preload runs / on_worker_start runs", f"{base['preload_runs']} / {base['worker_start_runs']}",
         f"{big['preload_runs']} / {big['worker_start_runs']}"),
        ("SIGTERM: exit code, time", f"{base['exit_code']}, {fmt_ms(base['stop_ms'])}",
         f"{big['exit_code']}, {fmt_ms(big['stop_ms'])}"),
    ]
    heads = (f"{result['workers']} workers, {result['kills']} kills",
             f"baseline ({base['mib']:g} MiB, {base['preload_seconds']:g} s)",
             f"preload ({big['mib']:g} MiB, {big['preload_seconds']:g} s)")
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(3)]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(heads)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)) for r in rows]
    failed = [f"{name}: {check}" for name in ("baseline", "preload") for check, ok in result[name]["checks"].items()
              if not ok]
    lines.append("")
    lines.append("checks: " + ("all passed" if not failed else "FAILED " + ", ".join(failed)))
    lines.append(f"load average before {result['load_before']}, after {result['load_after']} "
                 f"({result['cpus']} CPUs)")
    return "\n".join(line.rstrip() for line in lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "cpus": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0],
        "workers": args.workers,
        "mib": args.mib,
        "preload_seconds": args.preload_seconds,
        "kills": args.kills,
        "poll_ms": args.poll_ms,
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory(prefix="worker_state_bench_") as tmp:
        result["baseline"] = measure(Path(tmp) / "baseline", args, args.baseline_mib, 0.0)
        result["preload"] = measure(Path(tmp) / "preload", args, args.mib, args.preload_seconds)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["summary"] = summary(result["baseline"], result["preload"])
    result["ok"] = all(all(result[r]["checks"].values()) for r in ("baseline", "preload"))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes [2]")
    parser.add_argument("--mib", type=float, default=200.0, help="the preload's array, MiB [200]")
    parser.add_argument("--preload-seconds", type=float, default=3.0, help="the preload's sleep first [3]")
    parser.add_argument("--baseline-mib", type=float, default=1.0, help="the baseline run's array, MiB [1]")
    parser.add_argument("--kills", type=int, default=20, help="workers SIGKILLed and timed, per run [20]")
    parser.add_argument("--calls", type=int, default=10, help="calls before the memory is read (at least one "
                        "per worker) [10]")
    parser.add_argument("--poll-ms", type=float, default=1.0, help="pause between /v1/workers polls [1]")
    parser.add_argument("--json", type=Path, help="write every figure here")
    ns = parser.parse_args()
    out = main(ns)
    print(table(out))
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2) + "\n")
    sys.exit(0 if out["ok"] else 1)
