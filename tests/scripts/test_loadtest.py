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


LOADTEST = [sys.executable, "-m", "service", "loadtest"]  # what the `procbridge loadtest` console script runs


def run_loadtest(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LOADTEST, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def loadtest(url: str, *args: str, out: Path, timeout: float = 60) -> dict[str, Any]:
    """Run `python -m service loadtest` quietly; its JSON results."""
    done = run_loadtest(url, *args, "--json", str(out), "--quiet", timeout=timeout)
    assert done.returncode == 0, done.stderr
    assert "ok/s" in done.stdout  # the human summary
    return json.loads(out.read_text())


def refused_url() -> str:
    """A loopback URL where nothing listens (the port was bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/x"


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


def test_bad_command_lines_are_refused(tmp_path):
    """Each is refused before the run (exit 2, one line, no traceback); the short --duration keeps a
    run that wrongly starts bounded."""
    body = tmp_path / "body.bin"
    body.write_bytes(b"x")
    url = "http://127.0.0.1:1"
    cases = [
        ([url, "--rate", "10", "--concurrency", "2"], "exclude each other"),
        ([url, "--duration", "0"], "--duration"),
        ([url, "--task", "burn", "--args", "[1]"], "--args"),
        (["127.0.0.1:1"], "http://"),
        ([url, "--scenario", "[]"], "scenario"),
        ([url, "--connections", "-1"], "--connections must be >= 1"),
        ([url, "--connections", "0"], "--connections must be >= 1"),
        ([url, "--warmup", "nan"], "finite"),
        ([url, "--timeout", "inf"], "finite"),
        ([url, "--rate", "nan"], "finite"),
        ([url, "--progress-interval=-inf"], "finite"),
        ([url, "--task", "sha256", "--args", '{"rounds": 2}', "--body-file", str(body)], "?rounds=2"),
        ([url, "--server-pid", "99999999"], "no such process"),
        ([url, "--scenario", '[{"headers": [1, 2]}]'], "'headers' must be a JSON object"),
        ([url, "--scenario", '[{"headers": {"X-N": 1}}]'], "maps names to strings"),
        ([url, "--scenario", '[{"task": "burn", "weight": "3"}]'], "'weight' must be a number"),
        ([url, "--scenario", '[{"task": ["burn"]}]'], "'task' must be a string"),
        ([url, "--scenario", '[{"path": "/x", "body_file": "no-such.bin"}]'], "cannot read the body file"),
        ([url, "--scenario", str(tmp_path / "no-such.json")], "neither inline JSON nor a readable file"),
    ]
    for args, says in cases:
        done = run_loadtest("--duration", "0.2", "--quiet", *args, timeout=30)  # a later --duration wins
        assert done.returncode == 2, (args, done.stderr)
        assert "error:" in done.stderr and says in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr, args


def test_open_loop_that_falls_behind_stops_sending_on_time(server_factory, tmp_path):
    """At 10 million requests/s no client keeps up: it sends what it can until warm-up + duration, then
    stops, and counts what fell due but was never sent (before, it sent all 3 million, however late)."""
    server = server_factory("--workers", "1")
    rate, duration = 10_000_000, 0.3
    r = loadtest(server.url + "/healthz", "--rate", f"{rate}", "--duration", f"{duration}", "--timeout", "1",
                 out=tmp_path / "r.json", timeout=20)
    req = r["requests"]
    assert r["stopped_by"] == "duration" and r["elapsed_s"] == duration
    # every request due in the window, sent or not (give or take the one due at the very end: float time)
    assert req["sent"] + req["unsent"] == pytest.approx(rate * duration, abs=1)
    assert req["sent"] > 0 and req["unsent"] > 0
    assert req["ok"] + req["errors"] + req["unfinished"] == req["sent"]
    assert 0 < r["offered_rps"] < rate
    assert r["offered_rps"] == pytest.approx(rate * req["sent"] / (req["sent"] + req["unsent"]))
    assert any("could not keep up" in w and "offered load was lower" in w for w in r["warnings"])
    assert r["send_lag_ms"]["count"] > 0  # what it did send, it sent late (latencies run from the due times)


def test_an_open_loop_that_keeps_up_sends_everything(server_factory, tmp_path):
    server = server_factory("--workers", "1")
    # due at 0, 50, ..., 700 ms: 15 requests before the end at 705 ms (away from float rounding); 20/s
    # leaves 50 ms between requests, so even a loaded CI machine keeps up
    r = loadtest(server.url + "/healthz", "--rate", "20", "--duration", "0.5", "--warmup", "0.205",
                 out=tmp_path / "r.json")
    assert r["requests"]["sent"] == 15 and r["requests"]["unsent"] == 0
    assert r["offered_rps"] == 20
    assert not any("could not keep up" in w for w in r["warnings"])


def test_a_url_naming_an_endpoint_is_requested_as_given(server_factory, tmp_path):
    server = server_factory("--workers", "1")
    given = server.url + "/healthz?probe=1"
    r = loadtest(given, "--requests", "5", out=tmp_path / "r.json")
    assert r["status_counts"] == {"200": 5}
    assert r["per_request"]["GET /healthz?probe=1"]["url"] == given
    bare = loadtest(server.url, "--requests", "2", out=tmp_path / "bare.json")  # a bare base URL: "/"
    assert bare["per_request"]["GET /"]["url"] == server.url + "/"


def test_scenario_entries_with_a_body_are_posted(server_factory, tmp_path):
    """No 'method' and a body: POST, as --body-file (GET would be a 405). A relative body_file is
    read from the scenario file's folder, not from the current one."""
    server = server_factory("--workers", "1")
    folder = tmp_path / "scenario"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"hello")
    (folder / "mix.json").write_text(json.dumps({"requests": [
        {"name": "primes", "path": "/v1/tasks/primes", "json": {"limit": 10}},
        {"name": "hash", "path": "/v1/tasks/sha256?rounds=2", "body_file": "data.bin"},
        {"name": "echo", "path": "/v1/tasks/sha256", "body": "text"},
    ]}))
    r = loadtest(server.url, "--scenario", str(folder / "mix.json"), "--concurrency", "2", "--requests", "30",
                 out=tmp_path / "r.json")
    assert r["status_counts"] == {"200": 30}
    assert {name: per["method"] for name, per in r["per_request"].items()} == {
        "primes": "POST", "hash": "POST", "echo": "POST"}


