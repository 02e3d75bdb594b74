"""The worker plugin the executor installs on the cluster: every Dask worker, present or joining
later, imports the task modules (so a call by name finds its task) and, in process isolation,
starts its runner children before the first call.

The worker-state hooks (workers/hooks.py) run where the tasks run: with `isolate=thread`, here, once
per Dask worker process (`@preload` first, then `@on_worker_start`; a hook that raises fails the
plugin's setup, which the service reports at start-up); with `isolate=process`, in each runner child
as it starts (workers/worker.py `main`), so each child builds its own preloads: there is no parent
to share them from.

Dask pickles the plugin by reference, so a worker imports this module to unpickle it: it stays
light (no client-side code), and its name is derived from the modules and the isolation mode, so
services with different task sets can share one cluster without replacing each other's plugin.
"""

from __future__ import annotations

import hashlib
from typing import Any

from workers import hooks, registry
from workers.dask import remote as dask_remote

try:  # the plugin base class; dask is a runtime dependency, but keep the import error readable
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - reported by open_executor
    WorkerPlugin = object  # type: ignore[assignment,misc]


def plugin_name(modules: tuple[str, ...], isolate: str) -> str:
    """The name the plugin is registered under: the same task set and mode give the same name (a
    reconnecting service replaces its own plugin), different ones do not collide."""
    digest = hashlib.sha1(f"{','.join(modules)}/{isolate}".encode()).hexdigest()[:12]
    return "procbridge-tasks-" + digest


class ProcbridgeTasks(WorkerPlugin):
    """Dask worker plugin: import the task modules on every worker (present and joining later) and
    stop procbridge's runner children when the worker closes."""

    name = "procbridge-tasks"

    def __init__(self, modules: tuple[str, ...], isolate: str = "process") -> None:
        self.modules = modules
        self.isolate = isolate

    def setup(self, worker: Any) -> None:
        registry.load(self.modules)
        if self.isolate == "process":  # one runner child per worker thread, ready before the first call
            dask_remote.prestart(self.modules, int(getattr(worker.state, "nthreads", 1) or 1))
        else:  # the tasks run in this process's threads: its hooks run here, once
            hooks.run_preloads(self.modules)
            hooks.run_worker_start(self.modules)

    def teardown(self, worker: Any) -> None:
        dask_remote.stop_runners()
