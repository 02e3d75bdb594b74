"""`open_executor(url, settings)`: the executor a URL names, as `open_store(url)` gives the job store.

    local                                       -> the supervised local pool (workers/local/)
    dask://HOST:PORT[?isolate=process|thread]   -> a Dask cluster (workers/dask/)

The URL is parsed once, by `workers.executor_url.parse_executor` (the service's Config keeps the
result as `executor_url`). The backends are imported only when named, so a service on the local pool
never imports Dask, and the seam (workers/executor.py) imports no backend. `settings` is any object
with the fields of `ExecutorSettings` (the service passes its Config): each backend takes what it
needs from it.
"""

from __future__ import annotations

from workers.executor import Executor, ExecutorSettings
from workers.executor_url import ExecutorURL, parse_executor


def open_executor(url: ExecutorURL | str, settings: ExecutorSettings) -> Executor:
    """The executor for `url`; ValueError for a URL no backend takes, RuntimeError when the backend's
    packages are missing. Nothing is started: `await executor.start()`."""
    target = parse_executor(url) if isinstance(url, str) else url
    if target.kind == "local":
        from workers.local.pool import PoolOptions, WorkerPool

        return WorkerPool(PoolOptions.from_settings(settings))
    try:
        from workers.dask.executor import DaskExecutor
        from workers.dask.options import DaskOptions
    except ImportError as exc:  # dask/distributed are in requirements.lock; a trimmed install may lack them
        raise RuntimeError(f"--executor {target} needs the 'distributed' package: {exc}") from None
    return DaskExecutor(DaskOptions.from_settings(target, settings))
