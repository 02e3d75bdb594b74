"""`open_executor(url, settings)`: the executor a URL names, as `open_store(url)` gives the job store.

    "local"                                  -> the supervised local pool (workers/local/)
    "dask://HOST:PORT[?isolate=process|thread]" -> a Dask cluster (workers/dask_executor.py)

The backends are imported only when named, so a service on the local pool never imports Dask, and
so the seam (workers/executor.py) imports no backend. `settings` is any object with the fields of
`ExecutorSettings` (the service passes its Config): each backend takes what it needs from it.
"""

from __future__ import annotations

from workers.executor import Executor, ExecutorSettings


def open_executor(url: str, settings: ExecutorSettings) -> Executor:
    """The executor for `url`; ValueError for a URL no backend takes, RuntimeError when the backend's
    packages are missing. Nothing is started: `await executor.start()`."""
    if url == "local":
        from workers.local.pool import PoolOptions, WorkerPool

        return WorkerPool(PoolOptions.from_settings(settings))
    if url.startswith("dask://"):
        try:
            from workers.dask_executor import DaskExecutor, DaskOptions
        except ImportError as exc:  # dask/distributed are in requirements.lock; a trimmed install may lack them
            raise RuntimeError(f"--executor {url} needs the 'distributed' package: {exc}") from None
        return DaskExecutor(DaskOptions.from_settings(url, settings))
    raise ValueError(f"--executor {url}: must be 'local' or dask://HOST:PORT")
