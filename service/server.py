"""Running the service: uvloop, aiohttp's runner on one TCP site, signals and a graceful drain.

SIGTERM or SIGINT: /readyz turns 503 and new calls get 503 `draining` at once; admitted calls
finish for up to --shutdown-grace seconds (a second signal cuts the grace short); then whatever is
still running is killed (its callers get 503), the workers stop, connections close, exit code 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import sys

import uvloop
from aiohttp import web

from service.app import SERVICE, create_app
from service.config import Config
from service.http_protocol import BACKLOG, RUNNER_LIMITS, GuardedAppRunner
from workers.local.processes import stop_helper_processes

log = logging.getLogger("procbridge")


async def serve(config: Config) -> None:
    # Take SIGTERM/SIGINT over before anything starts: one arriving while the pool starts would
    # otherwise kill the service by signal (orphaned workers, a leaked /dev/shm segment) or, as a
    # KeyboardInterrupt, leave it hung waiting for a forkserver its live workers keep open. Here
    # it drains as soon as the start-up is over instead.
    stop = asyncio.Event()
    hurry = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signame: str) -> None:
        if stop.is_set():
            log.warning("%s again: skipping the rest of the grace period", signame)
            hurry.set()
        else:
            log.info("%s: draining (grace %g s)", signame, config.shutdown_grace)
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    app = create_app(config)
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
    await runner.setup()  # the startup hooks: the worker pool starts here
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=BACKLOG, reuse_address=True)
        await site.start()
        addresses = [s.getsockname() for s in _sockets(runner)]
        bound = ", ".join(f"http://{a[0]}:{a[1]}" for a in addresses)
        log.info("procbridge listening on %s (%d workers)", bound, config.workers)
        if not config.api_keys and not all(_loopback(a[0]) for a in addresses):
            log.warning("listening on %s without API keys: anyone who can reach it can run tasks", config.host)

        await stop.wait()
        service = app[SERVICE]
        service.draining = True
        if service.jobs is not None:
            service.jobs.stop_claiming()  # queued jobs stay in the store for the next start
        if service.executor is not None:
            drain = asyncio.ensure_future(service.executor.drain(config.shutdown_grace))
            hurried = asyncio.ensure_future(hurry.wait())
            await asyncio.wait({drain, hurried}, return_when=asyncio.FIRST_COMPLETED)
            hurried.cancel()
            if not drain.done():
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain
                await service.executor.aclose()
    finally:
        await runner.cleanup()  # stop listening, close connections, cleanup hooks (executor, metrics)
    log.info("procbridge stopped")


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _sockets(runner: web.AppRunner) -> list[socket.socket]:
    out: list[socket.socket] = []
    for site in runner.sites:
        server = getattr(site, "_server", None)
        out.extend(getattr(server, "sockets", None) or [])
    return out


def run(config: Config) -> int:
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        uvloop.run(serve(config))
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", config.host, config.port, exc)
        return 1
    except (RuntimeError, ImportError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    finally:
        stop_helper_processes()
    return 0
