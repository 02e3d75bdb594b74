"""The Dask backend's settings: `DaskOptions`, built from the parsed `dask://HOST:PORT[?isolate=...]`
(`workers.executor_url.ExecutorURL`, the one parser of that URL) and the service's settings, and the
isolation modes a call can run under.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.executor import ExecutorSettings
    from workers.executor_url import ExecutorURL

# "process": each call runs in a runner child of the Dask worker, killed at the deadline or on cancel;
# "thread": in the Dask worker's thread, stopped by restarting that worker (see workers/dask/remote.py).
ISOLATION_MODES = ("process", "thread")


@dataclass(frozen=True)
class DaskOptions:
    """Everything the Dask executor is told; the fields below `cancel_running` are tuning knobs with
    no flag (tests set them to make the cluster's failures quick to see)."""

    address: str  # tcp://HOST:PORT of the scheduler
    modules: tuple[str, ...] = ()
    isolate: str = "process"
    task_timeout: float = 60.0
    max_pending: int = 0  # calls waiting beyond the cluster's threads; at least 4 per thread
    cancel_running: bool = False  # stop a running call when its caller goes away
    scatter_threshold: int = 1024 * 1024  # bytes arguments this large are scattered first
    connect_timeout: float = 10.0
    refresh: float = 0.5  # how often the scheduler is asked for its workers (readiness)
    unavailable_grace: float = 10.0  # a call waits this long at most for a cluster with no worker
    timeout_slack: float = 2.0  # process mode: the worker enforces timeouts; the client only backs it up

    def __post_init__(self) -> None:
        if self.isolate not in ISOLATION_MODES:
            raise ValueError(f"isolate must be one of {ISOLATION_MODES}")

    @classmethod
    def from_settings(cls, url: ExecutorURL, settings: ExecutorSettings) -> DaskOptions:
        return cls(
            address=url.scheduler,
            modules=settings.tasks,
            isolate=url.isolate,
            task_timeout=settings.task_timeout,
            max_pending=settings.max_pending,
            cancel_running=settings.cancel_running_on_disconnect,
        )