def test_nothing_measured_and_nothing_succeeded_are_warned(server_factory, tmp_path):
    server = server_factory("--workers", "1")
    r = loadtest(server.url + "/healthz", "--rate", "200", "--warmup", "1", "--requests", "20",
                 out=tmp_path / "warm.json")
    assert r["requests"]["measured"] == 0 and r["requests"]["warmup"] == 20
    assert any(w.startswith("nothing was measured") for w in r["warnings"])
    done = run_loadtest(refused_url(), "--concurrency", "2", "--requests", "20", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr  # the run completed: its outcome is in the counts and warnings
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["client_errors"] == {"connect-failed": 20}  # a readable key, not aiohttp's class name
    assert any(w.startswith("none of the 20 measured requests succeeded") for w in r["warnings"])
    assert "WARNING: none of the 20" in done.stdout
    # the progress line counts finished requests, whatever their outcome: it does not call them responses
    assert "done/s" in done.stderr and "resp/s" not in done.stderr
    # 20 requests take milliseconds: too short a window to judge the client's CPU
    assert r["client_cpu"]["saturated"] is False and not any("of a core" in w for w in r["warnings"])
    assert r["machine_busy_cores"] >= 0


def test_client_cpu_is_judged_over_a_long_enough_window():
    from bench.loadtest import judge_client_cpu

    assert judge_client_cpu(0.0096, 0.01) == (pytest.approx(0.96), False)  # 20 requests in 10 ms
    assert judge_client_cpu(0.96, 1.0) == (pytest.approx(0.96), True)
    assert judge_client_cpu(0.3, 1.0) == (pytest.approx(0.3), False)
    assert judge_client_cpu(-1e-6, 1.0)[0] == 0.0


def test_json_is_always_valid_json():
    from bench.loadtest_cli import json_safe

    text = json.dumps(json_safe({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}}),
                      allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_a_closed_stdout_or_stderr_ends_quietly(tmp_path):
    """`procbridge loadtest ... | head -1`: the reader goes away; no BrokenPipeError traceback, the
    --json file still written, and the exit status of a process killed by SIGPIPE (141)."""
    out = tmp_path / "r.json"
    proc = subprocess.Popen([*LOADTEST, refused_url(), "--requests", "5", "--json", str(out), "--quiet"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before it writes anything
    err = proc.stderr.read()
    assert proc.wait(timeout=30) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
    assert json.loads(out.read_text())["requests"]["sent"] == 5
    # the progress line's reader gone (`2>&1 | head -1`): the run goes on and ends normally
    proc = subprocess.Popen([*LOADTEST, refused_url(), "--requests", "5", "--progress-interval", "0.01"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stderr.close()
    summary = proc.stdout.read()
    assert proc.wait(timeout=30) == 0
    assert "5 requests measured" in summary


def test_a_missing_dependency_gives_the_dev_hint():
    """scripts/loadtest.py run by a python3 without the dev lock: the hint, not an import traceback."""
    code = ("import runpy, sys; sys.modules['aiohttp'] = None; sys.argv = ['scripts/loadtest.py', 'http://127.0.0.1:1'];"
            " runpy.run_path('scripts/loadtest.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "aiohttp cannot be imported" in done.stderr and ".venv/bin/python scripts/loadtest.py" in done.stderr


def test_latency_runs_from_the_due_time_or_an_early_send():
    from bench.loadtest import OK, Recorder, RequestSpec

    rec = Recorder([RequestSpec("x", "GET", "http://127.0.0.1:1/")], t0=100.0, measure_from=100.0)
    rec.record(0, due=101.0, sent=101.5, end=102.0, status=200, slug=None, error=None, kind=OK)  # sent late
    rec.record(0, due=101.0, sent=100.9995, end=101.0015, status=200, slug=None, error=None, kind=OK)  # early
    assert list(rec.latencies) == [pytest.approx(1000.0), pytest.approx(2.0)]
    assert rec.ok_hist.get_total_count() == 2 and rec.lag_hist.get_total_count() == 1
