"""Shared test helpers: free loopback ports, waiting on conditions with deadlines, and the real
server started as a subprocess (`server_factory`), with every process it started tracked."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

if TYPE_CHECKING:
    from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = "") -> Any:
    """Poll `condition` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


async def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """`wait_for` on an event loop: poll `condition` (plain or async) without blocking the loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        await asyncio.sleep(0.005)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30.0
) -> Reply:
    """One HTTP request with the stdlib; error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


def post_json(url: str, payload: Any, timeout: float = 30.0) -> Reply:
    return http("POST", url, json.dumps(payload).encode(), {"Content-Type": "application/json"}, timeout)


@dataclass
class ServerProcess:
    """`python -m service serve` on a free loopback port, as a user would run it."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    seen_pids: set[int] = field(default_factory=set)
    err_path: Path | None = None  # its stderr, when kept apart from stdout (split_logs)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """What it wrote (stdout and stderr, or stdout alone with split_logs)."""
        return self.log_path.read_text(errors="replace")

    def errors(self) -> str:
        """Its stderr (the diagnostics log), with split_logs."""
        assert self.err_path is not None, "started without split_logs"
        return self.err_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen_pids.update(k.pid for k in kids)
        return kids

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it to exit; return its exit code."""
        self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"server did not exit within {timeout} s after {sig}\n{self.log()}") from None

    def leftovers(self) -> list[int]:
        """Pids of processes the server started that are still alive (zombies count)."""
        alive = []
        for pid in self.seen_pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                if p.is_running():
                    alive.append(pid)
        return alive

    def kill_all(self) -> None:
        for p in self.descendants():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_server(
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    ready_timeout: float = 60.0,
    prefix: tuple[str, ...] = (),
    wait_ready: bool = True,
    new_session: bool = False,
    split_logs: bool = False,
) -> ServerProcess:
    """The server on a free loopback port; `prefix` is a command that execs the rest (it must keep
    the pid, as `sh -c '... && exec "$0" "$@"'` does). `wait_ready=False` returns as soon as it
    runs; `new_session` makes it lead its own session and process group (as systemd starts a
    service); `split_logs` keeps its stderr apart, in `err_path` (stdout, the access log, in `log_path`)."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROCBRIDGE_")}
    full_env.update({"PROCBRIDGE_STORE": str(tmp_path / "jobs.db"), "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    tmp_path.mkdir(parents=True, exist_ok=True)
    log_path = tmp_path / f"server-{port}.log"
    err_path = tmp_path / f"server-{port}.err" if split_logs else None
    with open(log_path, "wb") as log, open(err_path or os.devnull, "wb") as err:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=ROOT, env=full_env, stdout=log, stderr=err if split_logs else subprocess.STDOUT,
            start_new_session=new_session,
        )
    server = ServerProcess(port, proc, log_path, err_path=err_path)
    if not wait_ready:
        return server

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            return http("GET", server.url + "/readyz", timeout=2).status == 200
        except OSError:
            return False

    wait_for(ready, ready_timeout, 0.05, "the server to become ready")
    server.descendants()
    return server


def metric(server: ServerProcess, name: str, labels: str = "") -> float:
    """One sample's value from the server's /metrics (0.0 when the series is not there yet)."""
    text = http("GET", server.url + "/metrics").body.decode()
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@contextlib.contextmanager
def serving(folder: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A real server for the block (or a module fixture); stopped at the end, and whatever it left
    behind killed even when its stop fails (the failure is the test's to report, not the teardown's)."""
    srv = start_server(folder, *args, env=env)
    try:
        yield srv
    finally:
        with contextlib.suppress(AssertionError):
            srv.stop(timeout=15)
        srv.kill_all()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real servers; each is stopped (and its processes killed) when the test ends."""
    started: list[ServerProcess] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = start_server(tmp_path, *args, env=env)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                server.stop(signal.SIGTERM, timeout=15)
        server.kill_all()


async def started_client(aiohttp_client: Any, app: Any, timeout: float = 60.0) -> Any:
    """aiohttp's test client for `app`, returned once its workers are ready: the app starts them in
    the background (so /healthz answers at once), and most tests want a service ready for calls."""
    from service.state import SERVICE

    client = await aiohttp_client(app)
    executor = app[SERVICE].executor
    await asyncio.wait_for(executor.wait_started(), timeout)
    return client


def run_in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run a blocking call in a thread; `joined` gives its value (or raises its exception)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def joined(thread: threading.Thread, box: dict[str, Any], timeout: float = 30.0) -> Any:
    thread.join(timeout)
    assert not thread.is_alive(), "the call did not return"
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- no shared-memory segment outlives the process that made it ---------------------------------------

_SHM = Path("/dev/shm")
_OURS = re.compile(r"pb_(\d+)_")  # workers/shm.py names every segment pb_<creating pid>_...
_shm_at_start: set[str] = set()


def _segments() -> set[str]:
    try:
        return {name for name in os.listdir(_SHM) if _OURS.match(name)}
    except OSError:
        return set()


def pytest_sessionstart(session: pytest.Session) -> None:
    _shm_at_start.update(_segments())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a segment of a process that is gone was left in /dev/shm by any test: a
    server killed with its resource tracker, a path that forgot to unlink. Segments of processes
    still alive (another run, a server of yours) are none of this run's business. A killed server's
    resource tracker unlinks its segments as it exits: it gets a few seconds to do so."""

    def orphans() -> list[str]:
        return sorted(name for name in _segments() - _shm_at_start
                      if (m := _OURS.match(name)) and not psutil.pid_exists(int(m.group(1))))

    deadline = time.monotonic() + 10
    while (left := orphans()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(f"leaked shared-memory segments in /dev/shm: {', '.join(left)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, once for the session: give each test its own key
    prefix (`redis_server.url("prefix:")`). Skips without redis-server."""
    from tests.support.redis_server import RedisServer, need_redis_server  # it imports this module

    need_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
