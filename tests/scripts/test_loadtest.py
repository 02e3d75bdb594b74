"""`procbridge loadtest` against real servers: both loop modes, the outcome counts (503 `overloaded`
apart from errors), the JSON fields, the PNG plots, and that every run stops by itself. Runs are
bounded by request count or a short duration; nothing here asserts a timing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

pytest.importorskip("hdrh", reason="the bench tools come with requirements-dev.lock")

PNG = b"\x89PNG\r\n\x1a\n"
LATENCY_KEYS = {"count", "p50", "p90", "p99", "p99.9", "max", "min", "mean", "curve"}


def loadtest(url: str, *args: str, out: Path, timeout: float = 60) -> dict[str, Any]:
    """Run `python -m service loadtest` (what the `procbridge loadtest` console script runs)."""
    done = subprocess.run(
        [sys.executable, "-m", "service", "loadtest", url, *args, "--json", str(out), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    assert "ok/s" in done.stdout  # the human summary
    return json.loads(out.read_text())


def test_closed_loop_bounded_by_count(server_factory, tmp_path):
    server = server_factory("--workers", "2")
    r = loadtest(server.url, "--task", "primes", "--args", '{"limit": 1000}', "--concurrency", "4",
                 "--requests", "150", "--duration", "60", out=tmp_path / "r.json")
    assert r["mode"] == "closed" and r["concurrency"] == 4
    assert r["stopped_by"] == "requests"
    assert r["requests"]["sent"] == 150
    assert r["requests"]["ok"] == r["requests"]["measured"] == r["requests"]["answered"] == 150
    assert r["requests"]["overloaded"] == r["requests"]["errors"] == r["requests"]["unfinished"] == 0
    assert r["status_counts"] == {"200": 150}
    assert r["slug_counts"] == {} and r["client_errors"] == {}
    assert set(r["latency_ms"]) == LATENCY_KEYS
    lat = r["latency_ms"]
    assert lat["count"] == 150
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert lat["curve"][-1] == [100.0, lat["max"]]
    assert r["throughput_rps"] > 0
    cpu = r["client_cpu"]
    assert cpu["cpus"] >= 1 and cpu["core_fraction"] >= 0 and isinstance(cpu["saturated"], bool)
    assert sum(row["ok"] for row in r["timeline"]) == 150
    assert r["per_request"]["primes"]["ok"] == 150


def test_open_loop_on_schedule_with_plots(server_factory, tmp_path):
    server = server_factory("--workers", "1")
    prefix = tmp_path / "plots" / "healthz"
    r = loadtest(server.url, "--path", "/healthz", "--rate", "150", "--duration", "1", "--requests", "10000",
                 "--plots", str(prefix), "--server-pid", str(server.proc.pid), out=tmp_path / "r.json")
    assert r["mode"] == "open" and r["rate"] == 150
    assert r["stopped_by"] == "duration"
    # request i is due at i/150 s: exactly 150 fall inside one second, answered or not
    assert r["requests"]["sent"] == 150
    assert r["requests"]["ok"] + r["requests"]["errors"] + r["requests"]["unfinished"] == 150
    assert r["status_counts"].get("200") == r["requests"]["ok"] > 0
    assert set(r["send_lag_ms"]) >= {"count"}
    assert r["server_cpu"]["pids"] == [server.proc.pid]
    assert r["server_cpu"]["main_cores"] >= 0 and r["machine_busy_cores"] >= 0
    for kind in ("timeline", "percentiles"):
        png = Path(f"{prefix}-{kind}.png")
        assert r["plots"][kind] == str(png)
        assert png.read_bytes()[:8] == PNG


def test_overloaded_counted_apart_from_errors(server_factory, tmp_path):
    server = server_factory("--workers", "1", "--max-pending", "1")
    scenario = json.dumps([
        {"task": "burn", "args": {"ms": 300}, "weight": 4},
        {"name": "missing", "task": "no_such_task", "args": {}, "weight": 1},
    ])
    r = loadtest(server.url, "--scenario", scenario, "--concurrency", "6", "--requests", "40", "--duration", "60",
                 out=tmp_path / "r.json")
    req = r["requests"]
    assert r["stopped_by"] == "requests" and req["sent"] == req["measured"] == 40
    assert req["ok"] >= 1
    assert req["overloaded"] >= 1  # one worker, one waiting call: the rest are refused at once
    assert r["slug_counts"]["overloaded"] == req["overloaded"]
    assert r["status_counts"]["503"] == req["overloaded"]
    # errors are only the unknown task's 404s, never the refusals
    missing = r["per_request"]["missing"]
    assert missing["ok"] == missing["overloaded"] == 0
    assert req["errors"] == missing["errors"] == r["status_counts"].get("404", 0)
    assert r["slug_counts"].get("unknown-task", 0) == req["errors"]
    burn = r["per_request"]["burn"]
    assert burn["ok"] + burn["overloaded"] + missing["errors"] == 40
    assert r["latency_ms"]["count"] == req["ok"]  # latency_ms is over ok responses only
    assert r["latency_ms_all"]["count"] == 40


def test_a_silent_server_cannot_hold_it(tmp_path):
    """A listener that never answers: requests time out, the run still ends by itself."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        closed = loadtest(url, "--path", "/x", "--concurrency", "2", "--duration", "0.3", "--timeout", "0.5",
                          out=tmp_path / "closed.json", timeout=30)
        opened = loadtest(url, "--path", "/x", "--rate", "20", "--duration", "0.5", "--timeout", "0.5",
                          out=tmp_path / "open.json", timeout=30)
    assert closed["requests"]["ok"] == 0 and closed["requests"]["sent"] >= 2
    assert closed["client_errors"] == {"timeout": closed["requests"]["errors"]}
    assert closed["requests"]["errors"] + closed["requests"]["unfinished"] == closed["requests"]["sent"]
    assert opened["requests"]["sent"] == 10
    assert opened["requests"]["ok"] == 0
    assert opened["requests"]["errors"] + opened["requests"]["unfinished"] == 10


def test_bad_command_lines_are_refused():
    cases = [
        ["http://127.0.0.1:1", "--rate", "10", "--concurrency", "2"],
        ["http://127.0.0.1:1", "--duration", "0"],
        ["http://127.0.0.1:1", "--task", "burn", "--args", "[1]"],
        ["127.0.0.1:1"],
        ["http://127.0.0.1:1", "--scenario", "[]"],
    ]
    for args in cases:
        done = subprocess.run([sys.executable, "-m", "service", "loadtest", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 2, (args, done.stderr)
        assert "error:" in done.stderr, args


def test_latency_runs_from_the_due_time_or_an_early_send():
    from bench.loadtest import OK, Recorder, RequestSpec

    rec = Recorder([RequestSpec("x", "GET", "http://127.0.0.1:1/")], t0=100.0, measure_from=100.0)
    rec.record(0, due=101.0, sent=101.5, end=102.0, status=200, slug=None, error=None, kind=OK)  # sent late
    rec.record(0, due=101.0, sent=100.9995, end=101.0015, status=200, slug=None, error=None, kind=OK)  # early
    assert list(rec.latencies) == [pytest.approx(1000.0), pytest.approx(2.0)]
    assert rec.ok_hist.get_total_count() == 2 and rec.lag_hist.get_total_count() == 1
