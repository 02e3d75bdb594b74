"""Webhooks through the real server, on each store: a job names a receiver on loopback; the service
POSTs the job there when it ends, signed with --webhook-secret, and tries again after a failed delivery;
hosts outside --webhook-allow are refused at submit; and a delivery still pending when the service is
SIGKILLed goes out after the restart (at-least-once)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import metric, post_json, serving, start_server, wait_for
from tests.e2e.test_jobs import job, submit
from tests.support.redis_server import RedisServer

SECRET = "a-webhook-secret-of-some-length"
WAIT = 30.0  # far above the promise (a delivery within a second or two of the job's end)


class Receiver:
    """An HTTP receiver on 127.0.0.1 in a thread: records every POST (headers, body) and answers 500
    while `failing` is above 0 (counting down) or `always_fail` is set, else 200."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.failing = 0
        self.always_fail = False
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    fail = receiver.always_fail or receiver.failing > 0
                    receiver.failing = max(0, receiver.failing - 1)
                self.send_response(500 if fail else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(params=["sqlite", "redis"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "sqlite":
        return {}
    redis: RedisServer = request.getfixturevalue("redis_server")
    return {"PROCBRIDGE_STORE": redis.url(f"hooks-{uuid.uuid4().hex[:8]}:")}


def hook_args(receiver: Receiver) -> tuple[str, ...]:
    return ("--workers", "1", "--webhook-allow", f"127.0.0.1:{receiver.port}", "--webhook-secret", SECRET)


def delivery(url: str, job_id: str) -> dict[str, Any]:
    info: dict[str, Any] = job(url, job_id)["webhook_delivery"]
    return info


def assert_signed(headers: dict[str, str], body: bytes) -> None:
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-procbridge-signature"], expected)


def test_a_finished_job_is_posted_signed_and_a_failed_delivery_is_tried_again(
    tmp_path: Path, receiver: Receiver, store_env: dict[str, str]
) -> None:
    receiver.failing = 1
    with serving(tmp_path, *hook_args(receiver), env=store_env) as server:
        created = submit(server.url, "primes", {"limit": 100}, webhook=receiver.url()).json()
        assert created["webhook"] == receiver.url()
        assert created["webhook_delivery"] == {"state": None, "attempts": 0, "error": None}
        wait_for(lambda: delivery(server.url, created["id"])["state"] == "delivered", WAIT, what="the delivery")
        final = job(server.url, created["id"])
        assert final["webhook_delivery"]["attempts"] == 2
        assert len(receiver.posts) == 2  # the failed one, then the one that got its 200
        for headers, body in receiver.posts:
            assert_signed(headers, body)
            assert headers["x-procbridge-job"] == created["id"]
            assert headers["content-type"] == "application/json"
            sent = json.loads(body)
            assert sent["id"] == created["id"] and sent["status"] == "succeeded" and sent["result"] == 25
        assert [h["x-procbridge-delivery"] for h, _ in receiver.posts] == ["1", "2"]
        assert metric(server, "procbridge_webhook_deliveries_total", 'outcome="failed"') == 1
        assert metric(server, "procbridge_webhook_deliveries_total", 'outcome="delivered"') == 1


def test_a_webhook_host_outside_the_allow_list_is_refused_at_submit(
    tmp_path: Path, receiver: Receiver, server_factory: Any
) -> None:
    allowed = server_factory(*hook_args(receiver))
    for url in (f"http://127.0.0.1:{receiver.port + 1}/hook", "http://169.254.169.254/latest/meta-data",
                "file:///etc/passwd", f"http://user:pw@127.0.0.1:{receiver.port}/"):
        reply = post_json(allowed.url + "/v1/jobs", {"task": "primes", "args": {"limit": 5}, "webhook": url})
        assert reply.status == 422, (url, reply.body)
        assert reply.json()["errors"][0]["field"] == "webhook"
    closed = server_factory("--workers", "1")  # no --webhook-allow: every webhook is refused
    reply = post_json(closed.url + "/v1/jobs", {"task": "primes", "args": {"limit": 5}, "webhook": receiver.url()})
    assert reply.status == 422 and "--webhook-allow" in reply.json()["detail"]
    assert receiver.posts == []


def test_a_delivery_pending_at_a_sigkill_goes_out_after_the_restart(
    tmp_path: Path, receiver: Receiver, store_env: dict[str, str]
) -> None:
    receiver.always_fail = True
    first = start_server(tmp_path, *hook_args(receiver), env=store_env, new_session=True)
    try:
        created = submit(first.url, "primes", {"limit": 100}, webhook=receiver.url()).json()
        wait_for(lambda: delivery(first.url, created["id"])["attempts"] >= 1, WAIT, what="a failed delivery")
        assert delivery(first.url, created["id"])["state"] == "pending"
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.kill_all()
    receiver.always_fail = False
    with serving(tmp_path, *hook_args(receiver), env=store_env) as again:
        wait_for(lambda: delivery(again.url, created["id"])["state"] == "delivered", WAIT,
                 what="the delivery after the restart")
        headers, body = receiver.posts[-1]
        assert_signed(headers, body)
        assert json.loads(body)["status"] == "succeeded"
