"""The worker plugin the executor installs on the cluster: every Dask worker, present or joining
later, imports the task modules (so a call by name finds its task) and, in process isolation,
starts its runner children before the first call.

The worker-state hooks (workers/hooks.py) run where the tasks run: with `isolate=thread`, here, once
per Dask worker process (`@preload` first, then `@on_worker_start`); with `isolate=process`, in each
runner child as it starts (workers/worker.py `main`), so each child builds its own preloads: there
is no parent to share them from. A setup that fails (a hook raised, a task module will not import)
is logged here with its traceback and raised as `WorkerSetupFailed`, plain strings only, so that
`Client.register_plugin` gives the service the hook's name, its exception and its traceback intact
whatever the hook's own exception holds (cluster.py turns it into the one-line start error). On a
worker that joins later Dask only logs a failed setup and gives the worker tasks all the same: there,
each call runs the hooks again first and fails naming the hook while they raise
(workers/dask/remote.py `run_hooks`).

Dask pickles the plugin by reference, so a worker imports this module to unpickle it: it stays
light (no client-side code), and its name is derived from the modules and the isolation mode, so
services with different task sets can share one cluster without replacing each other's plugin.
"""

from __future__ import annotations

import hashlib
import logging
import traceback
from typing import Any

from workers import hooks, registry
from workers.dask import remote as dask_remote

try:  # the plugin base class; dask is a runtime dependency, but keep the import error readable
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - reported by open_executor
    WorkerPlugin = object  # type: ignore[assignment,misc]

log = logging.getLogger("procbridge.dask")


def plugin_name(modules: tuple[str, ...], isolate: str) -> str:
    """The name the plugin is registered under: the same task set and mode give the same name (a
    reconnecting service replaces its own plugin), different ones do not collide."""
    digest = hashlib.sha1(f"{','.join(modules)}/{isolate}".encode()).hexdigest()[:12]
    return "procbridge-tasks-" + digest


class WorkerSetupFailed(RuntimeError):
    """The plugin's setup failed on a Dask worker: `line` (a hook's "preload hook M.f raised
    ValueError: ...", or an import error), the worker's `address` and the `details` (traceback)."""

    def __init__(self, line: str, address: str = "", details: str = "") -> None:
        super().__init__(line, address, details)
        self.line = line
        self.address = address
        self.details = details

    def __str__(self) -> str:
        return f"{self.line} (on Dask worker {self.address})" if self.address else self.line


class ProcbridgeTasks(WorkerPlugin):
    """Dask worker plugin: import the task modules on every worker (present and joining later) and
    stop procbridge's runner children when the worker closes."""

    name = "procbridge-tasks"

    def __init__(self, modules: tuple[str, ...], isolate: str = "process") -> None:
        self.modules = modules
        self.isolate = isolate

    def setup(self, worker: Any) -> None:
        failure = self._start(worker)
        if failure is not None:  # raised outside the except block: no unpicklable context rides along
            raise failure

    def _start(self, worker: Any) -> WorkerSetupFailed | None:
        """Import the task modules, then start runners or run the hooks; why not, if that failed."""
        try:
            registry.load(self.modules)
        except Exception as exc:  # noqa: BLE001 - told to the service, which does not start
            line = (f"the task modules cannot be imported: {type(exc).__name__}: {exc}; "
                    "the Dask workers need the same code as the service")
            return self._failed(worker, line, "".join(traceback.format_exception(exc)))
        if self.isolate == "process":  # one runner child per worker thread, ready before the first call
            dask_remote.prestart(self.modules, int(getattr(worker.state, "nthreads", 1) or 1))
            return None
        try:  # the tasks run in this process's threads: its hooks run here, once
            dask_remote.run_hooks(self.modules, again=True)
        except hooks.HookFailed as exc:
            return self._failed(worker, str(exc), hooks.hook_traceback(exc))
        return None

    @staticmethod
    def _failed(worker: Any, line: str, details: str) -> WorkerSetupFailed:
        log.error("procbridge's tasks cannot start on this Dask worker: %s\n%s", line, details.rstrip())
        return WorkerSetupFailed(line, str(getattr(worker, "address", "") or ""), details)

    def teardown(self, worker: Any) -> None:
        dask_remote.stop_runners()
