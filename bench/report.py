"""The benchmark's report: comparison plots (PNG) and docs/benchmarks.md, from the results dict.

Three sections of an existing report are written by hand from other scripts' runs and carried over
verbatim (each up to the next `## ` heading), in this order, when the file is regenerated:
"## Shared-memory payloads" (scripts/shm_bench.py), "## Worker state: preload, memory,
replacement" (scripts/worker_state_bench.py) and "## Dashboard cost" (scripts/dashboard_cost.py).

"## Serving processes" (`--http-processes`) is written here when the run measured it, and otherwise
carried over verbatim from the existing report the same way (it is usually measured on its own,
`./scripts/bench --serving-only`, whose short report `serving_markdown` writes, and copied in).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHM_HEADING = "## Shared-memory payloads"
WORKER_STATE_HEADING = "## Worker state: preload, memory, replacement"
DASHBOARD_HEADING = "## Dashboard cost"
KEPT_HEADINGS = (SHM_HEADING, WORKER_STATE_HEADING, DASHBOARD_HEADING)  # hand-written, carried over in this order
SERVING_HEADING = "## Serving processes"  # generated when measured, else carried over (after "CPU scaling")
LABELS = {
    "naive": "naive (aiohttp, inline)",
    "stdlib": "stdlib (aiohttp + ProcessPoolExecutor)",
    "gunicorn": "gunicorn (sync workers)",
    "procbridge": "procbridge",
}
RUNS = {
    "burn10": "burn 10 ms",
    "burn1": "burn 1 ms",
    "noop": "no-op task",
    "healthz": "GET /healthz",
    "healthz_saturated": "/healthz under burn load",
    "saturating_load": "the burn load beside it",
}


def plots(results: dict[str, Any], img_dir: Path) -> dict[str, str]:
    """The comparison plots; returns name -> file path (the load test drew its own already)."""
    from bench import plots as p

    c = results["contenders"]
    out: dict[str, str] = {}
    groups: dict[str, dict[str, float | None]] = {}
    for run in ("burn10", "burn1", "noop", "healthz"):
        groups[RUNS[run] + " (req/s)"] = {name: (cc[run]["throughput_rps"] if run in cc else None)
                                          for name, cc in c.items()}
    out["throughput"] = p.bars(groups, img_dir / "throughput.png",
                               f"Throughput, ok responses per second ({results['workers']} workers, "
                               f"{results['machine']['cpus_usable']} CPUs)", "requests / s")
    for run, title in (("burn10", "burn(10 ms) latency under a saturating closed-loop load"),
                       ("healthz_saturated", "GET /healthz latency (open loop) while burn(10 ms) saturates the "
                                             "CPU work")):
        curves = {LABELS[name]: cc[run]["latency_ms"]["curve"] for name, cc in c.items()
                  if run in cc and cc[run]["latency_ms"].get("count")}
        out[run] = p.percentiles(curves, img_dir / f"{run.replace('_', '-')}-latency.png", title)
    for label in ("procbridge-burn10", "procbridge-noop"):
        for kind in ("timeline", "percentiles"):
            f = img_dir / f"{label}-{kind}.png"
            if f.exists():
                out[f"{label}-{kind}"] = str(f)
    scale = results.get("scaling") or {}
    if scale.get("status") == "measured":
        out["scaling"] = p.scaling(scale["points"], img_dir / "scaling.png",
                                   f"procbridge CPU efficiency by worker count ({scale['cpus_usable']} CPUs)")
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:,.{max(0, digits - len(str(int(abs(v)))))}f}"
    return str(v)


def _ms(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _link(path: str, base: Path) -> str:
    return os.path.relpath(path, base)


def _src(name: str, md_dir: Path) -> str:
    path = ROOT / "bench" / "apps" / name
    return f"[bench/apps/{name}]({_link(str(path), md_dir)})"


def existing_section(old: str, heading: str) -> str | None:
    """The section under `heading` (a `## ` line) of an earlier report, verbatim, if it has one."""
    m = re.search(rf"^{re.escape(heading)}\b.*?(?=^## |\Z)", old, re.MULTILINE | re.DOTALL)
    return m.group(0).rstrip() + "\n" if m else None


def existing_shm_section(old: str) -> str | None:
    """The "## Shared-memory payloads" section of an earlier report, verbatim, if it has one."""
    return existing_section(old, SHM_HEADING)


def markdown(results: dict[str, Any], plots: dict[str, str], md_dir: Path, json_path: Path, old: str = "") -> str:
    r = results
    m, v = r["machine"], r["versions"]
    c = r["contenders"]
    goals = r["goals"]
    w = r["workers"]
    cpus = m["cpus_usable"]
    lines: list[str] = []
    add = lines.append

    add("# Benchmarks")
    add("")
    add(f"Generated by `{r['command']}` on {r['generated_at']} ({r['wall_s']:.0f} s, `{r['mode']}` plan); the raw "
        f"figures are in [{_link(str(json_path), md_dir)}]({_link(str(json_path), md_dir)}). Run it again to refresh "
        "this page: every figure below comes from that one run on this one machine, and figures from another "
        "machine (or another run) are not comparable.")
    add("")
    add(f"**Machine:** {cpus} usable CPUs ({m['cpu_count']} online), {m['cpu_model']}, {m['memory_gib']} GiB, "
        f"{m['platform']}.  ")
    add(f"**Versions:** Python {v['python']}, procbridge {v.get('procbridge')} (git {v.get('git', '?')}), "
        f"aiohttp {v['aiohttp']}, uvloop {v['uvloop']}, orjson {v['orjson']}, pydantic {v['pydantic']}, "
        f"gunicorn {v['gunicorn']}, hdrhistogram {v['hdrhistogram']}, matplotlib {v['matplotlib']}, "
        f"py-spy {v['py-spy']}.  ")
    add(f"**Set-up:** {w} workers for every pool (gunicorn: {w} sync workers); the load generator "
        "(`procbridge loadtest`, aiohttp client on uvloop, one process) runs on the same machine, as does every "
        "server. Everything is on loopback.")
    add("")

    dist = r.get("disturbance") or {}
    if dist.get("repeated_runs"):
        add(f"{len(dist['repeated_runs'])} load tests were measured again because other processes on the machine "
            "took CPU during the first attempt: "
            + ", ".join(f"{label} ({', '.join(f'{c:.2f}' for c in cores)} cores)" for label, cores in
                        dist["repeated_runs"]) + ". The figures below are from the last attempt.")
        add("")
    if dist.get("disturbed_runs") or dist.get("busy_before_start_cores", 0) >= 0.25:
        worst = ", ".join(f"{label} ({cores:.2f})" for label, cores in dist.get("disturbed_runs", [])[:8])
        add(f"**This run was disturbed:** other processes kept {dist.get('busy_before_start_cores', 0):.2f} cores "
            f"busy when it started, and took CPU during {len(dist.get('disturbed_runs', []))} of {dist.get('runs')} "
            f"measurements (cores used by anything but the measured processes: {worst or 'none'}). Those figures "
            "understate what the contenders can do; rerun on an idle machine.")
    else:
        add(f"The machine was otherwise idle: no load test saw more than {dist.get('max_other_cores', 0):.2f} cores "
            "used by processes other than its client and server (the paired /healthz runs count the other load "
            "generator there).")
    add("")

    # -- goals --
    add("## Goals")
    add("")
    add("| figure | measured | goal | verdict | what it is |")
    add("|---|---:|---|---|---|")
    for name, g in goals.items():
        if g["met"] is None:
            reason = r["shm"].get("reason", "") if name == "shm_speedup_10mib" else "a contender did not run"
            verdict = f"not measured ({reason})"
        else:
            verdict = "met" if g["met"] else "**MISSED**"
        add(f"| `{name}` | {_fmt(g['value'])} | {g['goal']} | {verdict} | {g['meaning']} |")
    add(f"| `naive_healthz_p99_ms` | {_fmt(r.get('naive_healthz_p99_ms'))} | (reference) | | the naive server's "
        "/healthz p99 (ms) under the same load |")
    add(f"| `gunicorn_healthz_p99_ms_saturated` | {_fmt(r.get('gunicorn_healthz_p99_ms_saturated'))} | (reference) "
        "| | gunicorn's /healthz p99 (ms) under the same load |")
    if r.get("noop_http_ratio_few_clients") is not None:
        add(f"| `noop_http_ratio_few_clients` | {_fmt(r.get('noop_http_ratio_few_clients'))} | (reference) | | "
            f"`noop_http_ratio` at {r['load'].get('noop_few_concurrency')} clients (4 per worker) |")
    add("")
    missed = [n for n, g in goals.items() if g["met"] is False]
    if missed:
        add(f"**Missed in this run:** {', '.join(f'`{n}`' for n in missed)}. The baselines were not tuned down "
            "to make these pass; the notes below say what limits each figure.")
    else:
        add("Every measured figure met its goal in this run.")
    add("")
    lines.extend(_goal_notes(r))
    add("")

    # -- how --
    load = r["load"]
    plan = r["plan"]
    d = r["direct"]
    add("## How it was measured")
    add("")
    add(f"- **Contenders**, each started by the script on a free loopback port and stopped at the end, all "
        "serving `burn` and `primes` from `workers/builtin_tasks.py` at `POST /v1/tasks/{name}` and `GET /healthz`: "
        f"1. *naive*: aiohttp on uvloop, the function called inline on the loop ({_src('naive.py', md_dir)}); "
        "2. *stdlib*: aiohttp on uvloop + a stock `ProcessPoolExecutor` via `run_in_executor` "
        f"({_src('stdlib.py', md_dir)}); "
        f"3. *gunicorn*: sync workers, one per core, a minimal WSGI app ({_src('wsgi.py', md_dir)}); "
        "4. *procbridge*: `python -m service serve --workers N`, default settings (`--max-pending` 4 × workers).")
    add(f"- **Saturating load:** closed loop, {load['saturation_concurrency']} concurrent clients (3 per worker), "
        f"{plan['warmup']:g} s warm-up then {plan['duration']:g} s measured. Throughput counts 2xx responses "
        "completed in the measured window.")
    add(f"- **Direct rate** (the denominator of the efficiencies): `burn(ms=10)` ran {d['burn10_per_s']:.2f} times/s "
        f"and `burn(ms=1)` {d['burn1_per_s']:.1f} times/s when called in a loop in one process, in this run. "
        "`cpu_efficiency` = throughput / (workers × that rate). `burn` spins for a wall-clock time, so this is the "
        "share of time the workers spend inside tasks (it does not see CPU the workers lose to other processes).")
    rounds = plan.get("pair_rounds", 1)
    few = load.get("noop_few_concurrency")
    add(f"- **No-op and /healthz throughput:** closed loop, {load['noop_concurrency']} clients (16 per worker), "
        f"{plan['short']:g} s measured per run. The no-op task is `primes` with {{\"limit\": 1}} (returns at once) "
        "as a JSON POST; `noop_http_ratio` divides procbridge's no-op req/s by the req/s of `GET /healthz` (a "
        "handler that does nothing) on the same procbridge app and load. 16 clients per worker keep the event loop "
        "busy while calls travel to a worker and back, and stay under what procbridge admits at once (tiny calls: "
        "16 per worker in the workers' windows, 4 per worker queued), so none is shed with a 503. "
        + (f"For procbridge the pairs are also run at {few} clients (4 per worker), a load that waits on each round "
           "trip (`noop_http_ratio_few_clients`). " if few else "")
        + (f"The two runs go in turn, {rounds} pairs; the figures are those of the pair with the median ratio "
           "(the machine's speed drifts between runs; a pair run back to back sees nearly the same machine)."
           if rounds > 1 else ""))
    add(f"- **/healthz under saturation:** an open-loop load of {load['healthz_rate']:g} `GET /healthz`/s (latency "
        "from each request's due time, so no coordinated omission) beside the saturating burn(10 ms) load, each in "
        "its own load-generator process.")
    add("- **Dispatch ratios** (`scripts/pool_overhead.py`, no HTTP): wall time per no-op task with 64 calls in "
        "flight from one uvloop loop, procbridge's pool through `loop.run_in_executor` and through `await pool.call` "
        "against a stock `ProcessPoolExecutor` through `run_in_executor`, same worker count.")
    add("")

    # -- throughput --
    add("## Throughput")
    add("")
    add("| contender | burn 10 ms req/s | efficiency | burn 1 ms req/s | efficiency | no-op req/s | /healthz req/s "
        "| no-op ÷ /healthz |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, cc in c.items():
        add(f"| {LABELS[name]} | {_fmt(_get(cc, 'burn10', 'throughput_rps'))} "
            f"| {_fmt(r.get(f'{name}_cpu_efficiency'))} | {_fmt(_get(cc, 'burn1', 'throughput_rps'))} "
            f"| {_fmt(r.get(f'{name}_cpu_efficiency_1ms'))} | {_fmt(_get(cc, 'noop', 'throughput_rps'))} "
            f"| {_fmt(_get(cc, 'healthz', 'throughput_rps'))} | {_fmt(r.get(f'{name}_noop_http_ratio'))} |")
    add("")
    add("The naive server runs everything on one core (its loop), so its efficiency is at most 1 / workers.")
    add("")
    if "throughput" in plots:
        add(f"![throughput]({_link(plots['throughput'], md_dir)})")
        add("")

    lines.extend(_scaling_section(r, plots, md_dir))
    lines.extend(_serving_or_kept(r, old))

    # -- latency --
    add("## Latency")
    add("")
    add("Milliseconds, 2xx responses of the measured window (HDR histograms, 3 significant digits). "
        "`overloaded` is 503 `overloaded` (admission control), counted apart from errors.")
    add("")
    add("| contender | load | p50 | p90 | p99 | p99.9 | max | ok | overloaded | errors |")
    add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in ("burn10", "burn1", "noop", "healthz", "healthz_saturated"):
        for name, cc in c.items():
            res = cc.get(run)
            if not res:
                continue
            lat, req = res["latency_ms"], res["requests"]
            add(f"| {LABELS[name]} | {RUNS[run]} | {_ms(lat.get('p50'))} | {_ms(lat.get('p90'))} "
                f"| {_ms(lat.get('p99'))} | {_ms(lat.get('p99.9'))} | {_ms(lat.get('max'))} | {req['ok']} "
                f"| {req['overloaded']} | {req['errors'] + req['unfinished']} |")
    add("")
    for key, alt in (("burn10", "burn 10 ms latency"), ("healthz_saturated", "healthz under saturation")):
        if key in plots:
            add(f"![{alt}]({_link(plots[key], md_dir)})")
            add("")
    for label in ("procbridge-burn10", "procbridge-noop"):
        if f"{label}-timeline" in plots:
            add(f"![{label} over time]({_link(plots[f'{label}-timeline'], md_dir)})")
            add("")

    # -- dispatch --
    disp = r["dispatch"]
    add("## Dispatch overhead (executor only, no HTTP)")
    add("")
    add("| path | µs per no-op task | ÷ stock |")
    add("|---|---:|---:|")
    stock = disp.get("stock_process_pool_us")
    for key, label in (("stock_process_pool_us", "stock `ProcessPoolExecutor` via `run_in_executor`"),
                       ("procbridge_run_in_executor_us", "procbridge pool via `run_in_executor`"),
                       ("procbridge_native_us", "procbridge pool via `await pool.call(...)`")):
        val = disp.get(key)
        add(f"| {label} | {_fmt(val)} | {_fmt(val / stock if val and stock else None)} |")
    add("")
    add(f"{disp.get('workers')} workers, 64 calls in flight, the median of {disp.get('repeat', 1)} rounds (the three "
        f"paths measured in turn each round); the workers share the {cpus} CPUs with the loop. Each round's figures: "
        + "; ".join(f"{k.removesuffix('_us')} {', '.join(f'{x:.1f}' for x in v)}"
                    for k, v in (disp.get("samples_us") or {}).items()) + " µs.")
    loop_cpu = disp.get("loop_cpu_us") or {}
    if loop_cpu:
        add("")
        add("CPU time of the event loop's process per call (medians; less sensitive than wall time to other work on "
            "the machine): " + "; ".join(f"{k.removesuffix('_us')} {v:.1f}" for k, v in loop_cpu.items()) + " µs.")
    add("")

    # -- adaptive batching (bench/batch.py) --
    from bench import batch

    lines.extend(batch.section(r.get("batching")))

    # -- hand-written: shm, worker state, dashboard --
    for heading in KEPT_HEADINGS:
        section = existing_section(old, heading)
        if section:
            lines.extend(section.rstrip("\n").split("\n"))
            add("")
    # -- CPU --
    add("## The load generator and the CPUs")
    add("")
    add(f"All processes share {cpus} CPUs. Columns: the load generator's CPU (share of one core, over its "
        "measured window), the server's main process and its child processes (workers; for gunicorn the sync "
        "workers; for procbridge also the idle worker parent) in cores, what every other process on the machine used "
        "(the other load generator of a paired run, or anything else running), and the whole machine's busy cores, "
        "over the same window.")
    add("")
    add("| contender | load | client (of 1 core) | server main | server children | anything else | machine busy |")
    add("|---|---|---:|---:|---:|---:|---:|")
    saturated: list[str] = []
    for name, cc in c.items():
        for run in ("burn10", "burn1", "noop", "healthz", "healthz_saturated", "saturating_load"):
            res = cc.get(run)
            if not res:
                continue
            cl = res["client_cpu"]
            sc = res.get("server_cpu") or {}
            add(f"| {LABELS[name]} | {RUNS[run]} | {100 * cl['core_fraction']:.0f}% "
                f"| {_fmt(sc.get('main_cores'))} | {_fmt(sc.get('children_cores'))} "
                f"| {_fmt(res.get('other_processes_cores'))} | {_fmt(res.get('machine_busy_cores'))} of {cpus} |")
            if cl["saturated"]:
                saturated.append(f"{name} {RUNS[run]} ({100 * cl['core_fraction']:.0f}%)")
    add("")
    if saturated:
        add(f"**The load generator saturated a core in:** {', '.join(saturated)}. In those runs it is (part of) "
            "the bottleneck: the throughput is a lower bound of what the server can do, and on this machine the "
            "client takes CPU the server would otherwise use.")
    else:
        add("The load generator never used 90% of a core.")
    add("")
    if cpus <= 2:
        add(f"On {cpus} CPUs the load generator competes with the server for CPU: in the no-op and /healthz runs "
            "the client, the server's event loop and the workers together keep the machine busy (see the last "
            "column), so those req/s figures are limited by the machine as a whole, for every contender alike.")
        add("")

    # -- profile --
    add("## Where the dispatch time goes (profile)")
    add("")
    prof = r.get("profile") or {}
    if prof.get("status") != "measured":
        add(f"Not measured: {prof.get('reason', 'skipped')}.")
        add("")
    else:
        lp = prof["loop_process"]
        add(f"`{prof['tool']}` on procbridge for {prof['seconds']:g} s under the no-op load "
            f"({prof['load']['concurrency']} clients, {_fmt(prof['load']['throughput_rps'])} req/s while sampled). "
            "Shares are of the samples taken in that process. py-spy sees Python frames: time in uvloop's C code "
            "(epoll, socket reads and writes, the loop's own callbacks) shows as `run()` itself.")
        add("")
        add("Event-loop process, by area (innermost matching frame):")
        add("")
        add("| area | share |")
        add("|---|---:|")
        for area, share in lp.get("areas", []):
            add(f"| {area} | {share:.1f}% |")
        add("")
        add("Event-loop process, top functions by self time, and by inclusive time (below the common entry "
            "chain):")
        add("")
        add("| self | share | inclusive | share |")
        add("|---|---:|---|---:|")
        selfs, incls = lp.get("self", []), lp.get("inclusive", [])
        for i in range(max(len(selfs), len(incls))):
            s = selfs[i] if i < len(selfs) else ("", None)
            n = incls[i] if i < len(incls) else ("", None)
            add(f"| `{s[0]}` | {'' if s[1] is None else f'{s[1]:.1f}%'} | `{n[0]}` "
                f"| {'' if n[1] is None else f'{n[1]:.1f}%'} |")
        wp = prof.get("workers") or {}
        if wp.get("samples"):
            add("")
            add("Workers, by area:")
            add("")
            add("| area | share |")
            add("|---|---:|")
            for area, share in wp.get("areas", []):
                add(f"| {area} | {share:.1f}% |")
        add("")
        add(_profile_summary(lp, wp))
        add("")

    # -- warnings --
    if r.get("warnings"):
        add("## Warnings from the load generator")
        add("")
        for wmsg in r["warnings"]:
            add(f"- {wmsg}")
        add("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _goal_notes(r: dict[str, Any]) -> list[str]:
    """A few facts from this run behind the figures that are easy to misread."""
    c = r["contenders"]
    pb = c.get("procbridge", {})
    notes: list[str] = []
    noop, health = pb.get("noop"), pb.get("healthz")
    if noop and health:
        hc, nc = health["client_cpu"], noop["client_cpu"]
        hs, ns = health.get("server_cpu") or {}, noop.get("server_cpu") or {}
        pairs = pb.get("noop_pairs") or []
        rounds = (f"the {len(pairs)} pairs of runs gave " + ", ".join(_fmt(x["ratio"]) for x in pairs)
                  + "; in the median pair, " if len(pairs) > 1 else "")
        note = (f"- `noop_http_ratio`: {rounds}{_fmt(noop['throughput_rps'])} no-op calls/s against "
                f"{_fmt(health['throughput_rps'])} `/healthz`/s; the service's event-loop process used "
                f"{_fmt(ns.get('main_cores'))} cores in the first and {_fmt(hs.get('main_cores'))} in the second, "
                f"the load generator {100 * nc['core_fraction']:.0f}% and {100 * hc['core_fraction']:.0f}% of a core.")
        if hc["saturated"]:
            note += (" The `/healthz` run was limited by the load generator, so its req/s is a lower bound and the "
                     "ratio an upper bound of what a faster client would show.")
        noop_cpu, health_cpu = _cpu_per_request(noop), _cpu_per_request(health)
        if noop_cpu and health_cpu:
            (nl, nw, ng), (hl, _, hg) = noop_cpu, health_cpu
            note += (f" CPU per request, no-op against `/healthz`: the service's main process {nl:.0f} against "
                     f"{hl:.0f} µs, its workers {nw:.0f} µs, the load generator {ng:.0f} against {hg:.0f} µs. All "
                     "of them share the machine's cores, so the ratio follows the CPU a request costs in all.")
        notes.append(note)
    few = pb.get("few_clients") or {}
    fnoop, fhealth = few.get("noop"), few.get("healthz")
    if fnoop and fhealth:
        fpairs = few.get("noop_pairs") or []
        main_cores = (fnoop.get("server_cpu") or {}).get("main_cores")
        notes.append(
            f"- `noop_http_ratio_few_clients`: at {r['load'].get('noop_few_concurrency')} clients the pairs gave "
            + ", ".join(_fmt(x["ratio"]) for x in fpairs)
            + f" ({_fmt(fnoop['throughput_rps'])} no-op calls/s against {_fmt(fhealth['throughput_rps'])} `/healthz`/s "
            f"in the median pair). With that few calls in flight the event loop waits on each round trip to a worker: "
            f"the machine had {_fmt(fnoop.get('machine_busy_cores'))} of its cores busy during the no-op run (the "
            f"service's main process {_fmt(main_cores)}), so that figure measures the round trip's latency more "
            "than what the service can serve.")
    d = r["dispatch"]
    if d.get("procbridge_run_in_executor_us") and d.get("procbridge_native_us"):
        notes.append(
            f"- `dispatch_ratio_vs_stdlib`: through `run_in_executor` a call costs "
            f"{d['procbridge_run_in_executor_us']:.1f} µs against {d['procbridge_native_us']:.1f} µs through "
            "`await pool.call`: the executor API adds a `concurrent.futures.Future` (a lock and a condition per "
            "call), pickling the function and its arguments, and pickling a result that is not a plain scalar on its "
            "own. (The future is the pool's `LoopFuture`, which asyncio awaits as it is: no `wrap_future` chain and "
            "no `call_soon_threadsafe` per result.)")
    for key, ms in (("burn10", 10), ("burn1", 1)):
        run = pb.get(key)
        if run:
            lat = run["latency_ms"]
            notes.append(
                f"- `cpu_efficiency{'_1ms' if ms == 1 else ''}`: with {r['load']['saturation_concurrency']} clients "
                f"each burn({ms} ms) call took {_ms(lat.get('p50'))} ms end to end at the median (queueing "
                "included). The efficiency loses whatever time a worker spends between two calls: sending the "
                "result, receiving the next call, and waiting for a CPU (workers run at nice 10 beside the event "
                "loop and the load generator)" + (", ten times more weighty with 1 ms tasks." if ms == 1 else "."))
    return notes


def _scaling_section(r: dict[str, Any], plots: dict[str, str], md_dir: Path) -> list[str]:
    """procbridge's CPU efficiency at several worker counts (`--scaling`), or how to measure it."""
    scale = r.get("scaling") or {}
    out = ["## CPU scaling (procbridge)", ""]
    if scale.get("status") != "measured":
        out += ["Not measured in this run (" + str(scale.get("reason", "run with --scaling")) + "): "
                "`./scripts/bench --scaling` measures procbridge's CPU efficiency at 1, 2, 4, 8 and 16 workers, as "
                "many as the machine has CPUs for; run it on a machine with many cores.", ""]
        return out
    out += [f"procbridge alone, {scale['cpus_usable']} usable CPUs, one pool of N workers, a saturating closed-loop "
            "load of 3 clients per worker (split among load-generator processes of at most "
            "12 clients each, run at once and summed). Efficiency: throughput / (N × the direct rate of the same "
            "function in one process, measured at the start of this run). Cores: the service's process tree, and "
            "what every other process used besides the load generators.", ""]
    out += ["| workers | burn 10 ms req/s | efficiency | burn 1 ms req/s | efficiency | load generators (1 ms) "
            "| service cores (10 ms / 1 ms) | anything else |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for pt in scale["points"]:
        gens = f"{pt.get('burn1_generators')} ({_fmt(pt.get('burn1_client_cores'))} cores" + (
            ", one saturated)" if pt.get("burn1_client_saturated") or pt.get("burn10_client_saturated") else ")")
        out.append(f"| {pt['workers']} | {_fmt(pt.get('burn10_rps'))} | {_fmt(pt.get('burn10_efficiency'))} "
                   f"| {_fmt(pt.get('burn1_rps'))} | {_fmt(pt.get('burn1_efficiency'))} | {gens} "
                   f"| {_fmt(pt.get('burn10_server_cores'))} / {_fmt(pt.get('burn1_server_cores'))} "
                   f"| {_fmt(max(pt.get('burn10_other_cores') or 0.0, pt.get('burn1_other_cores') or 0.0))} |")
    if scale.get("skipped_workers"):
        out += ["", "Not measured (more workers than usable CPUs): "
                + ", ".join(str(n) for n in scale["skipped_workers"]) + "."]
    out.append("")
    if "scaling" in plots:
        out += [f"![CPU scaling]({_link(plots['scaling'], md_dir)})", ""]
    return out


def _serving_or_kept(r: dict[str, Any], old: str) -> list[str]:
    """The serving-processes section: from this run when it measured one, else the existing report's
    (verbatim), else how to measure it."""
    if (r.get("serving") or {}).get("status") == "measured":
        return serving_section(r)
    kept = existing_section(old, SERVING_HEADING)
    if kept:
        return [*kept.rstrip("\n").split("\n"), ""]
    return [SERVING_HEADING, "", "Not measured in this run (run with --http-processes): `./scripts/bench --quick "
            "--serving-only` measures procbridge with 1, 2 and 4 serving processes (`--http-processes N`) and "
            "nothing else; run it on a machine with many cores.", ""]


def serving_section(r: dict[str, Any]) -> list[str]:
    """procbridge at several counts of serving processes (`--http-processes`): the table, what was
    measured, by which command, on which machine."""
    sv, m = r["serving"], r["machine"]
    pts = sv["points"]
    w, cpus = sv["workers"], sv["cpus_usable"]
    first = pts[0] if pts else {}
    out = [SERVING_HEADING, ""]
    out += [f"procbridge alone, `serve --workers {w} --http-processes N` for each N: N serving processes, each "
            "with its own event loop, accept on the one port (SO_REUSEPORT) and relay the task calls to the one "
            "core process, which holds the pool. Each N gets a saturating closed-loop no-op load "
            f"(`{sv['noop_task']}`, {first.get('noop_clients')} clients: 16 per worker), then `{sv['burn_task']}` "
            f"({first.get('burn1_clients')} clients: 3 per worker), each split among load-generator processes of "
            f"at most {sv['clients_per_generator']} clients, run at once and summed; {sv['warmup_s']:g} s of "
            f"warm-up, then {sv['duration_s']:g} s measured. ÷ N=1: no-op calls/s over those with one serving "
            "process. Efficiency: burn(1 ms) calls/s / (workers × the direct rate of burn(1 ms) in one process, "
            f"{sv['burn1_direct_per_s']:,.1f}/s in this run), as `cpu_efficiency_1ms`. Service cores: the core "
            "process (with N = 1, the one process) and the whole service (serving processes and workers "
            "included); anything else: what other processes used besides the load generators.", ""]
    out += [f"Measured by `{r['command']}` on {r['generated_at']} (`{r['mode']}` plan). **Machine:** {cpus} usable "
            f"CPUs ({m['cpu_count']} online), {m['cpu_model']}, {m['memory_gib']} GiB; {w} workers.", ""]
    out += ["| serving processes | no-op calls/s | ÷ N=1 | burn 1 ms calls/s | efficiency | load generators (no-op) "
            "| service cores, no-op (core / all) | anything else |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    shed: list[str] = []
    for pt in pts:
        gens = f"{pt.get('noop_generators')} ({_fmt(pt.get('noop_client_cores'))} cores" + (
            ", one saturated)" if pt.get("noop_client_saturated") else ")")
        out.append(f"| {pt['http_processes']} | {_fmt(pt.get('noop_rps'))} | {_fmt(pt.get('noop_vs_1'))} "
                   f"| {_fmt(pt.get('burn1_rps'))} | {_fmt(pt.get('burn1_efficiency'))} | {gens} "
                   f"| {_fmt(pt.get('noop_server_main_cores'))} / {_fmt(pt.get('noop_server_cores'))} "
                   f"| {_fmt(max(pt.get('noop_other_cores') or 0.0, pt.get('burn1_other_cores') or 0.0))} |")
        for key in ("noop", "burn1"):
            if pt.get(f"{key}_overloaded") or pt.get(f"{key}_errors"):
                shed.append(f"N = {pt['http_processes']} {key}: {pt.get(f'{key}_overloaded')} overloaded, "
                            f"{pt.get(f'{key}_errors')} errors")
    out.append("")
    if shed:
        out += ["Calls shed with 503 `overloaded` or failed: " + "; ".join(shed) + ".", ""]
    worst = max((max(pt.get("noop_other_cores") or 0.0, pt.get("burn1_other_cores") or 0.0) for pt in pts),
                default=0.0)
    if worst > 0.25:
        out += [f"**These runs were disturbed:** other processes took up to {worst:.2f} cores meanwhile (the last "
                "column), CPU the service and its load generators did not get; the figures understate what it can "
                "do, and the rows differ by more than their serving processes. Rerun on an idle machine.", ""]
    if cpus <= 4:
        out += [f"On {cpus} CPUs the serving processes, the core, the {w} workers and the load generators share the "
                "same cores: more serving processes bring no CPU to spend, so this table shows what relaying costs "
                "here, not how the serving side scales on a machine with many cores.", ""]
    return out


def serving_markdown(results: dict[str, Any], md_dir: Path, json_path: Path) -> str:
    """The short report of `./scripts/bench --serving-only`: the machine, then the serving section,
    ready to be copied into docs/benchmarks.md (which keeps it when regenerated)."""
    r, m, v = results, results["machine"], results["versions"]
    lines = ["# Benchmarks: serving processes", "",
             f"Generated by `{r['command']}` on {r['generated_at']} ({r['wall_s']:.0f} s, `{r['mode']}` plan); the "
             f"raw figures are in [{_link(str(json_path), md_dir)}]({_link(str(json_path), md_dir)}). Only the "
             f"serving processes were measured (`--serving-only`); the section below can be copied into "
             "docs/benchmarks.md, whose regenerations keep it.", "",
             f"**Machine:** {m['cpus_usable']} usable CPUs ({m['cpu_count']} online), {m['cpu_model']}, "
             f"{m['memory_gib']} GiB, {m['platform']}.  ",
             f"**Versions:** Python {v['python']}, procbridge {v.get('procbridge')} (git {v.get('git', '?')}), "
             f"aiohttp {v['aiohttp']}, uvloop {v['uvloop']}.", ""]
    busy = r.get("busy_before_start_cores") or 0.0
    if busy >= 0.25:
        lines += [f"**Other processes kept {busy:.2f} cores busy when this run started:** the figures are "
                  "disturbed; rerun on an idle machine.", ""]
    lines += serving_section(r)
    return "\n".join(lines).rstrip("\n") + "\n"


def _cpu_per_request(run: dict[str, Any]) -> tuple[float, float, float] | None:
    """Microseconds of CPU per request of a load run: the service's main process (its event loop
    and log thread), its children (the workers) and the load generator."""
    server, rps = run.get("server_cpu"), run.get("throughput_rps")
    if not server or not rps:
        return None
    cores = run["client_cpu"]["core_fraction"]
    return (1e6 * server["main_cores"] / rps, 1e6 * server["children_cores"] / rps, 1e6 * cores / rps)


def _share(areas: list[list[Any]], *prefixes: str) -> float:
    return sum(float(v) for a, v in areas if str(a).startswith(prefixes))


def _profile_summary(lp: dict[str, Any], wp: dict[str, Any]) -> str:
    """One paragraph from the area shares, so the text stays true when the figures change."""
    areas = lp.get("areas", [])
    http = _share(areas, "event loop itself", "aiohttp", "JSON, bodies", "task handler")
    pool = _share(areas, "dispatch", "wire")
    validation = _share(areas, "validation")
    metrics = _share(areas, "metrics")
    text = (f"**Reading it:** in the event-loop process, the HTTP side (uvloop's socket I/O and polling, aiohttp's "
            f"parsing, routing and response writing, the handler) takes {http:.0f}% of the samples, the pool's "
            f"dispatch and wire (workers/local/, workers/framing.py) {pool:.0f}%, argument validation "
            f"{validation:.0f}% and metrics {metrics:.0f}%. Next to what `/healthz` costs, a no-op call adds a body "
            "read, a validation, a frame to a worker and one back: two more socket syscalls and at least one "
            "more loop wake-up per request.")
    wareas = wp.get("areas", []) if wp else []
    if wareas:
        text += (f" In the workers, {_share(wareas, 'worker waiting'):.0f}% of the samples wait for the next call "
                 f"and {_share(wareas, 'wire'):.0f}% are in the framing code, nearly all of it sending results "
                 "(`BlockingFrames.send_raw`); py-spy samples a runnable worker that a woken event loop has "
                 "preempted at the frame it was in, so this includes time spent waiting for a CPU right after "
                 "the send (workers run at nice 10).")
    return text


def _get(cc: dict[str, Any], run: str, key: str) -> Any:
    res = cc.get(run)
    return res.get(key) if res else None
