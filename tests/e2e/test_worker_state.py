"""Worker state as an operator sees it, on the real server: `@preload` runs once in the worker parent
(never in the HTTP process, never again for a replacement) and its memory is shared; each worker runs
`@on_worker_start`; /healthz answers while the workers start; hooks that raise; task output in the
service's own log; a SIGTERM to the whole process group drains; what a SIGKILL of the group leaves
in /dev/shm is removed by the next start. The hooks are in tests/support/state_tasks.py and record
the pid of every process they run in, so each claim is checked from outside."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import ServerProcess, http, joined, post_json, run_in_thread, start_server, wait_for

TASKS = ("--tasks", "tests.support.state_tasks")
MIB = 1024 * 1024
SHM = Path("/dev/shm")


def _pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _state_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"STATE_PRELOAD_LOG": str(tmp_path / "preload.pids"), "STATE_WORKER_LOG": str(tmp_path / "worker.pids"),
            **extra}


def _workers(server: ServerProcess) -> dict[str, Any]:
    reply = http("GET", server.url + "/v1/workers")
    assert reply.status == 200, reply
    body: dict[str, Any] = reply.json()
    return body


def _private_bytes(pid: int) -> int:
    """Private_Clean + Private_Dirty of a process, read here from /proc (not from the service)."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


def _stopped_cleanly(server: ServerProcess, sig: int = signal.SIGTERM) -> None:
    assert server.stop(sig, timeout=30) == 0, server.log()
    wait_for(lambda: not server.leftovers(), 10, what="every process of the service to be gone")


# -- the preload: once, outside the HTTP process, shared ------------------------------------------------


def test_preload_runs_once_in_the_worker_parent_and_its_memory_is_shared_not_copied(tmp_path: Path) -> None:
    small_env = _state_env(tmp_path / "small", STATE_MIB="1")
    small = start_server(tmp_path / "small", *TASKS, "--workers", "2", env=small_env)
    try:
        post_json(small.url + "/v1/tasks/table_sum", {})
        http_rss_without = psutil.Process(small.proc.pid).memory_info().rss
    finally:
        _stopped_cleanly(small)
    (tmp_path / "big").mkdir()
    env = _state_env(tmp_path / "big", STATE_MIB="200")
    server = start_server(tmp_path / "big", *TASKS, "--workers", "2", env=env)
    try:
        listing = _workers(server)
        worker_pids = {w["pid"] for w in listing["workers"]}
        parent_pid = listing["parent"]["pid"]
        preloads = _pids(tmp_path / "big" / "preload.pids")
        assert preloads == [parent_pid], f"the preload ran in {preloads}, not once in the parent {parent_pid}"
        assert parent_pid != server.proc.pid and parent_pid not in worker_pids
        started = sorted(_pids(tmp_path / "big" / "worker.pids"))
        assert started == sorted(worker_pids), "on_worker_start: once in each worker"
        # every worker reads every page of the 200 MiB array
        for _ in range(4):
            reply = post_json(server.url + "/v1/tasks/table_sum", {})
            assert reply.status == 200 and reply.json()["result"]["sum"] == 200 * MIB / 8, reply
        http_rss_with = psutil.Process(server.proc.pid).memory_info().rss
        assert http_rss_with - http_rss_without < 50 * MIB, (
            f"the HTTP process grew by {(http_rss_with - http_rss_without) / MIB:.0f} MiB with a 200 MiB preload"
        )
        listing = _workers(server)
        for w in listing["workers"]:
            own = _private_bytes(w["pid"])
            assert own < 50 * MIB, f"worker {w['pid']} holds {own / MIB:.0f} MiB of its own: the preload was copied"
            assert w["rss_bytes"] > 200 * MIB > w["private_bytes"], w  # it maps the array, shared
            assert abs(w["private_bytes"] - own) < 20 * MIB, (w, own)
        # PSS divides each shared page among the processes mapping it: one copy in all, not three
        total_pss = listing["parent"]["pss_bytes"] + sum(w["pss_bytes"] for w in listing["workers"])
        assert 200 * MIB < total_pss < 300 * MIB, f"{total_pss / MIB:.0f} MiB of PSS for a 200 MiB preload"
    finally:
        _stopped_cleanly(server)


def test_a_sigkilled_worker_is_replaced_from_the_warm_parent_without_the_preload_but_with_on_worker_start(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path, *TASKS, "--workers", "2", env=_state_env(tmp_path))
    try:
        before = {w["pid"] for w in _workers(server)["workers"]}
        victim = min(before)
        os.kill(victim, signal.SIGKILL)

        def replaced() -> set[int] | None:
            workers = _workers(server)["workers"]
            pids = {w["pid"] for w in workers}
            idle = all(w["state"] == "idle" for w in workers)
            return pids if victim not in pids and None not in pids and idle else None

        after = wait_for(replaced, 30, what="the killed worker's replacement to be idle")
        (new,) = after - before
        assert len(_pids(tmp_path / "preload.pids")) == 1, "the preload ran again for the replacement"
        assert sorted(_pids(tmp_path / "worker.pids")) == sorted(before | {new}), "on_worker_start: once per worker"
        reply = post_json(server.url + "/v1/tasks/table_sum", {})
        assert reply.status == 200, reply
    finally:
        _stopped_cleanly(server)


