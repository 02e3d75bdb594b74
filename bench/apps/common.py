"""What the baselines share: the function table, argument parsing, and running an aiohttp app."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable
from typing import Any

import orjson
import uvloop
from aiohttp import web

from workers.builtin_tasks import burn, primes

FUNCTIONS: dict[str, Callable[..., Any]] = {"burn": burn, "primes": primes}
JSON = "application/json"


class BadCall(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_call(name: str, body: bytes) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The function named `name` and its keyword arguments from a JSON object body."""
    fn = FUNCTIONS.get(name)
    if fn is None:
        raise BadCall(404, f"no task {name!r}")
    try:
        kwargs = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError as exc:
        raise BadCall(400, f"invalid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise BadCall(400, "the body must be a JSON object")
    return fn, kwargs


def envelope(name: str, result: Any) -> bytes:
    return orjson.dumps({"task": name, "result": result})


def error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": message}), content_type=JSON)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type=JSON)


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    return p.parse_args()


def serve(app: web.Application, host: str, port: int) -> None:
    """Run `app` on uvloop until SIGTERM or SIGINT, like procbridge's own server (no access log)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=75.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
            await site.start()
            await stop.wait()
        finally:
            await runner.cleanup()

    uvloop.run(main())
