"""The service's life as an operator sees it: user task modules loaded from PROCBRIDGE_TASKS or
--tasks, liveness while every worker is busy, and shutdown on SIGTERM/SIGINT (drain, exit code 0,
no process and no /dev/shm segment left behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, ServerProcess, free_port, http, joined, post_json, run_in_thread, wait_for

SHM = Path("/dev/shm")


def workers(server: ServerProcess) -> list[dict[str, Any]]:
    return http("GET", server.url + "/v1/workers").json()["workers"]


def burn(server: ServerProcess, ms: float) -> Any:
    return post_json(server.url + "/v1/tasks/burn", {"ms": ms}, timeout=60)


# -- user task modules ----------------------------------------------------------------------------

USER_MODULE = "pb_e2e_user_tasks"
USER_SOURCE = '''
"""Tasks a user of procbridge might write."""

from collections import Counter
from typing import Literal

from workers import task


@task
def count_words(text: str, top: int = 3) -> dict:
    """Count the words of a text; return the `top` most common."""
    counts = Counter(text.lower().split())
    return dict(counts.most_common(top))


@task(name="scale")
def _scale_values(values: list[float], factor: float = 2.0, mode: Literal["mul", "add"] = "mul",
                  label: str | None = None) -> dict:
    out = [v * factor if mode == "mul" else v + factor for v in values]
    return {"values": out, "label": label}


@task
def byte_count(blob: bytes, skip: int = 0) -> int:
    return len(blob) - skip


@task
def reverse(blob: bytes) -> bytes:
    """Binary in, binary out."""
    return blob[::-1]
'''


@pytest.fixture
def user_modules(tmp_path: Path) -> Path:
    folder = tmp_path / "user_modules"
    folder.mkdir()
    (folder / f"{USER_MODULE}.py").write_text(textwrap.dedent(USER_SOURCE))
    return folder


def check_user_tasks(server: ServerProcess) -> None:
    tasks = {t["name"]: t for t in http("GET", server.url + "/v1/tasks").json()["tasks"]}
    assert {"primes", "burn", "sha256", "mandelbrot"} <= set(tasks)  # loaded beside the built-ins
    assert {"count_words", "scale", "byte_count"} <= set(tasks)
    assert "_scale_values" not in tasks

    count = tasks["count_words"]
    assert count["doc"].startswith("Count the words of a text")
    schema = count["params"]
    assert schema["type"] == "object"
    assert schema["required"] == ["text"]
    assert schema["properties"]["text"]["type"] == "string"
    assert schema["properties"]["top"]["type"] == "integer"
    assert schema["properties"]["top"]["default"] == 3

    scale = tasks["scale"]["params"]
    assert scale["required"] == ["values"]
    assert scale["properties"]["values"]["type"] == "array"
    assert scale["properties"]["values"]["items"]["type"] == "number"
    assert scale["properties"]["mode"]["enum"] == ["mul", "add"]
    assert {"type": "null"} in scale["properties"]["label"]["anyOf"]

    blob_arms = tasks["byte_count"]["params"]["properties"]["blob"]["anyOf"]  # UTF-8 text or {"base64": ...}
    assert [arm["type"] for arm in blob_arms] == ["string", "object"]

    reply = post_json(server.url + "/v1/tasks/count_words", {"text": "a b a c a b", "top": 2})
    assert reply.status == 200, reply.body
    assert reply.json()["task"] == "count_words"
    assert reply.json()["result"] == {"a": 3, "b": 2}
    reply = post_json(server.url + "/v1/tasks/scale", {"values": [1, 2.5], "mode": "add", "label": "x"})
    assert reply.status == 200, reply.body
    assert reply.json()["result"] == {"values": [3.0, 4.5], "label": "x"}
    bad = post_json(server.url + "/v1/tasks/scale", {"values": [1], "mode": "div"})
    assert bad.status == 422 and "mode" in bad.json()["detail"]
    reply = http("POST", server.url + "/v1/tasks/byte_count?skip=2", b"\x00" * 10,
                 {"Content-Type": "application/octet-stream"})
    assert reply.status == 200, reply.body
    assert reply.json()["result"] == 8

    blob = bytes(range(256)) + b"\x89PNG"
    reply = http("POST", server.url + "/v1/tasks/reverse", blob, {"Content-Type": "application/octet-stream"})
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/octet-stream"
    assert reply.body == blob[::-1]
    assert int(reply.headers["x-procbridge-worker"]) in {w["pid"] for w in workers(server)}

    doc = http("GET", server.url + "/openapi.json").json()
    assert "/v1/tasks/count_words" in doc["paths"]
    assert "/v1/tasks/scale" in doc["paths"]


def test_user_tasks_from_the_environment(server_factory, user_modules):
    server = server_factory("--workers", "2", env={"PROCBRIDGE_TASKS": USER_MODULE, "PYTHONPATH": str(user_modules)})
    check_user_tasks(server)


def test_user_tasks_from_the_flag(server_factory, user_modules):
    server = server_factory("--workers", "1", "--tasks", USER_MODULE, env={"PYTHONPATH": str(user_modules)})
    check_user_tasks(server)


def test_the_flag_wins_over_the_environment(server_factory, user_modules):
    server = server_factory(
        "--workers", "1", "--tasks", USER_MODULE,
        env={"PROCBRIDGE_TASKS": "no_such_module_anywhere", "PYTHONPATH": str(user_modules)},
    )
    assert post_json(server.url + "/v1/tasks/count_words", {"text": "x"}).status == 200


def test_a_tasks_module_that_cannot_be_imported_stops_the_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCBRIDGE_")}
    env["PROCBRIDGE_STORE"] = str(tmp_path / "jobs.db")
    proc = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", str(free_port()), "--workers", "1",
         "--tasks", "pb_e2e_missing_module"],
        cwd=ROOT, env=env, capture_output=True, timeout=60,
    )
    assert proc.returncode != 0
    assert b"pb_e2e_missing_module" in proc.stderr


# -- liveness under load --------------------------------------------------------------------------


def test_healthz_answers_while_every_worker_is_busy(server_factory):
    server = server_factory("--workers", "2")
    calls = [run_in_thread(burn, server, 1500) for _ in range(2)]
    wait_for(lambda: [w["state"] for w in workers(server)] == ["busy", "busy"], 10, what="both workers busy")
    health = http("GET", server.url + "/healthz", timeout=5)
    ready = http("GET", server.url + "/readyz", timeout=5)
    answered_at = time.time()
    assert health.status == 200 and health.json() == {"status": "ok"}
    assert ready.status == 200  # busy workers are alive workers
    results = [joined(*c).json()["result"] for c in calls]
    assert len({r["pid"] for r in results}) == 2
    # Both burns were seen running before the questions, and neither had ended when the answers came.
    assert all(answered_at < r["finished_at"] for r in results)
    assert http("GET", server.url + "/healthz").status == 200


# -- shutdown -------------------------------------------------------------------------------------


def shm_entries() -> set[str]:
    return set(os.listdir(SHM))


def mapped_by_anyone() -> set[str]:
    """Every /dev/shm name some live process has mapped (other test runs on this machine included)."""
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone, or not ours to read
            continue
        names.update(line.split("/dev/shm/", 1)[1].strip() for line in text.splitlines() if "/dev/shm/" in line)
    return names


def assert_no_new_shm(before: set[str]) -> None:
    """Nothing new in /dev/shm, ignoring segments that a live process (another test run on this
    machine, not the server we stopped) still has mapped."""
    new = shm_entries() - before
    if new:
        new -= mapped_by_anyone()
    assert new == set(), f"left in /dev/shm: {sorted(new)}"


def mapped_shm(server: ServerProcess) -> set[str]:
    """The /dev/shm segments the server process has mapped (its worker table)."""
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    return {line.split("/dev/shm/", 1)[1].strip() for line in maps.splitlines() if "/dev/shm/" in line}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_everything_cleanly(server_factory, sig):
    before = shm_entries()
    server = server_factory("--workers", "2")
    assert post_json(server.url + "/v1/tasks/primes", {"limit": 1000}).json()["result"] == 168
    ours = mapped_shm(server)
    assert ours, "the worker table should live in /dev/shm"
    assert ours <= shm_entries()
    processes = server.descendants()
    assert len(processes) >= 2  # the workers at least (and multiprocessing's helpers)
    assert server.stop(sig) == 0
    assert server.leftovers() == []
    assert not (ours & shm_entries()), "the worker table was left in /dev/shm"
    assert_no_new_shm(before)
    assert "procbridge stopped" in server.log()


def pending_tasks(server: ServerProcess) -> float | None:
    for line in http("GET", server.url + "/metrics").body.decode().splitlines():
        if line.startswith("procbridge_pending_tasks "):
            return float(line.split()[1])
    return None


def test_in_flight_call_finishes_and_new_work_is_refused_while_draining(server_factory):
    before = shm_entries()
    server = server_factory("--workers", "1", "--shutdown-grace", "10")
    in_flight = run_in_thread(burn, server, 2500)
    wait_for(lambda: any(w["state"] == "busy" for w in workers(server)), 10, what="the burn to be running")
    # A second call admitted before the signal waits for the busy worker: it is in flight too.
    queued = run_in_thread(post_json, server.url + "/v1/tasks/primes", {"limit": 100})
    wait_for(lambda: pending_tasks(server) == 1, 10, what="the second call to be queued")
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: http("GET", server.url + "/readyz", timeout=5).status == 503, 10, what="/readyz to turn 503")
    assert http("GET", server.url + "/readyz").json()["status"] == "draining"

    refused = post_json(server.url + "/v1/tasks/primes", {"limit": 10})
    assert refused.status == 503, refused.body
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"] == "/problems/draining"
    assert refused.headers.get("retry-after")
    refused_at = time.time()
    refused_binary = http("POST", server.url + "/v1/tasks/sha256", b"abc", {"Content-Type": "application/octet-stream"})
    assert refused_binary.status == 503 and refused_binary.json()["type"] == "/problems/draining"
    assert http("GET", server.url + "/healthz").status == 200  # the loop still runs
    assert server.proc.poll() is None  # still draining: the burn holds it open

    done = joined(*in_flight)
    assert done.status == 200, done.body
    assert done.json()["result"]["ms"] >= 2500
    assert done.json()["result"]["finished_at"] > refused_at  # it was still running during the refusals
    waited = joined(*queued)
    assert waited.status == 200, waited.body
    assert waited.json()["result"] == 25
    assert server.proc.wait(30) == 0  # the one SIGTERM was enough
    assert server.leftovers() == []
    assert_no_new_shm(before)


def test_work_still_running_when_the_grace_ends_is_stopped(server_factory):
    before = shm_entries()
    server = server_factory("--workers", "1", "--shutdown-grace", "0.5")
    in_flight = run_in_thread(burn, server, 60_000)
    wait_for(lambda: any(w["state"] == "busy" for w in workers(server)), 10, what="the burn to be running")
    server.proc.send_signal(signal.SIGTERM)
    cut = joined(*in_flight)
    assert cut.status == 503, cut.body
    assert cut.json()["type"] == "/problems/draining"
    assert server.proc.wait(30) == 0
    assert server.leftovers() == []
    assert_no_new_shm(before)


def test_a_second_signal_cuts_the_grace_short(server_factory):
    server = server_factory("--workers", "1", "--shutdown-grace", "60")
    in_flight = run_in_thread(burn, server, 60_000)
    wait_for(lambda: any(w["state"] == "busy" for w in workers(server)), 10, what="the burn to be running")
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: http("GET", server.url + "/readyz", timeout=5).status == 503, 10, what="draining")
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(30) == 0  # long before the 60 s grace or the 60 s burn
    cut = joined(*in_flight)
    assert cut.status == 503 and cut.json()["type"] == "/problems/draining"
    assert server.leftovers() == []


GATED_MODULE = "pb_e2e_gated_tasks"
GATED_SOURCE = '''
"""A pool that takes its time to start: the preload (PB_E2E_PHASE=preload) or each worker's start hook
(PB_E2E_PHASE=worker) waits (up to 30 s) for a gate file."""

import os
import time
from pathlib import Path

from workers import on_worker_start, preload, task


def _wait_for_gate(phase: str) -> None:
    if os.environ["PB_E2E_PHASE"] == phase:
        gate = Path(os.environ["PB_E2E_GATE"])
        (gate.parent / f"waiting-{os.getpid()}").touch()
        deadline = time.monotonic() + 30
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)


@preload
def slow_model() -> None:
    _wait_for_gate("preload")


@on_worker_start
def slow_connection() -> None:
    _wait_for_gate("worker")


@task
def hello() -> str:
    return "hi"
'''


@pytest.mark.parametrize(("sig", "phase", "waiting"), [
    (signal.SIGTERM, "worker", 2), (signal.SIGINT, "worker", 2), (signal.SIGTERM, "preload", 1),
], ids=["SIGTERM-in-on_worker_start", "SIGINT-in-on_worker_start", "SIGTERM-in-preload"])
def test_a_signal_while_the_workers_start_still_stops_cleanly(tmp_path, sig, phase, waiting):
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / f"{GATED_MODULE}.py").write_text(GATED_SOURCE)
    gates = tmp_path / "gates"
    gates.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCBRIDGE_")}
    env.update({"PROCBRIDGE_STORE": str(tmp_path / "jobs.db"), "PYTHONPATH": str(modules),
                "PB_E2E_GATE": str(gates / "open"), "PB_E2E_PHASE": phase, "PYTHONUNBUFFERED": "1"})
    before = shm_entries()
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(port), "--workers", "2", "--tasks", GATED_MODULE],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    server = ServerProcess(port, proc, log_path)
    try:
        wait_for(lambda: len(list(gates.glob("waiting-*"))) == waiting, 30, what=f"the {phase} hooks to be waiting")
        server.descendants()
        proc.send_signal(sig)
        wait_for(lambda: "draining" in server.log() or proc.poll() is not None, 10, what="the signal to be handled")
        assert proc.poll() is None, f"the signal killed the starting server:\n{server.log()}"
        (gates / "open").touch()
        assert proc.wait(30) == 0, server.log()
        assert server.leftovers() == []
        assert_no_new_shm(before)
    finally:
        (gates / "open").touch()
        server.kill_all()
