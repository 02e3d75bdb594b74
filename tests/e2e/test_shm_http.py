"""Large binary payloads through shared memory, end to end against the real server: bodies read from
the socket straight into a segment, results streamed from the segment they were written into, and
/dev/shm checked for real after every way a call can end (success, a client that hangs up while
uploading or downloading, shutdown) and when shared memory is too small (the pipe takes over).

Only this server's names are looked at: they start with `pb_<server pid>_` (other test processes may
use /dev/shm at the same time)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import hashlib
import http.client as httplib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, http, metric, post_json, start_server, wait_for

TASKS = ("--tasks", "tests.support.shm_tasks")
OCTET = {"Content-Type": "application/octet-stream"}
SHM = Path("/dev/shm")
MIB = 1024 * 1024


def shm_of(server: ServerProcess) -> set[str]:
    return {p.name for p in SHM.glob(f"pb_{server.proc.pid}_*")}


def leased(server: ServerProcess) -> float:
    return metric(server, "procbridge_shm_segments", 'state="leased"')


def only_table_and_free(server: ServerProcess) -> bool:
    """Nothing leased, and /dev/shm holds this server's table and its free segments, nothing else."""
    names = shm_of(server)
    tables = {n for n in names if n.endswith("_table")}
    free = metric(server, "procbridge_shm_segments", 'state="free"')
    return leased(server) == 0 and len(tables) == 1 and len(names - tables) == free


def post_binary(
    server: ServerProcess, path: str, body: bytes, timeout: float = 120
) -> tuple[int, dict[str, str], bytes]:
    conn = httplib.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=OCTET)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def stop_and_check(server: ServerProcess) -> None:
    assert server.stop() == 0, server.log()
    assert shm_of(server) == set(), f"left in /dev/shm: {sorted(shm_of(server))}"


def test_a_128_mib_body_is_hashed_and_a_10_mib_echo_comes_back_identical(server_factory):
    server = server_factory("--workers", "1", "--max-body", "200MiB", *TASKS)
    big = os.urandom(128 * MIB)
    status, _, body = post_binary(server, "/v1/tasks/sha256", big)
    assert status == 200, body[:500]
    assert json.loads(body)["result"] == hashlib.sha256(big).hexdigest()
    status, _, body = post_binary(server, "/v1/tasks/describe", big)
    seen = json.loads(body)["result"]
    assert (seen["type"], seen["readonly"], seen["size"]) == ("memoryview", True, len(big))
    assert seen["sha256"] == hashlib.sha256(big).hexdigest()
    del big
    data = os.urandom(10 * MIB)
    conn = httplib.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        for _ in range(3):  # one kept-alive connection: a streamed answer leaves it usable
            conn.request("POST", "/v1/tasks/echo_bytes", body=data, headers=OCTET)
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            assert resp.status == 200 and resp.read() == data
            assert headers["content-type"] == "application/octet-stream"
            assert int(headers["content-length"]) == len(data) and int(headers["x-procbridge-worker"]) > 0
    finally:
        conn.close()
    assert metric(server, "procbridge_large_payloads_total", 'direction="in",path="shm"') == 5
    assert metric(server, "procbridge_large_payloads_total", 'direction="out",path="shm"') == 3
    assert metric(server, "procbridge_large_payloads_total", 'direction="in",path="pipe"') == 0
    wait_for(lambda: only_table_and_free(server), 5, what="every segment to be released")
    stop_and_check(server)


def test_concurrent_binary_calls_each_get_their_own_bytes(server_factory):
    server = server_factory("--workers", "2", *TASKS)
    blobs = [os.urandom(MIB + 7919 * i) for i in range(12)]
    with cf.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda b: post_binary(server, "/v1/tasks/echo_copy", b), blobs * 2))
    assert [r[2] for r in replies] == blobs * 2
    wait_for(lambda: only_table_and_free(server), 5, what="every segment to be released")
    stop_and_check(server)


