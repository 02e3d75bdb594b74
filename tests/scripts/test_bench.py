"""./scripts/bench: a `--smoke` run end to end (every contender started and stopped, the JSON keys,
the Markdown report and its plots), a `--smoke --serving-only` run (procbridge with 1 and 2 serving
processes, nothing else), the shared-memory figure merged from a script or reported as not
measured, and the pieces that need no servers. No figure's value is asserted: smoke runs are too
short to mean anything."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT

pytest.importorskip("hdrh", reason="the bench tools come with requirements-dev.lock")
pytest.importorskip("matplotlib", reason="the bench tools come with requirements-dev.lock")

FIGURES = {
    "cpu_efficiency", "cpu_efficiency_1ms", "dispatch_ratio_vs_stdlib", "dispatch_ratio_native", "noop_http_ratio",
    "healthz_p99_ms_saturated", "naive_healthz_p99_ms", "gunicorn_cpu_ratio", "gunicorn_cpu_ratio_1ms",
    "shm_speedup_10mib",
}
SHM_TEXT = "## Shared-memory payloads\n\nWritten by the owner of scripts/shm_bench.py.\n\n### Details\n\nkept.\n"
MARK = "BENCH_TEST_RUN"  # inherited by every process the bench starts, and theirs


def _marked(token: str) -> list[str]:
    """Processes still alive that descend from the bench run tagged `token` (zombies included)."""
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.environ().get(MARK) == token:
                left.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:200]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return left


def test_smoke_run_writes_json_markdown_and_plots(tmp_path):
    shm_script = tmp_path / "shm_bench.py"
    shm_script.write_text('import json\nprint("measuring...")\nprint(json.dumps({"shm_speedup_10mib": 7.5, '
                          '"shm_ms": 1.0}))\n')
    md = tmp_path / "out" / "benchmarks.md"
    md.parent.mkdir()
    md.write_text("# Benchmarks\n\nold text, replaced\n\n" + SHM_TEXT + "\n## Old section\n\nreplaced too\n")
    token = uuid.uuid4().hex
    done = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "--smoke", "--quiet", "--json", str(tmp_path / "out" / "b.json"),
         "--markdown", str(md), "--img-dir", str(tmp_path / "out" / "img"), "--shm-script", str(shm_script),
         "--scaling", "1,2,512", "--http-processes", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, MARK: token},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _marked(token) == [], "the bench left processes behind"

    results = json.loads((tmp_path / "out" / "b.json").read_text())
    assert set(results) >= FIGURES
    assert set(results["contenders"]) == {"naive", "stdlib", "gunicorn", "procbridge"}
    for name, runs in results["contenders"].items():
        for run in ("burn10", "burn1", "noop", "healthz", "healthz_saturated"):
            assert runs[run]["requests"]["measured"] > 0, (name, run)
            assert "timeline" not in runs[run]
    few = results["contenders"]["procbridge"]["few_clients"]  # the pairs again at 4 clients per worker
    assert few["noop"]["concurrency"] == 4 * results["workers"] and "timeline" not in few["noop"]
    assert results["load"]["noop_concurrency"] == min(16 * results["workers"], 192)
    assert isinstance(results["noop_http_ratio_few_clients"], float)
    assert results["shm_speedup_10mib"] == 7.5 and results["shm"]["shm_ms"] == 1.0
    assert results["goals"]["shm_speedup_10mib"]["met"] is True
    for name, goal in results["goals"].items():
        assert goal["met"] in (True, False) if goal["value"] is not None else goal["met"] is None, name
    assert results["machine"]["cpus_usable"] >= 1 and results["versions"]["python"]
    assert results["mode"] == "smoke" and results["profile"]["status"] == "not measured"
    scaling = results["scaling"]
    assert scaling["status"] == "measured" and 512 in scaling["skipped_workers"]
    assert [pt["workers"] for pt in scaling["points"]] in ([1], [1, 2])  # 2 only where 2 CPUs are usable
    for pt in scaling["points"]:
        assert pt["burn10_rps"] > 0 and pt["burn1_rps"] > 0 and pt["burn1_efficiency"] > 0
    assert [pt["http_processes"] for pt in results["serving"]["points"]] == [1]  # --serving-only's test has more

    text = md.read_text()
    assert "old text" not in text and "## Old section" not in text
    assert SHM_TEXT.rstrip() in text  # the other benchmark's section, verbatim
    assert "## Goals" in text and "CPUs" in text and results["versions"]["aiohttp"] in text
    assert "./scripts/bench --smoke" in text
    assert "## CPU scaling (procbridge)" in text and "Not measured (more workers than usable CPUs): 512." in text
    assert text.index("## CPU scaling") < text.index("\n## Serving processes") < text.index("\n## Latency")
    for png in ("throughput.png", "burn10-latency.png", "healthz-saturated-latency.png", "scaling.png"):
        assert (tmp_path / "out" / "img" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](img/{png})" in text


def test_serving_only_measures_each_count_of_serving_processes(tmp_path):
    """`--serving-only --http-processes 1,2`: procbridge with 1 then 2 serving processes, real servers,
    smoke durations; a row and the JSON figures for each count, and nothing else measured."""
    out = tmp_path / "out"
    token = uuid.uuid4().hex
    done = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "--smoke", "--quiet", "--serving-only", "--http-processes", "1,2",
         "--json", str(out / "b.json"), "--markdown", str(out / "b.md"), "--img-dir", str(out / "img")],
        cwd=ROOT, capture_output=True, text=True, timeout=100, env={**os.environ, MARK: token},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _marked(token) == [], "the bench left processes behind"
    results = json.loads((out / "b.json").read_text())
    assert results["serving_only"] is True and "contenders" not in results and "dispatch" not in results
    serving = results["serving"]
    assert serving["status"] == "measured" and serving["workers"] == results["workers"]
    assert [pt["http_processes"] for pt in serving["points"]] == [1, 2]
    for pt in serving["points"]:
        assert pt["noop_rps"] > 0 and pt["burn1_rps"] > 0 and pt["burn1_efficiency"] > 0, pt
        assert pt["noop_vs_1"] > 0 and pt["noop_clients"] == results["load"]["noop_concurrency"]
        assert pt["burn1_clients"] == 3 * results["workers"]
        assert pt["noop_generators"] == -(-pt["noop_clients"] // 12)  # the scaling runs' generators
    assert serving["points"][0]["noop_vs_1"] == 1.0
    for n in (1, 2):  # the log says each count's ratio to N = 1
        assert f"--http-processes {n}: no-op " in done.stderr
    text = (out / "b.md").read_text()
    assert "## Serving processes" in text and "usable CPUs" in text and results["machine"]["cpu_model"] in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and rows[0].split("|")[3].strip() == "1.00"
    assert not (out / "img").exists()  # no plots: nothing else was measured


@pytest.mark.parametrize("flag", ["--http-processes=", "--http-processes=0", "--http-processes=1,x"])
def test_http_processes_counts_are_checked_before_anything_runs(flag, capsys):
    from bench.run import main

    assert main([flag, "--serving-only", "--json", "/nonexistent/b.json"]) == 2
    assert "--http-processes takes counts >= 1" in capsys.readouterr().err


def test_the_serving_section_is_generated_when_measured_else_carried_over():
    from bench.report import SERVING_HEADING, markdown

    results = json.loads((ROOT / "docs" / "benchmarks.json").read_text())  # the committed run's figures
    results.pop("serving", None)
    hand = f"{SERVING_HEADING}\n\nMeasured elsewhere, copied in by hand.\n\n| 1 | 2 |\n"
    old = "# B\n\n## Goals\n\nx\n\n" + hand + "\n## Latency\n\ny\n"
    kept = markdown(results, {}, ROOT / "docs", ROOT / "docs" / "benchmarks.json", old)
    assert hand in kept and kept.index("\n## CPU scaling") < kept.index(hand) < kept.index("\n## Latency")
    stub = markdown(results, {}, ROOT / "docs", ROOT / "docs" / "benchmarks.json", "")
    assert f"{SERVING_HEADING}\n\nNot measured in this run" in stub and "--serving-only" in stub
    point = {"http_processes": 2, "noop_rps": 900.0, "noop_vs_1": 0.9, "burn1_rps": 1500.0, "burn1_efficiency": 0.8,
             "noop_clients": 32, "burn1_clients": 6, "noop_generators": 3, "noop_client_cores": 0.9,
             "noop_server_main_cores": 0.5, "noop_server_cores": 1.0, "noop_other_cores": 0.01}
    results["serving"] = {"status": "measured", "cpus_usable": 2, "workers": 2, "points": [point],
                          "noop_task": 'primes {"limit": 1}', "burn_task": 'burn {"ms": 1}',
                          "burn1_direct_per_s": 950.0, "warmup_s": 1.0, "duration_s": 6.0, "clients_per_generator": 12}
    fresh = markdown(results, {}, ROOT / "docs", ROOT / "docs" / "benchmarks.json", old)
    assert "copied in by hand" not in fresh
    assert "| 2 | 900 | 0.9 | 1,500 | 0.8 | 3 (0.9 cores) | 0.5 / 1.00 | 0.01 |" in fresh


def test_shm_missing_or_broken_is_not_measured(tmp_path):
    from bench.run import shm

    missing = shm(tmp_path / "nope.py", 10)
    assert missing["status"] == "not measured" and "not in this checkout" in missing["reason"]
    broken = tmp_path / "broken.py"
    broken.write_text("print('no json here')\n")
    assert shm(broken, 10)["status"] == "not measured"


def test_goals_are_judged_plainly():
    from bench.run import judge

    goals = judge({"cpu_efficiency": 0.95, "cpu_efficiency_1ms": 0.5, "dispatch_ratio_vs_stdlib": 0.25,
                   "healthz_p99_ratio_vs_gunicorn": 1.0})
    assert goals["cpu_efficiency"]["met"] is True
    assert goals["cpu_efficiency_1ms"]["met"] is False
    assert goals["dispatch_ratio_vs_stdlib"]["met"] is True  # ≤ includes the bound
    assert goals["healthz_p99_ratio_vs_gunicorn"]["met"] is False  # < excludes it
    assert goals["shm_speedup_10mib"]["met"] is None


def test_noop_and_healthz_runs_go_in_pairs_and_the_median_pair_is_reported(tmp_path):
    """The runs alternate (no-op, /healthz, no-op, ...); the report gets the runs and the plots of the
    pair whose ratio is the median, and every pair's figures."""
    from dataclasses import replace

    from bench.run import PLANS, Bench

    bench = Bench(replace(PLANS["quick"], pair_rounds=3), 2, tmp_path, quiet=True)
    bench.plot_requests = {"procbridge-noop": str(tmp_path / "img" / "procbridge-noop")}
    (tmp_path / "img").mkdir()
    rates = iter([900.0, 1000.0, 500.0, 1000.0, 700.0, 1000.0])  # pairs' ratios: 0.9, 0.5, 0.7
    order: list[str] = []

    def run_loads(server: object, loads: dict[str, list[str]]) -> dict[str, dict[str, object]]:
        (label,) = loads
        order.append(label)
        if label in bench.plot_requests:  # what the load test draws
            for kind in ("timeline", "percentiles"):
                Path(f"{bench.plot_requests[label]}-{kind}.png").write_text(label)
        return {label: {"label": label, "throughput_rps": next(rates)}}

    bench.run_loads = run_loads  # type: ignore[method-assign]
    out = bench.noop_pairs(None, "procbridge", [])  # type: ignore[arg-type]
    assert order == ["procbridge-noop-1", "procbridge-healthz-1", "procbridge-noop-2", "procbridge-healthz-2",
                     "procbridge-noop-3", "procbridge-healthz-3"]
    assert [p["ratio"] for p in out["noop_pairs"]] == [0.9, 0.5, 0.7]
    assert out["noop"]["label"] == "procbridge-noop-3" and out["healthz"]["label"] == "procbridge-healthz-3"
    assert (tmp_path / "img" / "procbridge-noop-timeline.png").read_text() == "procbridge-noop-3"


