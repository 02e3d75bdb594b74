"""Running the service: uvloop, aiohttp's runner on one TCP site, signals and a graceful drain.

One run is a sequence of named phases, all in `Server.run`, in this order:

    _open   the app's resources open (aiohttp's runner.setup() enters its cleanup contexts: log
            sinks, job store, executor, job runner, metrics timers; service/app.py); the executor's
            start (imports and preloads in the worker parent, then the workers) goes on in the
            background, so /healthz answers as soon as the site is bound
    _bind   one TCP site; the addresses it got are logged
    _serve  until SIGTERM or SIGINT, or until the executor's start fails (a preload raised, the
            start timeout passed): one line says why and the exit code is 1
    _drain  /readyz turns 503 and new work gets 503 `draining` at once; the job runner claims no more
            (queued jobs stay in the store for the next start); admitted calls finish for up to
            --shutdown-grace seconds (a second signal cuts the grace short), then whatever is still
            running is killed (its callers get 503)
    _close  stop listening, close connections, then the resources in reverse order (the workers
            stop); exit code 0. It runs whichever phase failed, so what was opened is closed.

Signals are taken over before anything starts: one arriving while the pool starts would otherwise
kill the service by signal (orphaned workers, a leaked /dev/shm segment). Here it drains instead,
at once: a start still in progress is cancelled and what it started is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import uvloop
from aiohttp import web

from service.app import create_app
from service.config import Config
from service.http_protocol import BACKLOG, RUNNER_LIMITS, GuardedAppRunner
from service.state import SERVICE, Service
from workers.local.processes import stop_helper_processes

log = logging.getLogger("procbridge")


class Server:
    """One run of the service on the running loop: `await Server(config).run()`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._stop = asyncio.Event()  # first signal: drain
        self._hurry = asyncio.Event()  # second signal: cut the grace short
        self.exit_code = 0

    async def run(self) -> None:
        self._take_signals()
        app = self._make_app()  # task modules imported, nothing opened yet
        # GuardedAppRunner: aiohttp's AppRunner with problem+json for unparseable requests, a deadline for
        # request heads and connection caps (service/http_protocol.py, which holds every limit).
        runner = GuardedAppRunner(
            app,
            handle_signals=False,
            handler_cancellation=True,  # a client that hangs up cancels its handler: queued work is dropped
            shutdown_timeout=5.0,
            **RUNNER_LIMITS,  # keep-alive, header sizes and count, lingering, read buffer, no auto-decompression
            **app[SERVICE].runner_options(),  # the JSON access log (service/access_log.py), unless --access-log off
        )
        try:
            await self._open(runner)
            await self._bind(runner)
            await self._serve(app)
            await self._drain(app)
        finally:
            await self._close(runner)
        if self.exit_code == 0:
            log.info("procbridge stopped")

    def _make_app(self) -> web.Application:
        return create_app(self.config)

    def _take_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig.name)

    def _on_signal(self, signame: str) -> None:
        if self._stop.is_set():
            log.warning("%s again: skipping the rest of the grace period", signame)
            self._hurry.set()
        else:
            log.info("%s: draining (grace %g s)", signame, self.config.shutdown_grace)
            self._stop.set()

    async def _open(self, runner: web.AppRunner) -> None:
        await runner.setup()  # the app's cleanup contexts open, in order: the workers start here

    async def _bind(self, runner: web.AppRunner) -> None:
        config = self.config
        site = web.TCPSite(runner, config.host, config.port, backlog=BACKLOG, reuse_address=True)
        await site.start()
        addresses = runner.addresses
        bound = ", ".join(f"http://{a[0]}:{a[1]}" for a in addresses)
        log.info("procbridge listening on %s (%s workers)", bound, config.workers)  # an elastic pool: 1..8
        if not config.api_keys and not all(_loopback(a[0]) for a in addresses):
            log.warning("listening on %s without API keys: anyone who can reach it can run tasks", config.host)

    async def _serve(self, app: web.Application) -> None:
        starting = app[SERVICE].executor_start
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            if starting is not None:  # a signal, or the end of the executor's start, whichever comes first
                first: list[asyncio.Future[Any]] = [stopped, starting]
                await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
                if starting.done() and not starting.cancelled() and (exc := starting.exception()) is not None:
                    details = getattr(exc, "details", "")
                    if details:  # the hook's or the module's own traceback
                        log.error("the worker parent could not load the tasks:\n%s", details.rstrip())
                    log.error("cannot start: %s", exc)
                    self.exit_code = 1
                    return
            await stopped
        finally:
            stopped.cancel()

    async def _drain(self, app: web.Application) -> None:
        service = app[SERVICE]
        service.stop_taking_work()
        if service.executor is None:
            return
        drain = asyncio.ensure_future(_drain_executor(service, self.config.shutdown_grace))
        hurried = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait({drain, hurried}, return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        if not drain.done():
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            await service.executor.aclose()

    async def _close(self, runner: web.AppRunner) -> None:
        # Stop listening, close connections (up to shutdown_timeout), then the cleanup contexts in
        # reverse order: metrics timers, job runner, executor, job store, log sinks. After a failed
        # start only the contexts that opened are closed.
        await runner.cleanup()


async def _drain_executor(service: Service, grace: float) -> None:
    """Calls waiting for a `@task(concurrency=N)` slot were admitted: they run before the executor
    stops taking calls (all within the grace), then the executor drains what is left."""
    executor = service.executor
    assert executor is not None
    began = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(service.gates.wait_idle(), grace)
    await executor.drain(max(0.0, grace - (time.monotonic() - began)))


async def serve(config: Config, server_class: Callable[[Config], Server] = Server) -> int:
    server = server_class(config)
    await server.run()
    return server.exit_code


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def run(config: Config, server_class: Callable[[Config], Server] = Server) -> int:
    """Run the service to its end; the exit code. `server_class`: CoreServer with --http-processes
    N ≥ 2 (service/serving.py), FrontServer in each serving process (service/front.py)."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code = uvloop.run(serve(config, server_class))
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", config.host, config.port, exc)
        return 1
    except (RuntimeError, ImportError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    finally:
        stop_helper_processes()
    return code
