"""The Dask backend's settings: `DaskOptions`, built from `dask://HOST:PORT[?isolate=...]` and the
service's settings, and the isolation modes a call can run under.

`parse_address` is the backend's own parser of its URL: the service may check the URL early (to
refuse a bad flag before starting), but what the URL means is decided here, next to its only user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from workers.executor import ExecutorSettings

# "process": each call runs in a runner child of the Dask worker, killed at the deadline or on cancel;
# "thread": in the Dask worker's thread, stopped by restarting that worker (see workers/dask_remote.py).
ISOLATION_MODES = ("process", "thread")


def parse_address(url: str) -> tuple[str, str]:
    """`dask://HOST:PORT[?isolate=process|thread]` -> ("tcp://HOST:PORT", isolate)."""
    parts = urlsplit(url)
    if parts.scheme != "dask" or not parts.hostname or not parts.port:
        raise ValueError("must be dask://HOST:PORT")
    query = parse_qs(parts.query)
    isolate = query.pop("isolate", ["process"])[-1]
    if isolate not in ISOLATION_MODES or query:
        raise ValueError("the only option of dask://HOST:PORT is ?isolate=process or ?isolate=thread")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"tcp://{host}:{parts.port}", isolate


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
    def from_settings(cls, url: str, settings: ExecutorSettings) -> DaskOptions:
        address, isolate = parse_address(url)
        return cls(
            address=address,
            modules=settings.tasks,
            isolate=isolate,
            task_timeout=settings.task_timeout,
            max_pending=settings.max_pending,
            cancel_running=settings.cancel_running_on_disconnect,
        )