def test_a_client_that_hangs_up_mid_upload_or_mid_download_leaves_no_segment(server_factory):
    server = server_factory("--workers", "1", *TASKS)
    upload = os.urandom(50 * MIB)
    assert post_binary(server, "/v1/tasks/describe", upload)[0] == 200  # the segment a 50 MiB body needs
    before = shm_of(server)
    # upload: the body is being read into a segment when the client goes away
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/tasks/echo_bytes HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % (50 * MIB))
        sock.sendall(os.urandom(8 * MIB))
        wait_for(lambda: leased(server) == 1, 10, what="the body to be read into a segment")
    wait_for(lambda: only_table_and_free(server), 10, what="the upload's segment to be released")
    assert shm_of(server) == before
    # download: the result is being streamed from its segment when the client goes away
    data = os.urandom(48 * MIB)
    assert post_binary(server, "/v1/tasks/echo_bytes", data)[2] == data  # the segments this needs
    before = shm_of(server)
    out_before = metric(server, "procbridge_large_payloads_total", 'direction="out",path="shm"')
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"POST /v1/tasks/echo_bytes HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(data) + data)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        wait_for(lambda: metric(server, "procbridge_large_payloads_total", 'direction="out",path="shm"')
                 == out_before + 1, 10, what="the result to be in a segment")
    wait_for(lambda: only_table_and_free(server), 10, what="the result's segment to be released")
    assert shm_of(server) == before
    # and the service is fine
    status, _, body = post_binary(server, "/v1/tasks/echo_bytes", data[: 2 * MIB])
    assert status == 200 and body == data[: 2 * MIB]
    stop_and_check(server)


def test_map_and_jobs_carry_binary_results_through_segments(server_factory):
    server = server_factory("--workers", "2", *TASKS)
    reply = post_json(server.url + "/v1/tasks/make_bytes/map",
                      {"items": [{"size": MIB, "fill": 1}, {"size": 5}, {"size": 3 * MIB, "fill": 2}]})
    assert reply.status == 200
    lines = [json.loads(line) for line in reply.body.splitlines()]
    assert [base64.b64decode(line["result"]) for line in lines] == [b"\x01" * MIB, b"\x07" * 5, b"\x02" * 3 * MIB]
    job = post_json(server.url + "/v1/jobs", {"task": "make_bytes", "args": {"size": 2 * MIB, "fill": 3}}).json()
    wait_for(lambda: http("GET", f"{server.url}/v1/jobs/{job['id']}").json()["status"] == "succeeded", 20,
             what="the job to finish")
    result = http("GET", f"{server.url}/v1/jobs/{job['id']}/result")
    assert result.status == 200 and result.body == b"\x03" * 2 * MIB
    assert metric(server, "procbridge_large_payloads_total", 'direction="out",path="shm"') == 3
    wait_for(lambda: only_table_and_free(server), 5, what="every segment to be released")
    stop_and_check(server)


def test_too_little_shared_memory_falls_back_to_the_pipe_with_a_warning(server_factory):
    # A small /dev/shm cannot be made here without a mount namespace: make the service believe it
    # has 1 MiB (the documented knob), which is what a 64 MB Docker /dev/shm is to 100 MiB payloads.
    server = server_factory("--workers", "1", *TASKS, env={"PROCBRIDGE_SHM_BUDGET": "1MiB"})
    assert "shm_size" in server.log(), "the start-up warning names the fix"
    data = os.urandom(10 * MIB)
    status, _, body = post_binary(server, "/v1/tasks/sha256", data)
    assert status == 200 and json.loads(body)["result"] == hashlib.sha256(data).hexdigest()
    status, _, body = post_binary(server, "/v1/tasks/echo_bytes", data)
    assert status == 200 and body == data
    assert metric(server, "procbridge_large_payloads_total", 'direction="in",path="pipe"') == 2
    assert metric(server, "procbridge_large_payloads_total", 'direction="out",path="pipe"') == 1
    assert metric(server, "procbridge_large_payloads_total", 'direction="in",path="shm"') == 0
    assert {n for n in shm_of(server) if not n.endswith("_table")} == set()
    assert metric(server, "procbridge_shm_budget_bytes") == MIB
    stop_and_check(server)


def test_the_worker_table_shows_when_the_running_task_started(server_factory):
    server = server_factory("--workers", "1")
    with cf.ThreadPoolExecutor(1) as pool:
        before = time.time()
        call = pool.submit(post_json, server.url + "/v1/tasks/burn", {"ms": 1500})

        def busy_row() -> dict[str, object] | None:
            rows = http("GET", server.url + "/v1/workers").json()["workers"]
            return next((r for r in rows if r["state"] == "busy"), None)

        row = wait_for(busy_row, 10, what="the worker to be busy")
        assert isinstance(row["task_started_at"], float)
        assert before - 0.5 <= row["task_started_at"] <= time.time() + 0.5
        gauge = metric(server, "procbridge_worker_task_started_at_seconds", f'slot="{row["slot"]}"')
        assert abs(gauge - row["task_started_at"]) < 0.01
        assert metric(server, "procbridge_worker_cpu_seconds_total", f'slot="{row["slot"]}"') >= 0
        assert call.result().status == 200
    rows = http("GET", server.url + "/v1/workers").json()["workers"]
    assert all(r["task_started_at"] is None for r in rows if r["state"] == "idle")
    assert "procbridge_worker_task_started_at_seconds{" not in http("GET", server.url + "/metrics").body.decode()
    stop_and_check(server)


