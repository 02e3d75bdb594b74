"""The command line of `procbridge loadtest` (bench/loadtest.py runs the load): flags, their checks,
the summary printed at the end, and exit codes (docs/loadtest.md)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from bench.loadtest import DEV_HINT, REQUIRED, LoadTest, Options, rate_text, write_out
from bench.scenario import RequestSpec, UsageError, load_scenario, spec_from_dict

# -- command line ---------------------------------------------------------------------------------


def _finite(text: str) -> float:
    """argparse type: a real number; nan and inf would leave a run without bounds or its JSON invalid."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="procbridge loadtest",
        description="Drive a procbridge URL (or any HTTP endpoint) in open or closed loop; HDR latencies, "
        "status and problem-slug counts, JSON results and PNG plots.",
        epilog="Open loop (--rate) measures latency from each request's due time (no coordinated omission); "
        "closed loop (--concurrency, the default) keeps N requests in flight. Every run stops by itself. "
        "The scenario format, the JSON fields and the exit codes: docs/loadtest.md.",
    )
    p.add_argument("url", help="base URL, e.g. http://127.0.0.1:8080 (or the full URL of any endpoint)")
    what = p.add_argument_group("what to send (one of --task, --path/--body-file, --scenario; default GET URL)")
    what.add_argument("--task", help="POST /v1/tasks/TASK with the JSON of --args")
    what.add_argument("--args", default=None, help='the task\'s arguments as a JSON object, e.g. \'{"ms": 10}\'')
    what.add_argument("--path", help="path under URL (or a full URL); without --task or --path, URL itself")
    what.add_argument("--method", help="HTTP method [GET, POST with a body]")
    what.add_argument("--body-file", type=Path, help="send this file as the body (query arguments: in --path or URL)")
    what.add_argument("--content-type", help="Content-Type of --body-file [application/octet-stream]")
    what.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'", help="extra header")
    what.add_argument("--scenario", help="a weighted mix: a JSON file, or inline JSON (format: docs/loadtest.md)")
    how = p.add_argument_group("how (open loop with --rate, else closed loop)")
    how.add_argument("--rate", type=_finite, help="open loop: requests per second, sent on schedule")
    how.add_argument("--concurrency", type=int, help="closed loop: clients, each with one request in flight [8]")
    how.add_argument("--duration", type=_finite, default=10.0, help="seconds of measurement after the warm-up [10]")
    how.add_argument("--requests", type=int, help="stop after this many requests (warm-up included)")
    how.add_argument("--warmup", type=_finite, default=0.0, help="seconds sent but not counted [0]")
    how.add_argument("--timeout", type=_finite, default=30.0,
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
    out.add_argument("--progress-interval", type=_finite, default=1.0, help="seconds between progress lines [1]")
    return p


def _single_spec(url: str, ns: argparse.Namespace, headers: dict[str, str]) -> RequestSpec:
    """The one request kind of a command line without --scenario."""
    item: dict[str, Any] = {"headers": headers}
    if ns.task:
        if ns.path:
            raise UsageError("give --task or --path, not both")
        item["task"] = ns.task
        if ns.args is not None and ns.body_file:
            raise UsageError(
                "--args is sent as the JSON body, which --body-file replaces: put the task's arguments in the "
                f"query string instead, e.g. --path '/v1/tasks/{ns.task}?{_as_query(ns.args)}' "
                f"--body-file {ns.body_file}"
            )
        if ns.args is not None:
            try:
                item["args"] = json.loads(ns.args)
            except ValueError as exc:
                raise UsageError(f"--args is not JSON: {exc}") from None
            if not isinstance(item["args"], dict):
                raise UsageError("--args must be a JSON object")
    else:
        if ns.args is not None:
            raise UsageError("--args goes with --task")
        if ns.path is not None:
            item["path"] = ns.path
    if ns.body_file:
        item["body_file"] = str(ns.body_file)
    if ns.method:
        item["method"] = ns.method
    if ns.content_type:
        item["content_type"] = ns.content_type
    return spec_from_dict(url, item, "the command line", Path.cwd())


def _as_query(args: str) -> str:
    """--args as a query string, for the hint given when it comes with --body-file."""
    with contextlib.suppress(ValueError):
        value = json.loads(args)
        if isinstance(value, dict) and value and all(isinstance(v, str | int | float) for v in value.values()):
            return urlencode({k: v if isinstance(v, str) else json.dumps(v) for k, v in value.items()})
    return "name=value"


def _check_numbers(ns: argparse.Namespace) -> None:
    if ns.rate is not None and ns.concurrency is not None:
        raise UsageError("--rate (open loop) and --concurrency (closed loop) exclude each other")
    if ns.rate is not None and ns.rate <= 0:
        raise UsageError("--rate must be > 0")
    if ns.concurrency is not None and ns.concurrency < 1:
        raise UsageError("--concurrency must be >= 1")
    if ns.connections is not None and ns.connections < 1:
        raise UsageError("--connections must be >= 1 (leave it out for the default)")
    if ns.duration <= 0:
        raise UsageError("--duration must be > 0: every run is bounded")
    if ns.requests is not None and ns.requests < 1:
        raise UsageError("--requests must be >= 1")
    if ns.warmup < 0 or ns.timeout <= 0 or ns.progress_interval <= 0:
        raise UsageError("--warmup must be >= 0, --timeout and --progress-interval > 0")


def _check_server_pids(pids: Sequence[int]) -> None:
    """A wrong --server-pid would otherwise report a server that used no CPU at all."""
    import psutil

    for pid in pids:
        if pid < 1 or not psutil.pid_exists(pid):
            raise UsageError(f"--server-pid {pid}: no such process")


def options_from_args(ns: argparse.Namespace) -> Options:
    url = ns.url
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"URL must start with http:// or https://, got {url!r}")
    if not urlsplit(url).hostname:
        raise UsageError(f"URL names no host: {url!r}")
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
        specs = [_single_spec(url, ns, headers)]
    _check_numbers(ns)
    _check_server_pids(ns.server_pid)
    return Options(
        url=url, specs=specs, rate=ns.rate, concurrency=ns.concurrency or 8, duration=ns.duration,
        requests=ns.requests, warmup=ns.warmup, timeout=ns.timeout, connections=ns.connections, seed=ns.seed,
        progress=not ns.quiet, progress_interval=ns.progress_interval, server_pids=tuple(ns.server_pid),
    )


