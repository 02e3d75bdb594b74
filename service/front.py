"""A serving process (`--http-processes N`, N ≥ 2): `python -m service.front`, started by the core
(service/serving.py) with its settings on stdin.

It is the service's edge, with its own event loop: it accepts on the public port (SO_REUSEPORT,
beside the other serving processes), runs the same edge checks as a single-process service (CORS,
keys, the rate: its tokens are spent in the core, so the limit is the whole service's), writes the
access log, and answers the calls of non-generator tasks itself: parse, validate, then the call
goes to the core's pool over the relay (workers/relay/) and the envelope is written here. /healthz
is its own; everything else (jobs, maps, generator tasks, /readyz, /metrics, /v1/workers, the
dashboard, /openapi.json) passes on to the core (service/proxy.py) after the edge checks. Counts
for /metrics (each call's outcome, each refused request) go to the core as relay notes.

It stops when told (SIGTERM: it drains like a single-process service, its admitted calls finishing
in the core's pool), and when the core goes away (the relay's EOF, or PR_SET_PDEATHSIG if the core
is killed): it has nothing to serve with then.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import sys
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from service import ops_handlers, proxy, task_handlers
from service.app import access_log_sink, edge_middlewares, log_sinks, starting_in_background
from service.body import expect_continue
from service.concurrency import TaskGates
from service.config import Config
from service.http_protocol import BACKLOG
from service.metrics import Metrics, RejectedRequests
from service.problems import problem_middleware
from service.server import Server, run
from service.state import SERVICE, Service
from service.validation import TaskCatalog
from workers import registry
from workers.local.parent import die_with_parent
from workers.relay.executor import RelayExecutor

log = logging.getLogger("procbridge")


class RelayedMetrics(Metrics):
    """The calls' outcomes, counted in the core (whose /metrics every serving process passes on)."""

    def __init__(self, relay: RelayExecutor) -> None:
        super().__init__(lambda: None)
        self._relay = relay

    def observe(self, task: str, outcome: str, seconds: float | None = None) -> None:
        self._relay.note("observe", task, outcome, seconds)


class RelayedRejections(RejectedRequests):
    """401s and 429s, counted in the core."""

    def __init__(self, relay: RelayExecutor) -> None:
        super().__init__()
        self._relay = relay

    def unauthorized(self) -> None:
        self._relay.note("unauthorized")

    def rate_limited(self) -> None:
        self._relay.note("rate-limited")


def create_front_app(
    config: Config, relay_path: str, core_path: str, on_core_lost: Callable[[], None]
) -> web.Application:
    """The app of one serving process: task calls answered here, every other request passed on."""
    catalog = TaskCatalog(registry.load(config.tasks))
    relay = RelayExecutor(relay_path, on_lost=on_core_lost)
    service = Service(config=config, catalog=catalog, metrics=RelayedMetrics(relay))
    service.executor = relay
    service.gates = TaskGates((), lambda: relay)  # the core holds the gates: one limit for the service
    service.rejected = RelayedRejections(relay)
    service.access_log = access_log_sink(config)
    app = web.Application(client_max_size=config.max_body + 1)
    take = relay.take if config.rate_limit is not None else None
    app.middlewares.extend([problem_middleware, *edge_middlewares(service, app, take)])
    app[SERVICE] = service
    task_handlers.add_call_routes(app, expect_continue(config.max_body), streams=False)
    app.router.add_get("/healthz", ops_handlers.healthz)
    app.router.add_get("/readyz", readyz)
    proxy.setup(app, core_path)  # last: its route takes every path the ones above do not
    app.cleanup_ctx.extend((log_sinks, relay_link))
    return app


async def readyz(request: web.Request) -> web.StreamResponse:
    """Not ready while this process drains; otherwise the core's readiness."""
    if request.app[SERVICE].draining:
        return ops_handlers.not_ready("draining", 0, {})
    return await proxy.proxy(request)


async def relay_link(app: web.Application) -> AsyncIterator[None]:
    """The relay to the core, connected at start-up (Server reads `executor_start` as the start)."""
    service = app[SERVICE]
    executor = service.executor
    assert executor is not None
    async with starting_in_background(service, executor, executor.start()):
        yield


class FrontServer(Server):
    """Server's phases, on the public port beside the other serving processes."""

    def __init__(self, config: Config, relay_path: str, core_path: str) -> None:
        super().__init__(config)
        self.relay_path = relay_path
        self.core_path = core_path

    def _make_app(self) -> web.Application:
        return create_front_app(self.config, self.relay_path, self.core_path, self._core_lost)

    def _core_lost(self) -> None:
        if not self._stop.is_set():
            log.error("serving process %d: the core went away; stopping", os.getpid())
            self.exit_code = 1
            self._stop.set()
            self._hurry.set()

    async def _bind(self, runner: web.AppRunner) -> None:
        config = self.config
        service = runner.app[SERVICE]
        assert service.executor_start is not None
        await service.executor_start  # connected to the core before the first client can arrive
        site = web.TCPSite(
            runner, config.host, config.port, backlog=BACKLOG, reuse_address=True, reuse_port=True
        )
        await site.start()
        relay = service.executor
        assert isinstance(relay, RelayExecutor)
        relay.hello()


def main() -> int:
    settings = pickle.load(sys.stdin.buffer)  # the core's own bytes (service/serving.py), never a client's
    die_with_parent(settings["core_pid"])  # SIGKILL when the core goes (Linux; elsewhere the relay's EOF)
    server = functools.partial(FrontServer, relay_path=settings["relay"], core_path=settings["core"])
    return run(settings["config"], server)


if __name__ == "__main__":
    sys.exit(main())
