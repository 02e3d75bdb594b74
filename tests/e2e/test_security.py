"""API keys, rate limits, the access log and the audit lines through the real server (a subprocess
on loopback, as a user runs it): every /v1/ route refuses a missing or wrong key with 401 and
`WWW-Authenticate: Bearer` and serves a right one; probes stay open; keys come from the flag, the
environment or a file; each key (or client address, without keys) has its own budget, job
submissions included; and no key ever reaches the server's output."""

from __future__ import annotations

import hashlib
import http.client as httpclient
import json
import signal
import socket
import subprocess
import sys
from typing import Any

from tests.conftest import ROOT, Reply, ServerProcess, http, start_server, wait_for

KEY_A = "alpha-7f3c9a1e5b2d8f4c6a0e9b7d1c3f5a2e"
KEY_B = "bravo-2b8e6d4f0a1c3e5b7d9f2a4c6e8b0d1f"
KEY_C = "charlie-5d1f3b7e9a2c4e6f8b0d2a4c6e8f1b3d"
KEY_D = "delta-9e7c5a3f1d2b4e6a8c0f2d4b6e8a1c3f5"
WRONG = "wrong-0000111122223333444455556666777788"
ALL_KEYS = (KEY_A, KEY_B, KEY_C, KEY_D, WRONG)
JSON = {"Content-Type": "application/json"}
OPEN = ("/healthz", "/readyz", "/metrics", "/openapi.json")
BURST = 60


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def bearer(key: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    return {**(headers or {}), "Authorization": f"Bearer {key}"}


def request(server: ServerProcess, method: str, path: str, body: Any = None, key: str | None = None,
            headers: dict[str, str] | None = None) -> Reply:
    data = json.dumps(body).encode() if body is not None else None
    all_headers = dict(JSON if body is not None else {}, **(headers or {}))
    if key is not None:
        all_headers["Authorization"] = f"Bearer {key}"
    return http(method, server.url + path, data, all_headers)


def expect_401(reply: Reply, invalid_token: bool) -> None:
    assert reply.status == 401, reply.body
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["type"] == "/problems/unauthorized"
    challenge = reply.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert ('error="invalid_token"' in challenge) is invalid_token


def expect_429(reply: Reply) -> int:
    assert reply.status == 429, reply.body
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["type"] == "/problems/rate-limited"
    retry_after = reply.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    return int(retry_after)


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a server's output (its diagnostics are plain text lines)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def events(text: str, event: str) -> list[dict[str, Any]]:
    return [line for line in json_lines(text) if line.get("event") == event]


def raw_exchange(server: ServerProcess, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        return sock.recv(65536)


def test_every_v1_route_needs_a_key_probes_stay_open_and_no_key_is_ever_logged(tmp_path):
    server = start_server(tmp_path, "--workers", "1", "--api-keys", f"{KEY_A},{KEY_B}")
    try:
        submitted = request(server, "POST", "/v1/jobs", {"task": "primes", "args": {"limit": 100}}, KEY_A)
        assert submitted.status == 202, submitted.body
        job_id = submitted.json()["id"]
        wait_for(lambda: request(server, "GET", f"/v1/jobs/{job_id}", key=KEY_B).json()["status"] == "succeeded",
                 30, 0.02, "the job to finish")
        routes = [  # (method, path, body, status with a right key)
            ("GET", "/v1/tasks", None, 200),
            ("POST", "/v1/tasks/primes", {"limit": 100}, 200),
            ("POST", "/v1/tasks/primes/map", {"items": [{"limit": 10}, {"limit": 100}]}, 200),
            ("POST", "/v1/jobs", {"task": "primes", "args": {"limit": 10}}, 202),
            ("GET", "/v1/jobs", None, 200),
            ("GET", f"/v1/jobs/{job_id}", None, 200),
            ("GET", f"/v1/jobs/{job_id}/result", None, 200),
            ("GET", f"/v1/jobs/{job_id}/events", None, 200),
            ("DELETE", f"/v1/jobs/{job_id}", None, 409),  # served: the job has already finished
            ("GET", "/v1/workers", None, 200),
        ]
        for method, path, body, status in routes:
            expect_401(request(server, method, path, body), invalid_token=False)
            expect_401(request(server, method, path, body, WRONG), invalid_token=True)
            expect_401(request(server, method, path, body, headers={"Authorization": f"Basic {KEY_A}"}), False)
            ok = request(server, method, path, body, KEY_A)
            assert ok.status == status, (method, path, ok.body)
        assert request(server, "GET", f"/v1/jobs/{job_id}/result", key=KEY_A).json() == 25
        for path in OPEN:
            assert request(server, "GET", path).status == 200, path
        # A request aiohttp cannot parse, carrying a right key: answered 400, and the key is not logged.
        answer = raw_exchange(server, f"GET /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\x01"
                                      f"\r\n\r\n".encode())
        assert answer.split()[1] == b"400"
        for _ in range(BURST):  # a burst of refusals, for the audit's coalescing
            expect_401(request(server, "GET", "/v1/tasks"), invalid_token=False)
    finally:
        assert server.stop(signal.SIGTERM) == 0
    output = server.log()
    for key in ALL_KEYS:
        assert key not in output, "a key reached the server's output"

    access = events(output, "access")
    assert {"time", "method", "path", "status", "slug", "latency_ms", "key_id", "remote"} <= set(access[0])
    served = [a for a in access if a["path"].startswith("/v1/") and a["status"] != 401]
    assert served and all(a["key_id"] in (key_id(KEY_A), key_id(KEY_B)) for a in served)
    refused = [a for a in access if a["status"] == 401]
    assert len(refused) == 3 * len(routes) + BURST
    assert all(a["slug"] == "unauthorized" and a["key_id"] is None for a in refused)
    assert {a["path"] for a in access} >= {path for _, path, _, _ in routes} | set(OPEN)
    assert any(a["status"] == 400 for a in access)  # aiohttp's own answers are logged too

    audit = events(output, "auth-rejected")
    counts = {reason: sum(a["count"] for a in audit if a["reason"] == reason)
              for reason in ("missing", "malformed", "unknown-key")}
    assert counts == {"missing": len(routes) + BURST, "malformed": len(routes), "unknown-key": len(routes)}
    assert {a["key_id"] for a in audit if a["reason"] == "unknown-key"} == {key_id(WRONG)}
    # Coalesced: one line per second per (address, reason) and its count, not a line per refusal
    # (10 lines would still be allowed if the burst were spread over 10 s by a very slow machine).
    assert len([a for a in audit if a["reason"] == "missing"]) <= len(routes) + 10
    assert all(a["remote"] == "127.0.0.1" for a in audit)


def test_keys_from_the_environment_and_from_a_file(tmp_path):
    access_file = tmp_path / "access.jsonl"
    from_env = start_server(tmp_path / "env", "--workers", "1", "--access-log", str(access_file),
                            env={"PROCBRIDGE_API_KEYS": f"{KEY_A}, {KEY_B}"})
    try:
        assert request(from_env, "GET", "/v1/tasks", key=KEY_B).status == 200
        expect_401(request(from_env, "GET", "/v1/tasks"), invalid_token=False)
        wait_for(lambda: access_file.exists() and "/v1/tasks" in access_file.read_text(), 10, 0.02,
                 "access lines in the file")
    finally:
        assert from_env.stop() == 0
    written = access_file.read_text()
    assert [(a["status"], a["key_id"]) for a in events(written, "access") if a["path"] == "/v1/tasks"] == [
        (200, key_id(KEY_B)), (401, None)]
    assert {a["path"] for a in events(written, "access")} == {"/readyz", "/v1/tasks"}  # start_server polls /readyz
    assert [a["reason"] for a in events(written, "auth-rejected")] == ["missing"]
    assert events(from_env.log(), "access") == []  # the file, not stdout
    assert KEY_A not in written + from_env.log() and KEY_B not in written + from_env.log()

    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# service accounts\n{KEY_C}\n\n  {KEY_D}  \n# {KEY_A}\n")
    from_file = start_server(tmp_path / "file", "--workers", "1", "--api-keys", f"@{keys_file}",
                             env={"PROCBRIDGE_API_KEYS": KEY_A, "PROCBRIDGE_ACCESS_LOG": "off"})
    try:
        for key in (KEY_C, KEY_D):
            assert request(from_file, "GET", "/v1/workers", key=key).status == 200
        expect_401(request(from_file, "GET", "/v1/workers", key=KEY_A), invalid_token=True)  # the flag wins
        wait_for(lambda: events(from_file.log(), "auth-rejected"), 10, 0.02, "the audit line on stderr")
    finally:
        assert from_file.stop() == 0
    assert events(from_file.log(), "access") == []  # off
    assert [a["key_id"] for a in events(from_file.log(), "auth-rejected")] == [key_id(KEY_A)]
    assert all(key not in from_file.log() for key in ALL_KEYS)


def test_each_key_has_its_own_budget_and_job_submissions_count(tmp_path):
    # 4 a minute: one token back every 15 s, far longer than this test, so no refill muddles the counts.
    server = start_server(tmp_path, "--workers", "1", "--rate-limit", "4/min",
                          "--api-keys", ",".join((KEY_A, KEY_B, KEY_C, KEY_D)))
    try:
        for _ in range(4):
            assert request(server, "GET", "/v1/tasks", key=KEY_A).status == 200
        assert 1 <= expect_429(request(server, "GET", "/v1/tasks", key=KEY_A)) <= 15
        for _ in range(10):
            for path in OPEN:
                assert request(server, "GET", path).status == 200  # probes are never limited
        for _ in range(4):  # A's burst did not spend B's budget
            assert request(server, "GET", "/v1/workers", key=KEY_B).status == 200
        expect_429(request(server, "GET", "/v1/workers", key=KEY_B))

        job = {"task": "primes", "args": {"limit": 10}}
        for _ in range(4):
            assert request(server, "POST", "/v1/jobs", job, KEY_C).status == 202
        expect_429(request(server, "POST", "/v1/jobs", job, KEY_C))
        expect_429(request(server, "GET", "/v1/jobs", key=KEY_C))
        listed = request(server, "GET", "/v1/jobs", key=KEY_D)
        assert listed.status == 200
        assert len(listed.json()["jobs"]) == 4  # the refused submission stored nothing
    finally:
        assert server.stop() == 0
    limited = [a for a in events(server.log(), "access") if a["status"] == 429]
    assert {a["key_id"] for a in limited} == {key_id(KEY_A), key_id(KEY_B), key_id(KEY_C)}
    assert all(a["slug"] == "rate-limited" for a in limited)


def from_address(server: ServerProcess, source: str, path: str, headers: dict[str, str] | None = None) -> int:
    conn = httpclient.HTTPConnection("127.0.0.1", server.port, timeout=30, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_without_keys_each_client_address_has_its_own_budget(tmp_path):
    server = start_server(tmp_path, "--workers", "1", "--rate-limit", "3/min")
    try:
        for _ in range(3):
            assert from_address(server, "127.0.0.1", "/v1/tasks") == 200
        assert from_address(server, "127.0.0.1", "/v1/tasks") == 429
        for spoof in ("127.0.0.9", "203.0.113.7"):  # a header the client writes itself is not an address
            assert from_address(server, "127.0.0.1", "/v1/tasks", {"X-Forwarded-For": spoof}) == 429
        assert from_address(server, "127.0.0.1", "/healthz") == 200
        for _ in range(3):  # another address, another bucket
            assert from_address(server, "127.0.0.2", "/v1/tasks") == 200
        assert from_address(server, "127.0.0.2", "/v1/tasks") == 429
    finally:
        assert server.stop() == 0
    access = events(server.log(), "access")
    assert {(a["remote"], a["status"]) for a in access if a["path"] == "/v1/tasks"} == {
        ("127.0.0.1", 200), ("127.0.0.1", 429), ("127.0.0.2", 200), ("127.0.0.2", 429)}
    assert all(a["key_id"] is None for a in access)


def test_a_bad_key_setting_stops_the_start_without_showing_keys():
    bad = f"{KEY_A},has space-{KEY_B}"
    proc = subprocess.run([sys.executable, "-m", "service", "serve", "--api-keys", bad],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--api-keys" in proc.stderr and "key 2" in proc.stderr
    assert KEY_A not in proc.stdout + proc.stderr and KEY_B not in proc.stdout + proc.stderr
