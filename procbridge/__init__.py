"""procbridge's Python client: call tasks, submit jobs and map over items on a procbridge service.

    from procbridge import Client
    with Client("http://127.0.0.1:8080") as pb:
        pb.call("primes", limit=1000)

Installing the client (`pip install procbridge`) pulls only httpx; the service itself is the
`server` extra (`pip install "procbridge[server]"`). See docs/client.md.
"""

from __future__ import annotations

from procbridge._events import Event
from procbridge._version import __version__
from procbridge.aio import AsyncClient, AsyncJob
from procbridge.client import Client, Job
from procbridge.errors import (
    Draining,
    InvalidArguments,
    InvalidJson,
    JobCancelled,
    JobFailed,
    JobFinished,
    JobNotFinished,
    Overloaded,
    PayloadTooLarge,
    ProblemError,
    ProcbridgeError,
    ProtocolError,
    RateLimited,
    ServiceUnreachable,
    StreamingUnsupported,
    TaskFailed,
    TaskTimeout,
    Timeout,
    Unauthorized,
    UnknownJob,
    UnknownTask,
    UnsupportedMediaType,
    WorkerCrashed,
    problem_error,
)
from procbridge.executor import RemoteExecutor

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "Client",
    "Draining",
    "Event",
    "InvalidArguments",
    "InvalidJson",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobFinished",
    "JobNotFinished",
    "Overloaded",
    "PayloadTooLarge",
    "ProblemError",
    "ProcbridgeError",
    "ProtocolError",
    "RateLimited",
    "RemoteExecutor",
    "ServiceUnreachable",
    "StreamingUnsupported",
    "TaskFailed",
    "TaskTimeout",
    "Timeout",
    "Unauthorized",
    "UnknownJob",
    "UnknownTask",
    "UnsupportedMediaType",
    "WorkerCrashed",
    "__version__",
    "problem_error",
]
