"""Baseline 3: a minimal WSGI app serving the same functions, for gunicorn with sync workers.

    gunicorn -k sync -w N -b 127.0.0.1:P bench.apps.wsgi:app
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson

from bench.apps.common import BadCall, envelope, parse_call

StartResponse = Callable[..., Any]
_JSON = [("Content-Type", "application/json")]


def _reply(start_response: StartResponse, status: str, body: bytes) -> list[bytes]:
    start_response(status, [*_JSON, ("Content-Length", str(len(body)))])
    return [body]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path: str = environ.get("PATH_INFO", "")
    method: str = environ.get("REQUEST_METHOD", "GET")
    if path == "/healthz" and method == "GET":
        return _reply(start_response, "200 OK", b'{"status":"ok"}')
    if path.startswith("/v1/tasks/") and method == "POST":
        name = path[len("/v1/tasks/"):]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        try:
            fn, kwargs = parse_call(name, body)
            result = fn(**kwargs)
        except BadCall as exc:
            return _reply(start_response, f"{exc.status} Error", orjson.dumps({"error": str(exc)}))
        except TypeError as exc:
            return _reply(start_response, "422 Unprocessable Entity", orjson.dumps({"error": str(exc)}))
        return _reply(start_response, "200 OK", envelope(name, result))
    return _reply(start_response, "404 Not Found", b'{"error":"not found"}')
