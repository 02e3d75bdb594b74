"""A Dask scheduler and workers started as separate processes (`dask scheduler`, `dask worker`), as
an operator would run them, on free loopback ports, for the Dask executor tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil

from tests.conftest import ROOT, free_port, wait_for

DASK = str(Path(sys.executable).parent / "dask")


def dask_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROCBRIDGE_", "DASK_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class DaskProcesses:
    """`dask scheduler` on a free loopback port and any number of `dask worker`s (each with its
    nanny), every one in its own process group so stopping it stops all it started."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        directory.mkdir(parents=True, exist_ok=True)
        self._semaphores_before = _dask_semaphores()

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"dask://127.0.0.1:{self.port}"

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with open(self.directory / log_name, "ab") as log:
            return subprocess.Popen(
                [DASK, *args], cwd=ROOT, env=dask_env(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def log(self, name: str) -> str:
        path = self.directory / name
        return path.read_text(errors="replace") if path.exists() else ""

    def start_scheduler(self) -> None:
        self.scheduler = self._spawn(
            ["scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard", "--no-show"],
            "scheduler.log",
        )
        wait_for(lambda: self._listening(self.scheduler), 30, 0.05, "the Dask scheduler to listen")

    def _listening(self, proc: subprocess.Popen[bytes] | None) -> bool:
        assert proc is not None
        if proc.poll() is not None:
            raise AssertionError(f"dask scheduler exited with {proc.returncode}:\n{self.log('scheduler.log')}")
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(proc.pid).net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == self.port:
                    return True
        return False

    def start_worker(self, nthreads: int = 1) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        proc = self._spawn(
            ["worker", self.address, "--host", "127.0.0.1", "--nthreads", str(nthreads), "--nworkers", "1",
             "--no-dashboard", "--name", f"w{n}", "--local-directory", str(self.directory / f"w{n}")],
            f"worker-{n}.log",
        )
        self.workers.append(proc)
        return proc

    def worker_pids(self, proc: subprocess.Popen[bytes]) -> list[int]:
        """The nanny (the `dask worker` process itself) and every process below it."""
        try:
            return [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    @staticmethod
    def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
        """Signal the process group (nanny, worker, runner children), then reap the leader."""
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def stop_scheduler(self) -> None:
        self.stop(self.scheduler)

    def descendants(self) -> list[psutil.Process]:
        out = []
        for proc in [*self.workers, self.scheduler]:
            if proc is not None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    out.extend(psutil.Process(proc.pid).children(recursive=True))
        return out

    def close(self) -> None:
        """Stop everything, and check that nothing they started outlives them: procbridge's runner
        children (in sessions of their own) stop themselves once their worker is gone."""
        below = self.descendants()
        for proc in self.workers:  # SIGTERM: a nanny that is killed leaves its semaphores in /dev/shm
            self.stop(proc, signal.SIGTERM)
        self.stop(self.scheduler, signal.SIGTERM)
        _gone, alive = psutil.wait_procs(below, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        # A Dask nanny killed on purpose (the fault these tests inject) leaves its multiprocessing
        # semaphores behind; remove the ones that appeared while this cluster ran, now that all of
        # its processes are gone, so the machine's /dev/shm stays clean.
        for name in _dask_semaphores() - self._semaphores_before:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{name}")
        assert not alive, f"processes outlived their Dask worker: {[p.pid for p in alive]}"


def _dask_semaphores() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("sem.mp-")}
    except OSError:
        return set()


@contextlib.contextmanager
def running_cluster(directory: Path, nthreads: int = 2) -> Iterator[DaskProcesses]:
    """A scheduler and one worker of `nthreads` threads for the block (the e2e tests' fixture);
    everything stopped after it, however it ended."""
    procs = DaskProcesses(directory)
    try:
        procs.start_scheduler()
        procs.start_worker(nthreads=nthreads)
        yield procs
    finally:
        procs.close()