# -- starting: /healthz at once, /readyz `starting`, hooks that fail ---------------------------------


def test_healthz_answers_while_the_preload_runs_and_readyz_says_starting_until_a_worker_is_ready(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "preload.gate"
    server = start_server(tmp_path, *TASKS, "--workers", "1", env=_state_env(tmp_path, STATE_PRELOAD_GATE=str(gate)),
                          wait_ready=False)
    try:
        wait_for(lambda: _pids(tmp_path / "preload.pids"), 30, what="the preload to begin")

        def health() -> int | None:
            try:
                return http("GET", server.url + "/healthz", timeout=2).status
            except OSError:
                return None

        assert wait_for(health, 30, what="/healthz to answer") == 200
        ready = http("GET", server.url + "/readyz")
        assert ready.status == 503 and ready.json()["reason"] == "starting", ready
        call = run_in_thread(post_json, server.url + "/v1/tasks/table_sum", {})  # waits for the workers
        job = post_json(server.url + "/v1/jobs", {"task": "table_sum", "args": {}})  # waits in the store
        assert job.status == 202, job
        gate.touch()
        wait_for(lambda: http("GET", server.url + "/readyz").status == 200, 30, what="/readyz to turn 200")
        reply = joined(*call)
        assert reply.status == 200, reply
        done = wait_for(lambda: (j := http("GET", server.url + job.headers["location"]).json())["status"]
                        == "succeeded" and j, 30, what="the job submitted while starting to succeed")
        assert done["result"]["sum"] == 8 * MIB / 8, done
    finally:
        _stopped_cleanly(server)


def test_an_on_worker_start_hook_that_raises_is_logged_backed_off_and_shown_by_readyz_while_healthz_stays_up(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path, *TASKS, "--workers", "2", env=_state_env(tmp_path, STATE_WORKER_FAIL="1"),
                          wait_ready=False)
    try:
        def readiness() -> dict[str, Any] | None:
            try:
                reply = http("GET", server.url + "/readyz", timeout=2)
            except OSError:
                return None
            body: dict[str, Any] = reply.json()
            return body if reply.status == 503 and body.get("reason") == "worker-start-failed" else None

        body = wait_for(readiness, 30, what="/readyz to say the workers cannot start")
        assert "tests.support.state_tasks.record_worker" in body["detail"], body
        assert "ConnectionError" in body["detail"], body
        assert http("GET", server.url + "/healthz").status == 200
        # retried with the back-off: more attempts than workers, and the back-off is logged
        wait_for(lambda: len(_pids(tmp_path / "worker.pids")) > 4, 60, what="the start to be retried")
        wait_for(lambda: "keep crashing" in server.log(), 60, what="the back-off to be logged")
        log = server.log()
        assert "Traceback" in log and "ConnectionError: the database at db:5432 refused the connection" in log
    finally:
        _stopped_cleanly(server)


def test_a_preload_that_raises_stops_the_start_with_exit_1_and_one_line_naming_the_hook(tmp_path: Path) -> None:
    server = start_server(tmp_path, *TASKS, env=_state_env(tmp_path, STATE_PRELOAD_FAIL="1"), wait_ready=False)
    try:
        assert server.proc.wait(60) == 1, server.log()
        wait_for(lambda: not server.leftovers(), 10, what="every process of the service to be gone")
        last = server.log().strip().splitlines()[-1]
        assert re.search(
            r"cannot start: preload hook tests\.support\.state_tasks\.table raised ValueError: no model file", last
        ), last
        assert "Traceback" in server.log()  # the hook's own traceback, above
    finally:
        server.kill_all()
    assert not [n for n in os.listdir(SHM) if n.startswith(f"pb_{server.proc.pid}_")], "a segment was left"


def test_a_preload_past_the_worker_start_timeout_stops_the_start_with_exit_1(tmp_path: Path) -> None:
    gate = tmp_path / "never-opened"
    server = start_server(tmp_path, *TASKS, "--worker-start-timeout", "1",
                          env=_state_env(tmp_path, STATE_PRELOAD_GATE=str(gate)), wait_ready=False)
    try:
        assert server.proc.wait(60) == 1, server.log()
        wait_for(lambda: not server.leftovers(), 10, what="every process of the service to be gone")
        last = server.log().strip().splitlines()[-1]
        assert "did not finish within 1 s (--worker-start-timeout)" in last, last
        assert _pids(tmp_path / "worker.pids") == [], "no worker starts without its preloads"
    finally:
        gate.touch()
        server.kill_all()


# -- task output ---------------------------------------------------------------------------------------


def test_task_output_is_logged_with_pid_and_task_on_stderr_and_never_reaches_the_access_log(tmp_path: Path) -> None:
    server = start_server(tmp_path, *TASKS, "--workers", "1", env=_state_env(tmp_path), split_logs=True)
    try:
        out = post_json(server.url + "/v1/tasks/chatter", {"lines": 3, "stream": "stdout"})
        err = post_json(server.url + "/v1/tasks/chatter", {"lines": 2, "stream": "stderr"})
        assert out.status == err.status == 200
        pid = out.json()["worker"]
        wait_for(lambda: "line 1" in server.errors() and server.errors().count("(chatter)") >= 5, 30,
                 what="the task's lines in the service's log")
        logged = [line for line in server.errors().splitlines() if "xxxxxxxx" in line]
        assert len(logged) == 5, logged
        for line in logged:
            assert f"worker {pid} (chatter)" in line, line
        assert sum(" stdout: line " in line for line in logged) == 3
        assert sum(" stderr: line " in line for line in logged) == 2
        parent = _workers(server)["parent"]["pid"]
        assert f"worker {parent} (preload) stdout: loading the table in {parent}" in server.errors()
        for line in server.log().splitlines():  # stdout: the access log, JSON only
            assert isinstance(json.loads(line), dict), line
    finally:
        _stopped_cleanly(server)


def test_a_task_printing_100_mb_leaves_the_service_memory_bounded_and_counts_the_dropped_lines(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path, *TASKS, "--workers", "1", "--access-log", "off", env=_state_env(tmp_path),
                          split_logs=True)
    try:
        post_json(server.url + "/v1/tasks/chatter", {"lines": 10})
        rss_before = psutil.Process(server.proc.pid).memory_info().rss
        reply = post_json(server.url + "/v1/tasks/chatter", {"lines": 100_000, "width": 1000}, timeout=120)
        assert reply.status == 200 and reply.json()["result"] == 100_000, reply

        def dropped() -> float:
            text = http("GET", server.url + "/metrics").body.decode()
            found = re.findall(r'^procbridge_task_output_lines_total\{.*outcome="dropped".*\} ([0-9.e+]+)$', text, re.M)
            return sum(float(v) for v in found)

        assert wait_for(dropped, 30, what="dropped lines to be counted") > 0
        rss_after = psutil.Process(server.proc.pid).memory_info().rss
        assert rss_after - rss_before < 30 * MIB, f"the service grew by {(rss_after - rss_before) / MIB:.0f} MiB"
        assert "dropped" in server.errors()  # and said so in its log
    finally:
        _stopped_cleanly(server)


# -- signals to the whole process group ----------------------------------------------------------------


def test_sigterm_to_the_whole_process_group_drains_the_call_in_flight_and_exits_0(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--tasks", "tests.support.fault_tasks", "--workers", "1", new_session=True)
    marker, release = tmp_path / "started", tmp_path / "release"
    try:
        call = run_in_thread(
            post_json, server.url + "/v1/tasks/mark_then_wait", {"path": str(marker), "release": str(release)}
        )
        wait_for(marker.exists, 30, what="the call to be running")
        server.descendants()
        os.killpg(server.proc.pid, signal.SIGTERM)  # as systemd's stop, `kill -- -PGID` and `timeout` do
        wait_for(lambda: http("GET", server.url + "/readyz").status == 503, 30, what="the drain to begin")
        release.touch()
        reply = joined(*call)
        assert reply.status == 200 and reply.json()["result"]["released"] is True, reply
        assert server.proc.wait(30) == 0, server.log()
        wait_for(lambda: not server.leftovers(), 10, what="every process of the service to be gone")
    finally:
        server.kill_all()
    assert not [n for n in os.listdir(SHM) if n.startswith(f"pb_{server.proc.pid}_")], "a segment was left"


def test_after_a_sigkill_of_the_whole_group_the_next_start_removes_the_segments_left_behind(tmp_path: Path) -> None:
    first = start_server(tmp_path / "first", "--workers", "1", new_session=True)
    other = start_server(tmp_path / "other", "--workers", "1")  # a live service: its segments stay
    try:
        first.descendants()
        os.killpg(first.proc.pid, signal.SIGKILL)  # nothing can clean up after this
        first.proc.wait(10)
        wait_for(lambda: not first.leftovers(), 10, what="the workers to die with their parent")
        left = [n for n in os.listdir(SHM) if n.startswith(f"pb_{first.proc.pid}_")]
        assert any(n.endswith("_table") for n in left), f"expected the worker table in /dev/shm, found {left}"
        others = {n for n in os.listdir(SHM) if n.startswith(f"pb_{other.proc.pid}_")}
        assert others, "the live service has a worker table"
        second = start_server(tmp_path / "second", "--workers", "1")
        try:
            assert not [n for n in os.listdir(SHM) if n.startswith(f"pb_{first.proc.pid}_")]
            assert others <= set(os.listdir(SHM)), "a live service's segments were removed"
            assert "left in /dev/shm by a procbridge that was killed" in second.log()
        finally:
            _stopped_cleanly(second)
    finally:
        first.kill_all()
        _stopped_cleanly(other)