def test_shm_section_is_cut_at_the_next_level_two_heading():
    from bench.report import existing_shm_section

    old = "# B\n\n## Goals\n\nx\n\n" + SHM_TEXT + "\n## Next\n\ny\n"
    assert existing_shm_section(old) == SHM_TEXT
    assert existing_shm_section("# B\n\n## Goals\n") is None
    assert existing_shm_section("# B\n\n" + SHM_TEXT) == SHM_TEXT


def test_py_spy_raw_profiles_are_split_per_process():
    from bench.profile import parse_raw, split_service

    raw = [
        'process 10:"python -m service serve";run (uvloop/__init__.py:96);Runner.run (asyncio/runners.py:118) 40',
        'process 10:"python -m service serve";run (uvloop/__init__.py:96);Runner.run (asyncio/runners.py:118);'
        "call_task (service/task_handlers.py:40);WorkerPool.call (workers/local/pool.py:300) 10",
        'process 10:"python -m service serve";process 11:"python -c from x import main; main(1, 2)";'
        "main (workers/worker.py:10);BlockingFrames._recv_exact (workers/framing.py:120) 30",
        'process 10:"python -m service serve";process 12:"python -c from x import main; main(1, 2)";'
        "main (workers/worker.py:10);_run (workers/worker.py:200) 20",
    ]
    profiles = parse_raw(raw)
    assert {pid: p.samples for pid, p in profiles.items()} == {10: 50, 11: 30, 12: 20}
    main, workers = split_service(profiles, 10)
    assert main is not None and workers is not None
    assert main.self_time["WorkerPool.call (workers/local/pool.py)"] == 10
    assert main.inclusive["call_task (service/task_handlers.py)"] == 10
    assert any(a.startswith("dispatch") and n == 10 for a, n in main.areas.items())
    assert any(a.startswith("event loop itself") and n == 40 for a, n in main.areas.items())
    assert workers.samples == 50
    assert any(a.startswith("worker waiting") and n == 30 for a, n in workers.areas.items())


def test_scripts_are_executable():
    for script in ("bench", "loadtest.py"):
        assert (Path(ROOT) / "scripts" / script).stat().st_mode & 0o111


def test_the_hand_written_sections_are_carried_over_in_order():
    from bench.report import WORKER_STATE_HEADING, existing_section, markdown

    state = f"{WORKER_STATE_HEADING}\n\nWritten by the owner of scripts/worker_state_bench.py.\n\n| a | b |\n"
    old = "# B\n\n" + state + "\n## Goals\n\nx\n\n" + SHM_TEXT + "\n## Next\n\ny\n"
    assert existing_section(old, WORKER_STATE_HEADING) == state
    assert existing_section("# B\n\n## Goals\n", WORKER_STATE_HEADING) is None
    results = json.loads((ROOT / "docs" / "benchmarks.json").read_text())  # the committed run's figures
    md = markdown(results, {}, ROOT / "docs", ROOT / "docs" / "benchmarks.json", old)
    assert SHM_TEXT in md and state in md
    assert md.index("\n## Dispatch overhead") < md.index(SHM_TEXT) < md.index(state) < md.index("\n## The load")
    assert "## Next" not in md  # only the two sections are carried over
