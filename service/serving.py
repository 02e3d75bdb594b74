"""`CoreServer`: the service with `--http-processes N` (N ≥ 2), run by the process the user started.

This process, the core, holds everything there is one of: the executor (one pool, one queue, one
`--max-pending`), the job store and runner (jobs claimed once), the metrics and the dashboard. It
does not accept clients itself. N serving processes (service/front.py, started and replaced by
workers/serving.py) each bind the public port with SO_REUSEPORT, so the kernel spreads connections
over their loops; each parses HTTP, checks keys and the rate, validates and answers task calls,
passing each call to the core over the relay (workers/relay/), and passes every other request to
the core's private Unix socket as it is (service/proxy.py). /metrics and /v1/workers are the
core's, so they describe the whole service whichever serving process answers.

Phases (Server's, service/server.py), with what is different here:

    _open   as Server (the app is built with core=True: no edge checks, no access log of its own)
    _bind   the core's private socket (HTTP) and the relay's, in a directory only this user can
            enter; the public port reserved (bound, not listening, SO_REUSEPORT); the N serving
            processes started, and waited for until each one listens
    _serve  as Server
    _drain  new work refused (503 `draining`) here and in every serving process (SIGTERM to each:
            they drain their own admitted calls, which finish in this pool), the pool drained, all
            within --shutdown-grace
    _close  the serving processes reaped (SIGKILL past the grace), then the sockets, then as Server
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import shutil
import socket
import sys
import tempfile
from dataclasses import replace

from aiohttp import web

from service.app import create_app
from service.config import Config
from service.relay_calls import CoreRelay
from service.server import Server
from service.state import SERVICE
from workers.relay.server import RelayServer
from workers.serving import ServingProcesses

log = logging.getLogger("procbridge")

_LISTEN_DEADLINE = 60.0  # seconds for every serving process to import the tasks and listen


class CoreServer(Server):
    """The core of a service with several serving processes; see the module docstring."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._dir = tempfile.mkdtemp(prefix="procbridge-")  # mode 0700: only this user reaches the sockets
        self._relay: RelayServer | None = None
        self._serving: ServingProcesses | None = None
        self._reserved: socket.socket | None = None
        self._listening: set[int] = set()
        self._all_listening = asyncio.Event()

    def _make_app(self) -> web.Application:
        return create_app(self.config, core=True)

    def _on_signal(self, signame: str) -> None:
        again = self._stop.is_set()
        super()._on_signal(signame)
        if self._serving is not None:  # the first one drains them, a second one cuts their grace short
            if again:
                self._serving.hurry()
            else:
                self._serving.terminate()

    async def _bind(self, runner: web.AppRunner) -> None:
        config = self.config
        service = runner.app[SERVICE]
        core_path = os.path.join(self._dir, "core.sock")
        relay_path = os.path.join(self._dir, "relay.sock")
        site = web.UnixSite(runner, core_path)
        await site.start()
        os.chmod(core_path, 0o600)
        self._relay = RelayServer(relay_path, CoreRelay(service, service.rejected), self._on_hello)
        await self._relay.start()
        port = self._reserve_port()
        blob = pickle.dumps({
            "config": replace(config, port=port), "relay": relay_path, "core": core_path, "core_pid": os.getpid(),
        })
        serving = self._serving = service.serving = ServingProcesses(
            config.http_processes, [sys.executable, "-m", "service.front"], blob
        )
        await serving.start()
        try:
            await asyncio.wait_for(self._all_listening.wait(), _LISTEN_DEADLINE)
        except TimeoutError:
            raise OSError(f"the serving processes did not all listen within {_LISTEN_DEADLINE:g} s") from None
        log.info(
            "procbridge listening on http://%s:%d (%d workers, %d serving processes)",
            config.host if ":" not in config.host else f"[{config.host}]", port, config.workers,
            config.http_processes,
        )

    def _reserve_port(self) -> int:
        """Bind the public address without listening: it resolves port 0 to one port for every serving
        process, and keeps it ours while one of them is being replaced."""
        config = self.config
        family, kind, proto, _, address = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = self._reserved = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        return int(sock.getsockname()[1])

    def _on_hello(self, pid: int) -> None:
        serving = self._serving
        if serving is None:
            return
        self._listening = {p for p in self._listening | {pid} if p in serving.pids()}
        if len(self._listening) >= serving.count:
            serving.listening = True  # /readyz: ready from now on (one being replaced later is no reason not to be)
            self._all_listening.set()

    async def _drain(self, app: web.Application) -> None:
        serving = self._serving
        if serving is None:
            await super()._drain(app)
            return
        app[SERVICE].stop_taking_work()  # before the serving processes hear of it: no call slips in
        serving.terminate()
        await asyncio.gather(super()._drain(app), serving.stop(self.config.shutdown_grace + 5.0))

    async def _close(self, runner: web.AppRunner) -> None:
        try:
            if self._serving is not None:
                await self._serving.stop(5.0)
            if self._relay is not None:
                await self._relay.close()
            await super()._close(runner)
        finally:
            if self._reserved is not None:
                self._reserved.close()
            with contextlib.suppress(OSError):
                shutil.rmtree(self._dir)