def test_shutdown_with_segments_in_use_leaves_nothing(server_factory, tmp_path):
    server = server_factory("--workers", "1", "--shutdown-grace", "0.5", *TASKS)
    marker = tmp_path / "holding"
    data = os.urandom(4 * MIB)
    with cf.ThreadPoolExecutor(1) as pool, socket.create_connection(("127.0.0.1", server.port)) as uploading:
        # a call whose worker holds a view of its segment...
        held = pool.submit(post_binary, server, f"/v1/tasks/hold?marker={marker}", data)
        wait_for(lambda: marker.exists() and marker.read_text(), 10, what="the task to hold its segment")
        # ...and a body half-way into another segment
        uploading.sendall(b"POST /v1/tasks/echo_bytes HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                          b"Content-Length: %d\r\n\r\n" % (40 * MIB) + data)
        wait_for(lambda: leased(server) == 2, 10, what="both segments to be leased")
        assert len(shm_of(server)) >= 3
        stop_and_check(server)  # exit code 0, and no name of this server left in /dev/shm
        status, _, body = held.result()
        assert status == 503 and json.loads(body)["type"] == "/problems/draining"


# -- a real small /dev/shm (a tmpfs in a private mount namespace; needs root and unshare) ----------------


def can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True,
    )
    return probe.returncode == 0


def start_in_small_shm(tmp_path: Path, size: str, *args: str) -> ServerProcess:
    """The server in its own mount namespace whose /dev/shm is a tmpfs of `size` (Docker's is 64 MB)."""
    script = f'mount -t tmpfs -o size={size},mode=1777 tmpfs /dev/shm && exec "$0" "$@"'
    return start_server(tmp_path, *args, prefix=("unshare", "--mount", "--propagation", "private", "sh", "-c", script))


@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare for a private /dev/shm")
def test_a_small_dev_shm_that_fills_up_never_breaks_the_service(tmp_path):
    server = start_in_small_shm(tmp_path, "16m", "--workers", "1", *TASKS)
    try:
        inside = Path(f"/proc/{server.proc.pid}/root/dev/shm")  # the server's /dev/shm, seen from here
        log = server.log()
        assert "shm_size" in log and "12.0 MiB of shared memory" in log, log  # 3/4 of the 16 MiB free
        # Something else fills /dev/shm after start-up: the budget still says yes, the kernel says no.
        # Reserving the segment (fallocate) fails with ENOSPC and the payload goes through the pipe,
        # where writing into a segment the tmpfs cannot back would have killed the service (SIGBUS).
        filler = inside / "filler"
        filler.write_bytes(b"\1" * 12 * MIB)
        data = os.urandom(6 * MIB)
        status, _, body = post_binary(server, "/v1/tasks/sha256", data)
        assert status == 200 and json.loads(body)["result"] == hashlib.sha256(data).hexdigest()
        status, _, body = post_binary(server, "/v1/tasks/echo_bytes", data)
        assert status == 200 and body == data
        assert "no room for" in server.log()
        assert metric(server, "procbridge_large_payloads_total", 'direction="in",path="pipe"') == 2
        assert metric(server, "procbridge_large_payloads_total", 'direction="out",path="pipe"') == 1
        filler.unlink()
        # room again: shared memory again
        small = os.urandom(4 * MIB)
        status, _, body = post_binary(server, "/v1/tasks/echo_bytes", small)
        assert status == 200 and body == small
        assert metric(server, "procbridge_large_payloads_total", 'direction="in",path="shm"') == 1
        assert metric(server, "procbridge_large_payloads_total", 'direction="out",path="shm"') == 1
        # bigger than the whole budget: the pipe, at once
        big = os.urandom(20 * MIB)
        status, _, body = post_binary(server, "/v1/tasks/echo_bytes", big)
        assert status == 200 and body == big
        assert metric(server, "procbridge_large_payloads_total", 'direction="in",path="pipe"') == 3
        names = {p.name for p in inside.iterdir()}
        free = metric(server, "procbridge_shm_segments", 'state="free"')
        assert leased(server) == 0 and len([n for n in names if not n.endswith("_table")]) == free
        assert server.stop() == 0, server.log()
    finally:
        server.kill_all()