def _load_line(r: dict[str, Any]) -> str:
    """What load was offered: an open loop that fell behind says so instead of claiming its rate."""
    if r["mode"] == "closed":
        return f"closed loop, {r['concurrency']} clients"
    unsent = r["requests"].get("unsent", 0)
    if not unsent:
        return f"open loop at {rate_text(r['rate'])} req/s"
    offered = "" if r.get("offered_rps") is None else f", {r['offered_rps']:,.0f} offered"
    return f"open loop, {rate_text(r['rate'])} req/s asked{offered} ({unsent:,} due requests never sent)"


def human_summary(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    req = r["requests"]
    lines = [
        f"{_load_line(r)} against {r['url']}: {req['measured']} requests measured in {r['elapsed_s']:.2f} s "
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


def json_safe(value: Any) -> Any:
    """`value` with every nan or infinity replaced by null: JSON has no such numbers, and a file that
    holds them is not JSON to most readers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _missing_modules(plots: bool) -> list[str]:
    missing = []
    for name in (*REQUIRED, *(("matplotlib",) if plots else ())):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name.split(".")[0])
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. Exit status: 0 when the run completed, whatever its outcomes (read the counts
    and warnings); 2 for a bad command line or missing tools; 130 when interrupted; 141 (as if killed
    by SIGPIPE) when the reader of stdout went away, after writing --json FILE."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    missing = _missing_modules(bool(ns.plots))
    if missing:
        print(f"{', '.join(missing)} cannot be imported by {sys.executable}. {DEV_HINT}", file=sys.stderr)
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
        write_out(sys.stderr, "\ninterrupted\n")
        return 130
    if ns.plots:
        from bench import plots

        lt = recorder_holder[0]
        assert lt.recorder is not None
        title = ns.title or f"{result['mode']} loop, {', '.join(s.name for s in options.specs)}"
        result["plots"] = plots.loadtest_plots(lt.recorder, result, ns.plots, title)
    text = json.dumps(json_safe(result), indent=2, allow_nan=False)
    if ns.json_out and ns.json_out != "-":  # first: the results are kept even if stdout's reader is gone
        Path(ns.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json_out).write_text(text + "\n")
    if not write_out(sys.stdout, (text if ns.json_out == "-" else human_summary(result)) + "\n"):
        return 141
    if ns.json_out == "-":
        for w in result["warnings"]:
            write_out(sys.stderr, f"WARNING: {w}\n")
    return 0



if __name__ == "__main__":
    sys.exit(main())
