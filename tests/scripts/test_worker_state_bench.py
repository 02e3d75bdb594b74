"""scripts/worker_state_bench.py with tiny settings, end to end on the real server: its JSON has every
figure, the figures relate as they must (a replacement is a new pid, idle after its on_worker_start
ran; the preload ran once, in the worker parent; workers share the model rather than copy it), and it
leaves no process behind. No figure is compared with a time bound: the run is too short to mean
anything, and the machine is shared."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "worker_state_bench.py"
MIB = 1024 * 1024
WORKERS, KILLS, MODEL_MIB = 2, 2, 32
SPREAD = {"min", "median", "p90", "max"}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("wsb") / "out.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--workers", str(WORKERS), "--mib", str(MODEL_MIB), "--preload-seconds", "0",
         "--kills", str(KILLS), "--calls", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "checks: all passed" in done.stdout
    assert "kill -> new pid idle" in done.stdout
    data: dict = json.loads(out.read_text())
    return data


def test_every_check_passed_and_nothing_is_left(result: dict) -> None:
    assert result["ok"] is True
    for name in ("baseline", "preload"):
        run = result[name]
        assert run["checks"] and all(run["checks"].values()), run["checks"]
        assert run["exit_code"] == 0 and run["leftovers"] == [] and run["backoff_warnings"] == 0
        pids = [run["server_pid"], run["parent_pid"], *(k["pid"] for k in run["kills"])]
        assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_the_preload_ran_once_in_the_parent_and_on_worker_start_once_per_worker(result: dict) -> None:
    s = result["summary"]
    assert s["preload_runs"] == 1
    assert s["worker_start_runs"] == s["workers_ever"] == WORKERS + KILLS
    run = result["preload"]
    assert run["preload_pids"] == [run["parent_pid"]] != [run["server_pid"]]
    assert run["memory"]["parent"]["pid"] == run["parent_pid"]
    assert run["mib"] == MODEL_MIB and run["preload_ran_s"] >= 0


def test_startup_figures_are_in_order(result: dict) -> None:
    for name in ("baseline", "preload"):
        assert 0 < result[name]["healthz_ms"] <= result[name]["readyz_ms"]
    s = result["summary"]
    assert s["healthz_ms"] == result["preload"]["healthz_ms"]
    assert s["baseline_readyz_ms"] == result["baseline"]["readyz_ms"]


def test_each_kill_is_replaced_by_a_new_pid_that_ran_its_hook_before_it_was_listed_idle(result: dict) -> None:
    for name in ("baseline", "preload"):
        run = result[name]
        kills = run["kills"]
        assert len(kills) == KILLS
        assert len({k["pid"] for k in kills} | {k["victim"] for k in kills}) == 2 * KILLS
        assert [k["slot"] for k in kills] == [i % WORKERS for i in range(KILLS)]
        for k in kills:
            assert k["victim"] != k["pid"]
            assert k["dead_ms"] > 0 and 0 < k["hook_ms"] <= k["listed_ms"] <= k["idle_ms"], k
            assert k["polls"] >= 1 and k["poll_ms"] > 0
        for key, spread in run["replacement"].items():
            assert set(spread) == SPREAD, key
            assert 0 < spread["min"] <= spread["median"] <= spread["p90"] <= spread["max"], (key, spread)
    assert result["summary"]["replacement_idle_ms"] == result["preload"]["replacement"]["idle_ms"]


def test_memory_is_read_from_proc_for_every_process_and_the_model_is_shared(result: dict) -> None:
    model = MODEL_MIB * MIB
    for name in ("baseline", "preload"):
        for when in ("memory", "memory_after_kills"):
            mem = result[name][when]
            assert mem["http"]["psutil_rss_bytes"] > 0 and mem["http"]["pss_bytes"] > 0
            procs = [mem["parent"], *mem["workers"]]
            assert len(mem["workers"]) == WORKERS
            for p in procs:
                assert p["rss_bytes"] >= p["pss_bytes"] >= p["private_bytes"] > 0, p
                assert set(p["reported"]) == {"rss_bytes", "private_bytes", "pss_bytes"}
                assert all(v is not None and v > 0 for v in p["reported"].values()), p
            assert mem["pool_pss_bytes"] == sum(p["pss_bytes"] for p in procs)
    big = result["preload"]["memory"]
    assert big["pool_pss_bytes"] > model, "one copy of the model is in the pool's PSS"
    for w in big["workers"]:
        assert w["rss_bytes"] > model > w["private_bytes"], "each worker maps the model without copying it"
    s = result["summary"]
    assert s["model_bytes"] == model
    assert s["http_rss_delta_bytes"] == s["http_rss_bytes"] - s["baseline_http_rss_bytes"]
    assert s["pool_pss_delta_bytes"] == s["pool_pss_bytes"] - s["baseline_pool_pss_bytes"] > 0
    assert s["worker_private_bytes_max"] == max(w["private_bytes"] for w in big["workers"])
