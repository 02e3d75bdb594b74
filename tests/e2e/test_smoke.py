"""The shortest path a new user takes: start the server, call a task, stop it cleanly."""

from __future__ import annotations

from tests.conftest import http, post_json


def test_serve_call_and_stop(server_factory):
    server = server_factory("--workers", "2")
    assert http("GET", server.url + "/healthz").json() == {"status": "ok"}
    reply = post_json(server.url + "/v1/tasks/primes", {"limit": 100})
    assert reply.status == 200, reply.body
    assert reply.json()["result"] == 25
    assert server.stop() == 0
    assert server.leftovers() == []
